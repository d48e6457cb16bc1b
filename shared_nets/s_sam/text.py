"""Label-name (text) prompts for S-SAM: text encoders and the stored embedding file.

S-SAM (paper section 3, "S-SAM - Architecture") prompts SAM with the *name* of the class to
segment: the name is encoded by CLIP's text encoder (the official code uses CLIP ViT-B/32,
512-d ``encode_text`` output, not normalised) and mapped by the Text-Affine Layer into the
mask decoder's prompt token.

CLIP never runs during training or inference here: its output for a class name is fixed,
so the bundle stores one vector per name in a small JSON file and the network reads it.
This module writes and validates that file and provides two encoders with one interface
(``encoder(names) -> Tensor [N, dim]``):

* :class:`ClipTextEncoder`: the real one (``open_clip``, the ``clip`` extra of this
  package). Its weights must be downloadable or given as a local file; offline it fails
  with a message saying how to provide them.
* :class:`HashTextEncoder`: a small deterministic stand-in (a name's SHA-256 seeds a
  Gaussian vector) for tests and machines without CLIP. Different names give unrelated,
  reproducible vectors; it carries no semantics, so a model trained with it only knows
  the names it was trained on.

Command line, from the checkout (adds or updates names in a file, other names are kept)::

    python -m tools text_embeddings add bundles/s_sam/resources/text_embeddings.json \\
        "['liver', 'spleen']" --encoder clip
    python -m tools text_embeddings show bundles/s_sam/resources/text_embeddings.json
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch
from monai.utils import optional_import

from shared_nets.io import atomic_write_text

__all__ = [
    "TEXT_EMBEDDING_DIM",
    "HashTextEncoder",
    "ClipTextEncoder",
    "get_text_encoder",
    "normalize_name",
    "read_text_embeddings",
    "write_text_embeddings",
    "load_class_embeddings",
    "add_text_embeddings",
    "foreground_names",
    "names_to_ids",
    "channel_targets",
]

# CLIP ViT-B/32's joint embedding width (official code, ``clip.load("ViT-B/32")``).
TEXT_EMBEDDING_DIM = 512

_FORMAT = "s_sam_text_embeddings/1"


def normalize_name(name: str) -> str:
    """Lookup key of a class name: stripped, lower-case, single spaces ("Right  Kidney" -> "right kidney")."""
    return " ".join(str(name).split()).lower()


class HashTextEncoder:
    """Deterministic stand-in for a CLIP text encoder (tests, offline machines).

    A name's normalised form is hashed (SHA-256) to seed a Gaussian vector, so the same
    name gives the same vector on every machine and torch version.

    Args:
        dim: embedding width (512 like CLIP ViT-B/32).
        scale: standard deviation of the entries (CLIP ViT-B/32 text features have a norm
            of roughly 10, i.e. entries of about 0.45).
    """

    name = "hash"

    def __init__(self, dim: int = TEXT_EMBEDDING_DIM, scale: float = 0.45) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}.")
        self.dim = dim
        self.scale = float(scale)

    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        """Encode ``names``.

        Returns:
            ``[N, dim]`` float32 embeddings.
        """
        rows = []
        for n in names:
            seed = int.from_bytes(hashlib.sha256(normalize_name(n).encode("utf-8")).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
            rows.append(torch.randn(self.dim, generator=g) * self.scale)
        return torch.stack(rows) if rows else torch.zeros(0, self.dim)


class ClipTextEncoder:
    """CLIP text encoder through ``open_clip`` (optional; ``pip install open_clip_torch``).

    Args:
        model_name: open_clip architecture; ``ViT-B-32`` is the official code's CLIP ViT-B/32.
        pretrained: open_clip pretrained tag (``openai`` = OpenAI's released weights, what the
            official code's ``clip.load`` uses) or a local weights file for offline machines.
        cache_dir: where open_clip caches downloaded weights.
        device: torch device to run on.

    Raises:
        RuntimeError: ``open_clip`` is not installed, or the weights cannot be loaded (e.g.
            no network); the message says how to provide them.
    """

    name = "clip"

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str = "openai",
        cache_dir: str | None = None,
        device: str = "cpu",
    ) -> None:
        open_clip, has_open_clip = optional_import("open_clip")
        if not has_open_clip:
            raise RuntimeError(
                "ClipTextEncoder needs the 'open_clip' package: pip install open_clip_torch "
                "(or this package's 'clip' extra); without it use --encoder hash (deterministic, no semantics)."
            )
        try:
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, cache_dir=cache_dir)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as e:  # download errors come in many types (URLError, HF hub errors, OSError)
            raise RuntimeError(
                f"could not load CLIP '{model_name}' weights '{pretrained}' ({type(e).__name__}: {e}). "
                "On a machine without internet access, download the weights elsewhere and pass "
                "pretrained=/path/to/open_clip_pytorch_model.bin (--pretrained on the command line)."
            ) from None
        self.model = model.to(device).eval()
        self.device = device
        self.model_name = model_name
        self.pretrained = pretrained
        self.name = f"clip:{model_name}:{os.path.basename(str(pretrained))}"

    @torch.no_grad()
    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        """Encode ``names`` as given (the official code feeds the raw label name).

        Returns:
            ``[N, 512]`` float32 text features (CLIP's projection output, not normalised).
        """
        tokens = self.tokenizer(list(names)).to(self.device)
        return self.model.encode_text(tokens).float().cpu()


def get_text_encoder(
    encoder: str = "clip", dim: int = TEXT_EMBEDDING_DIM, **kwargs
) -> HashTextEncoder | ClipTextEncoder:
    """Encoder by name: ``clip`` (:class:`ClipTextEncoder`) or ``hash`` (:class:`HashTextEncoder`)."""
    if encoder == "clip":
        return ClipTextEncoder(**kwargs)
    if encoder == "hash":
        return HashTextEncoder(dim=dim, **kwargs)
    raise ValueError(f"encoder must be 'clip' or 'hash', got {encoder!r}.")


def read_text_embeddings(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a label-name embedding file.

    Args:
        path: JSON file written by :func:`write_text_embeddings`.

    Returns:
        ``({normalised name: Tensor [dim]}, info)`` where ``info`` holds ``dim``, ``encoder``
        and the names as written.

    Raises:
        ValueError: the file is missing, not JSON, or not in this format (message names the
            file and what was expected).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            f"text embedding file '{path}' does not exist; create it with "
            "`python -m tools text_embeddings add <file> \"['class name', ...]\"`."
        )
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"text embedding file '{path}' is not readable JSON ({type(e).__name__}: {e}).") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("embeddings"), dict) or not isinstance(obj.get("dim"), int):
        raise ValueError(
            f"text embedding file '{path}' must be a JSON object with an integer 'dim' and an "
            "'embeddings' object mapping class names to vectors."
        )
    dim = obj["dim"]
    table: dict[str, torch.Tensor] = {}
    for name, vec in obj["embeddings"].items():
        if not isinstance(vec, list) or len(vec) != dim or not all(isinstance(x, (int, float)) for x in vec):
            got = len(vec) if isinstance(vec, list) else type(vec).__name__
            raise ValueError(
                f"text embedding file '{path}': the vector of '{name}' must be a list of {dim} numbers "
                f"(the file's 'dim'), got {got}."
            )
        table[normalize_name(name)] = torch.tensor(vec, dtype=torch.float32)
    info = {"dim": dim, "encoder": obj.get("encoder", "unknown"), "names": list(obj["embeddings"])}
    return table, info


def write_text_embeddings(
    path: str | os.PathLike, names: Sequence[str], embeddings: torch.Tensor, encoder: str
) -> None:
    """Write ``names`` and their ``embeddings [N, dim]`` to ``path`` (atomically: temp file, then rename)."""
    path = os.fspath(path)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
        raise ValueError(f"embeddings must be [len(names)={len(names)}, dim], got {tuple(embeddings.shape)}.")
    obj = {
        "format": _FORMAT,
        "encoder": encoder,
        "dim": int(embeddings.shape[1]),
        "embeddings": {str(n): [round(float(x), 6) for x in row] for n, row in zip(names, embeddings)},
    }
    atomic_write_text(path, json.dumps(obj) + "\n")


def load_class_embeddings(
    path: str | os.PathLike, class_names: Sequence[str], dim: int = TEXT_EMBEDDING_DIM
) -> torch.Tensor:
    """Embeddings of ``class_names`` (in that order) from the file at ``path``.

    Args:
        path: embedding file (see :func:`write_text_embeddings`).
        class_names: names to look up (case and repeated spaces are ignored).
        dim: width the network's Text-Affine Layer expects.

    Returns:
        ``[K, dim]`` float32.

    Raises:
        ValueError: the file's width is not ``dim``, or a name has no stored embedding (the
            message lists the stored names and the command that adds one).
    """
    table, info = read_text_embeddings(path)
    if info["dim"] != dim:
        raise ValueError(
            f"text embedding file '{os.fspath(path)}' holds {info['dim']}-d vectors, the network expects "
            f"text_dim={dim} (CLIP ViT-B/32 gives 512); recompute it with the matching encoder."
        )
    missing = [n for n in class_names if normalize_name(n) not in table]
    if missing:
        raise ValueError(
            f"class name(s) {missing} have no embedding in '{os.fspath(path)}' (stored: {info['names']}); "
            f'add them with `python -m tools text_embeddings add {os.fspath(path)} "{list(missing)}"`.'
        )
    return torch.stack([table[normalize_name(n)] for n in class_names]) if class_names else torch.zeros(0, dim)


def add_text_embeddings(
    path: str,
    names: Sequence[str] | str,
    encoder: str = "clip",
    dim: int = TEXT_EMBEDDING_DIM,
    model_name: str = "ViT-B-32",
    pretrained: str = "openai",
) -> list[str]:
    """Compute embeddings of ``names`` and add them to the file at ``path`` (created if absent).

    Names already in the file are recomputed; the file's other names are kept. Mixing
    encoders in one file is refused, because vectors from different encoders are not
    comparable for the trained Text-Affine Layer.

    Args:
        path: embedding file.
        names: class names (a list, or one comma-separated string).
        encoder: ``clip`` (needs open_clip and its weights) or ``hash`` (deterministic stand-in).
        dim: width for the ``hash`` encoder.
        model_name: open_clip architecture for ``clip``.
        pretrained: open_clip pretrained tag or a local weights file for ``clip``.

    Returns:
        All names stored in the file afterwards.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = [" ".join(str(n).split()) for n in names]
    if not names:
        raise ValueError("names must hold at least one class name.")
    kwargs = {"model_name": model_name, "pretrained": pretrained} if encoder == "clip" else {}
    enc = get_text_encoder(encoder, dim=dim, **kwargs)
    new = enc(names)
    stored_names: list[str] = []
    stored: list[torch.Tensor] = []
    if os.path.exists(path):
        table, info = read_text_embeddings(path)
        if info["encoder"] != enc.name:
            raise ValueError(
                f"text embedding file '{path}' was written by encoder '{info['encoder']}', not '{enc.name}'; "
                "write to a new file or recompute every name with one encoder."
            )
        keys = {normalize_name(n) for n in names}
        for n in info["names"]:
            if normalize_name(n) not in keys:
                stored_names.append(n)
                stored.append(table[normalize_name(n)])
    all_names = stored_names + names
    rows = torch.cat([torch.stack(stored), new]) if stored else new
    write_text_embeddings(path, all_names, rows, enc.name)
    return all_names


def _channel_items(channel_def: dict) -> list[tuple[int, str]]:
    try:
        items = sorted((int(k), str(v)) for k, v in dict(channel_def).items())
    except (TypeError, ValueError):
        raise ValueError(f"channel_def must map integer ids to class names, got {channel_def!r}.") from None
    if not items or items[0][0] != 0:
        raise ValueError(f"channel_def must contain id 0 (background), got {channel_def!r}.")
    return items


def foreground_names(channel_def: dict) -> list[str]:
    """Class names of ``channel_def`` by id, background excluded.

    ``channel_def`` is metadata.json's ``network_data_format.outputs.pred.channel_def``.
    """
    return [name for i, name in _channel_items(channel_def) if i != 0]


def names_to_ids(channel_def: dict, names: Sequence[str]) -> list[int]:
    """``channel_def`` ids of ``names`` (case-insensitive), e.g. to write a subset prediction with its label ids.

    Raises:
        ValueError: a name is not in ``channel_def``, or is repeated.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"class_names must be a non-empty list of names from channel_def, got {names!r}.")
    lookup = {normalize_name(n): i for i, n in _channel_items(channel_def) if i != 0}
    unknown = [n for n in names if normalize_name(n) not in lookup]
    if unknown:
        raise ValueError(
            f"class_names {unknown} are not in channel_def "
            "(metadata.json network_data_format.outputs.pred.channel_def: "
            f"{foreground_names(channel_def)})."
        )
    ids = [lookup[normalize_name(n)] for n in names]
    if len(set(ids)) != len(ids):
        raise ValueError(f"class_names must not repeat a class, got {list(names)}.")
    return ids


def channel_targets(channel_def: dict, names: Sequence[str]) -> list[int]:
    """Output channel of every foreground id of ``channel_def`` when predicting ``names``.

    ``MapLabelValued(orig_labels=<foreground ids>, target_labels=channel_targets(...))`` turns a
    label map with ``channel_def`` ids into network channels: ``names[i]`` becomes ``i + 1``
    and classes not predicted become background.
    """
    ids = names_to_ids(channel_def, names)
    return [ids.index(i) + 1 if i in ids else 0 for i, _ in _channel_items(channel_def) if i != 0]


def _show(path: str) -> dict:
    """Summary of an embedding file: encoder, width and names."""
    _, info = read_text_embeddings(path)
    return info


#: ``python -m tools text_embeddings add|show`` (see the module docstring).
cli: dict = {"add": add_text_embeddings, "show": _show}
