"""Run a bundle's exported network on ONNX Runtime: the ``inference_backend: "onnx"`` switch.

The inference configs of the bundles whose whole network exports (MA-SAM, H-SAM, S-SAM) take
``inference_backend``: ``"torch"`` (default: ``network_def`` with ``models/model.pt``) or ``"onnx"``:
``network_def`` is not built, the checkpoint loader is disabled and the sliding-window inferer calls
:class:`OnnxRuntimeNetwork` on ``onnx_model`` (default ``models/model.onnx``, written by ``python -m
tools export --formats onnx`` from ``model.pt`` with the PEFT deltas merged). The output activation
(softmax/sigmoid) stays a torch module after it, as in the torch path.

Med-SA and 3DSAM-adapter export only a core (prompt decoding stays eager, see ``shared_nets.export``),
so their configs refuse ``"onnx"`` with :func:`require_torch_backend`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["BACKENDS", "TORCH_ONLY", "uses_onnx", "require_torch_backend", "OnnxRuntimeNetwork"]

BACKENDS = ("torch", "onnx")
logger = logging.getLogger(__name__)

#: Bundles that only export a core (``shared_nets.export.export_part``), and why ONNX cannot run their inference.
TORCH_ONLY = {
    "med_sa": (
        "only Med-SA's core exports (clicks and boxes are decoded from the guidance channels eagerly, and a slice "
        "without a prompt takes a fixed background logit), see docs/export.md"
    ),
    "sam3d_adapter": (
        "only 3DSAM-adapter's core exports (clicks are decoded eagerly, the batch is fixed and every patch needs a "
        "positive click), see docs/export.md"
    ),
}

#: ONNX tensor element types the wrapper feeds, as torch dtypes.
_DTYPES = {"tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16}


def uses_onnx(backend: str) -> bool:
    """``True`` for ``"onnx"``, ``False`` for ``"torch"``; any other value is refused naming the key."""
    if backend not in BACKENDS:
        raise ValueError(f"inference_backend must be one of {list(BACKENDS)}, got {backend!r}.")
    return backend == "onnx"


def require_torch_backend(backend: str, bundle: str) -> None:
    """Refuse ``inference_backend: "onnx"`` for a bundle of :data:`TORCH_ONLY`, saying why (one line).

    Args:
        backend: the config's ``inference_backend``.
        bundle: the bundle folder name, a key of :data:`TORCH_ONLY`.
    """
    if uses_onnx(backend):
        reason = TORCH_ONLY.get(bundle, "its whole network does not export")
        raise ValueError(f"inference_backend 'onnx' is not available for {bundle}: {reason}; use 'torch'.")


def _export_hint(path: Path) -> str:
    bundle = path.parent.parent if path.parent.name == "models" else Path("<bundle>")
    return (
        f"run `python -m tools export --bundle {bundle} --configs inference.json[,demo.json,...] --formats onnx` "
        "with this run's configs first, or set onnx_model"
    )


class OnnxRuntimeNetwork(nn.Module):
    """An ``nn.Module`` whose forward runs an ONNX file with ONNX Runtime (one image input, first output).

    Inputs are fed as numpy arrays of the session's input type on the CPU; the output comes back as a
    tensor on the input's device and dtype. Meant for inference only (no gradients, no parameters).

    Args:
        path: the ``.onnx`` file (``python -m tools export --formats onnx``).
        input_shape: the input the bundle feeds without the batch dimension, ``[C, H, W, D]``; the
            file's input must have that rank and those sizes where it fixes them.
        out_channels: the number of output channels the bundle's post-processing expects (classes with
            background); checked against the file's output when it fixes it.
        device: the bundle's device; on ``cuda`` ONNX Runtime's CUDA provider is used when it is
            installed (``onnxruntime-gpu``), else the CPU provider.
        threads: intra-op threads (default: ``torch.get_num_threads()``, i.e. the bundle's
            ``num_threads`` after ``shared_nets.threads.configure_threads``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        input_shape: Sequence[int] | None = None,
        out_channels: int | None = None,
        device: str | torch.device = "cpu",
        threads: int | None = None,
    ) -> None:
        super().__init__()
        from monai.utils import optional_import

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"inference_backend 'onnx': onnx_model '{self.path}' does not exist; {_export_hint(self.path)}."
            )
        ort, ok = optional_import("onnxruntime")
        if not ok:
            raise ImportError("inference_backend 'onnx' needs onnxruntime: pip install -e '.[export]'.")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads if threads is not None else torch.get_num_threads())
        options.inter_op_num_threads = 1
        device = torch.device(device)
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                logger.warning("onnxruntime has no CUDA provider (install onnxruntime-gpu): running on the CPU.")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"onnx_model '{self.path}' is not a readable ONNX model ({type(e).__name__}).") from e
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(
                f"onnx_model '{self.path}' takes {len(inputs)} inputs {[i.name for i in inputs]}; expected one image "
                f"input (only MA-SAM, H-SAM and S-SAM export their whole network); {_export_hint(self.path)}."
            )
        self.input_name = inputs[0].name
        self.input_dtype = _DTYPES.get(inputs[0].type, torch.float32)
        output = self.session.get_outputs()[0]
        self.output_name = output.name
        if input_shape is not None:
            self._check_shape(list(inputs[0].shape), [int(s) for s in input_shape])
        found = output.shape[1] if len(output.shape) > 1 else None
        if out_channels is not None and isinstance(found, int) and found != int(out_channels):
            raise ValueError(
                f"onnx_model '{self.path}' gives {found} output channels; this bundle config expects "
                f"{int(out_channels)} (num_classes + background): it was exported with other configs; "
                f"{_export_hint(self.path)}."
            )

    def _check_shape(self, found: list, expected: list[int]) -> None:
        """The file's input (batch first) must have rank ``1 + len(expected)`` and the expected fixed sizes."""
        fits = len(found) == len(expected) + 1 and all(
            not isinstance(f, int) or f == e for f, e in zip(found[1:], expected)
        )
        if not fits:
            shown = [f if isinstance(f, int) else "B" for f in found]
            feeds = ["B", *expected]
            raise ValueError(
                f"onnx_model '{self.path}' takes input {shown}; this bundle config feeds {feeds} (channels, img_size, "
                f"depth): it was exported with other configs; {_export_hint(self.path)}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        feed = x.detach().to(device="cpu", dtype=self.input_dtype).contiguous().numpy()
        out = self.session.run([self.output_name], {self.input_name: feed})[0]
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)

    def extra_repr(self) -> str:
        return f"path='{self.path}', providers={self.session.get_providers()}"
