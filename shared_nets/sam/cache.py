"""An LRU cache of image embeddings, so re-prompting the same image skips the image encoder."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

__all__ = ["EmbeddingCache"]


class EmbeddingCache:
    """Small LRU cache of image embeddings for interactive re-prompting.

    An entry is found again when the same image (compared with ``torch.equal`` on a stored
    copy, on the image's own device, so no host transfer or hashing), the same ``key`` (e.g.
    the slice count) and the same parameter versions of ``module`` are seen: any in-place
    update of those weights (an optimizer step, ``load_state_dict``) invalidates every entry.
    Only used without autograd (a cached embedding carries no graph); otherwise the cache is
    cleared and bypassed. Each entry also holds a dict ``extra`` for other prompt-independent
    results derived from the embedding (e.g. decoder partial sums), computed once per image.

    Args:
        size: entries kept (the windows of one volume); 0 disables caching.
        module: the module whose parameters the embedding depends on (the image encoder).
    """

    def __init__(self, size: int, module: nn.Module) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"embedding cache size must be an integer >= 0 (0 disables), got {size!r}.")
        self.size = size
        self._module = [module]  # a list, so the cache is not registered as a submodule's owner
        self.entries: list[dict[str, Any]] = []
        self.hits = 0
        self.misses = 0

    def _version(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._module[0].parameters())

    def active(self) -> bool:
        """Caching applies now: enabled, autograd off, and not tracing or exporting (a cached embedding
        would be frozen into the graph as a constant)."""
        return (
            self.size > 0
            and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_exporting()
        )

    def lookup(self, image: torch.Tensor, key: Hashable, compute: Callable[[], Any]) -> dict[str, Any] | None:
        """The entry for ``image``/``key`` (``{"value": compute(), "extra": {}}``), or None when inactive.

        A miss runs ``compute()`` and stores its result (detached tensors or lists of them).
        """
        if not self.active():
            self.entries.clear()
            return None
        version = self._version()
        for i, e in enumerate(self.entries):
            img = e["image"]
            if (
                e["key"] == key
                and e["version"] == version
                and img.shape == image.shape
                and img.dtype == image.dtype
                and img.device == image.device
                and torch.equal(img, image)
            ):
                self.entries.append(self.entries.pop(i))  # most recently used last
                self.hits += 1
                return e
        self.misses += 1
        value = compute()
        value = [v.detach() for v in value] if isinstance(value, (list, tuple)) else value.detach()
        entry = {"image": image.detach().clone(), "key": key, "version": version, "value": value, "extra": {}}
        self.entries.append(entry)
        del self.entries[: -self.size]
        return entry

    def clear(self) -> None:
        """Drop every entry (hit/miss counters are kept)."""
        self.entries.clear()
