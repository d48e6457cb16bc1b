"""Export a bundle's network as TorchScript (trace), ``torch.export`` (``.pt2``) and ONNX, and check it.

Export the network after its PEFT deltas are merged into the base weights
(``shared_nets.peft.merge_peft``; adapters that cannot merge stay as modules; ``python -m tools
export`` does this for a bundle). What is exported depends on the method (:func:`export_part`):

- MA-SAM, H-SAM, S-SAM: the whole network (image in, logits out).
- Med-SA: :class:`MedSACore`, i.e. ``MedSA.forward_prompted`` (image and decoded per-slice prompts
  in, logits out). Decoding clicks/boxes from the guidance channels uses ``nonzero`` (data-dependent
  output sizes), which neither a trace nor ``torch.export`` can express, so that step stays eager
  (``net.prompts``; :func:`export_inputs` does it).
- 3DSAM-adapter (prompted): :class:`SAM3DPointsCore`, i.e. ``forward_points`` with clicks given as
  coordinates (decoded eagerly by ``decode_points``), batch fixed to the example's; an exported
  3DSAM-adapter needs a positive click in every patch (the negative-only branch is data-dependent).

Formats: TorchScript by ``torch.jit.trace`` (``torch.jit.script`` cannot compile these networks)
saved with ``monai.data.save_net_with_metadata`` (the layout of the model zoo's
``models/model.ts``); ``torch.export.export`` saved with ``torch.export.save``; ONNX by
``torch.onnx.export(dynamo=True)`` from that exported program. SAM's image-encoder attention is
switched to the stock ``segment_anything`` forward while exporting (:func:`stock_attention`,
same parameters): the SDPA forward's output layout breaks the ONNX exporter's decompositions
(3DSAM-adapter's own 3D window attention takes its math form while exporting, for the same reason).

A trace freezes Python-level shape branches, so every artifact is compared with the eager network
(:func:`check_equivalence`) on inputs other than the one it was traced on.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "FORMATS",
    "FILE_NAMES",
    "MedSACore",
    "SAM3DPointsCore",
    "export_part",
    "export_inputs",
    "stock_attention",
    "export_torchscript",
    "export_program",
    "export_onnx",
    "load_exported",
    "check_equivalence",
    "summary_json",
]

FORMATS = ("ts", "pt2", "onnx")
FILE_NAMES = {"ts": "model.ts", "pt2": "model.pt2", "onnx": "model.onnx"}


class MedSACore(nn.Module):
    """Med-SA with prompts given as tensors: ``MedSA.forward_prompted`` as a module's forward.

    Args:
        net: a ``shared_nets.med_sa.MedSA``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self,
        image: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        boxes: torch.Tensor,
        box_valid: torch.Tensor,
    ) -> torch.Tensor:
        return self.net.forward_prompted(image, coords, labels, boxes, box_valid)


class SAM3DPointsCore(nn.Module):
    """3DSAM-adapter with clicks given as coordinates: ``forward_points`` as a module's forward.

    Args:
        net: a prompted ``shared_nets.sam3d_adapter.SAM3DAdapter``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net.forward_points(image, coords, labels)


def export_part(net: nn.Module) -> tuple[nn.Module, str]:
    """The module to export for ``net`` and a one-line description of what it covers."""
    from shared_nets.med_sa.network import MedSA
    from shared_nets.sam3d_adapter.network import SAM3DAdapter

    if isinstance(net, MedSA):
        return MedSACore(net).eval(), (
            "Med-SA core (MedSA.forward_prompted): image + per-slice prompts -> logits; "
            "the guidance-channel decoding (net.prompts) stays eager"
        )
    if isinstance(net, SAM3DAdapter) and net.prompted:
        return SAM3DPointsCore(net).eval(), (
            "3DSAM-adapter core (forward_points): patch + click coordinates -> logits, fixed batch; "
            "click decoding (decode_points) stays eager; every patch needs a positive click"
        )
    return net, f"whole network ({type(net).__name__})"


def export_inputs(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The exported part's inputs for the network input ``x`` (prompts decoded eagerly where needed)."""
    from shared_nets.med_sa.network import MedSA
    from shared_nets.sam3d_adapter.network import SAM3DAdapter, decode_points

    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    if isinstance(net, MedSA):
        c = net.in_channels
        with torch.no_grad():
            return (x[:, :c].contiguous(), *net.prompts(x[:, c:]))
    if isinstance(net, SAM3DAdapter) and net.prompted:
        c = net.in_channels
        coords, labels = decode_points(x[:, c : c + 2], net.max_points)
        return x[:, :c].contiguous(), coords, labels
    return (x,)


def _dynamic_shapes(net: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[dict, ...] | None:
    """Dynamic batch (dim 0) except for 3DSAM-adapter's core (batch specialised); Med-SA's prompt rows are
    ``batch * D`` (declared, else export guards on the example's row count)."""
    from torch.export import Dim

    from shared_nets.med_sa.network import MedSA
    from shared_nets.sam3d_adapter.network import SAM3DAdapter

    if isinstance(net, SAM3DAdapter):
        return None
    if isinstance(net, MedSA):
        batch = Dim("batch", min=1, max=4096)
        rows = batch * int(inputs[0].shape[-1])
        return ({0: batch}, *({0: rows} for _ in inputs[1:]))
    return tuple({0: Dim.AUTO} for _ in inputs)


@contextlib.contextmanager
def stock_attention(net: nn.Module) -> Iterator[nn.Module]:
    """Use ``segment_anything``'s attention forward inside the block (SDPA restored after; same parameters)."""
    from shared_nets.sam.attention import SdpaAttention, enable_sdpa

    swapped = [(m, getattr(m, "rel_pos_mode", "bias")) for m in net.modules() if type(m) is SdpaAttention]
    enable_sdpa(net, False)
    try:
        yield net
    finally:
        for m, mode in swapped:
            m.__class__ = SdpaAttention
            m.rel_pos_mode = mode


@contextlib.contextmanager
def _atomic(path: str | os.PathLike) -> Iterator[str]:
    from shared_nets.io import atomic_path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        yield tmp


def export_torchscript(
    module: nn.Module,
    inputs: Sequence[torch.Tensor],
    path: str | os.PathLike,
    meta: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> tuple[torch.jit.ScriptModule, list[str]]:
    """Trace ``module`` on ``inputs`` and save it as a model-zoo ``model.ts`` (metadata included).

    As ``python -m monai.bundle ckpt_export --use_trace true`` writes it: ``meta`` (the bundle's
    ``metadata.json``) as the metadata and ``extra_files`` (e.g. the configs as JSON) beside it.

    Returns:
        ``(traced module, trace warnings)``; the warnings name the Python values the trace froze.
    """
    from monai.data import save_net_with_metadata

    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), stock_attention(module):
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, tuple(inputs), check_trace=False)
    frozen = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if w.category is torch.jit.TracerWarning})
    with _atomic(path) as tmp, open(tmp, "wb") as f:
        save_net_with_metadata(
            traced,
            f,
            include_config_vals=False,
            meta_values=dict(meta or {}),
            more_extra_files=dict(extra_files or {}),
        )
    return traced, frozen


def export_program(
    module: nn.Module, inputs: Sequence[torch.Tensor], path: str | os.PathLike | None = None
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` (dynamic batch where the network allows; inputs need batch >= 2 for
    that, else it is specialised to 1), saved to ``path`` when given."""
    with torch.no_grad(), stock_attention(module):
        ep = torch.export.export(module, tuple(inputs), dynamic_shapes=_dynamic_shapes(_inner(module), inputs))
    if path is not None:
        with _atomic(path) as tmp:
            torch.export.save(ep, tmp)
    return ep


def export_onnx(program: torch.export.ExportedProgram, inputs: Sequence[torch.Tensor], path: str | os.PathLike) -> str:
    """ONNX (torch's dynamo exporter) of an exported program, weights inside the file."""
    _need("onnxscript", "torch's ONNX exporter")
    names = [f"input_{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["image"]
    with _atomic(path) as tmp:
        torch.onnx.export(
            program, tuple(inputs), tmp, dynamo=True, external_data=False, input_names=names, output_names=["logits"]
        )
    return str(path)


def _need(module: str, what: str) -> Any:
    """Import an optional package of the ``export`` extra, or raise one line saying how to install it."""
    from monai.utils import optional_import

    mod, ok = optional_import(module)
    if not ok:
        raise ImportError(f"{what} needs '{module}': pip install -e '.[export]' (onnx, onnxscript, onnxruntime).")
    return mod


def _inner(module: nn.Module) -> nn.Module:
    return module.net if isinstance(module, (MedSACore, SAM3DPointsCore)) else module


def load_exported(fmt: str, path: str | os.PathLike, threads: int = 1) -> Callable[..., torch.Tensor]:
    """A callable ``f(*inputs) -> logits`` running the artifact at ``path`` (``fmt`` in :data:`FORMATS`)."""
    if fmt == "ts":
        return torch.jit.load(str(path), map_location="cpu")
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    if fmt == "onnx":
        ort = _need("onnxruntime", "running a .onnx file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
            return torch.from_numpy(session.run(None, feed)[0])

        return run
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}.")


def check_equivalence(
    eager: Callable[..., torch.Tensor],
    exported: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    atol: float = 1e-4,
    name: str = "exported model",
) -> dict[str, float]:
    """Compare an exported model with the eager one on ``inputs``.

    The argmax must agree wherever eager's top-1/top-2 logit margin exceeds ``2 * atol`` (near-ties
    may flip within the tolerance); a confident flip is reported as such, before the difference.

    Returns:
        ``{"max_abs_diff", "argmax_agreement", "argmax_confident_disagreements"}``.

    Raises:
        ValueError: naming ``name`` when the exported model raises, gives another shape, differs by
            more than ``atol`` or flips a confident argmax.
    """
    shapes = [tuple(t.shape) for t in inputs]
    with torch.no_grad():
        ref = eager(*inputs)
        try:
            out = exported(*inputs)
        except Exception as e:  # a frozen trace fed another shape typically raises here
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"{name} failed on inputs {shapes}: {type(e).__name__}: {first[:300]}") from e
    if isinstance(out, (tuple, list)):
        out = out[0]
    ref, out = torch.as_tensor(ref).float(), torch.as_tensor(out).float()
    if out.shape != ref.shape:
        raise ValueError(f"{name} gives shape {tuple(out.shape)} on inputs {shapes}, eager {tuple(ref.shape)}.")
    diff = (out - ref).abs().max().item() if ref.numel() else 0.0
    result = {"max_abs_diff": diff, "argmax_agreement": 1.0, "argmax_confident_disagreements": 0}
    if ref.ndim >= 2 and ref.shape[1] > 1:
        top2 = ref.topk(2, dim=1).values
        confident = (top2[:, 0] - top2[:, 1]) > 2 * atol
        same = ref.argmax(1) == out.argmax(1)
        result["argmax_agreement"] = same.float().mean().item()
        result["argmax_confident_disagreements"] = int((~same & confident).sum().item())
    if result["argmax_confident_disagreements"]:
        raise ValueError(
            f"{name} changes the argmax of {result['argmax_confident_disagreements']} voxel(s) with an eager "
            f"margin > {2 * atol:g} on inputs {shapes}."
        )
    if not diff <= atol:
        raise ValueError(f"{name} differs from eager by {diff:.3g} > atol {atol:g} on inputs {shapes}.")
    return result


def summary_json(path: str | os.PathLike, summary: Mapping[str, Any]) -> str:
    """Write the export summary (part, files, equivalence numbers) atomically as JSON."""
    from shared_nets.io import atomic_write_json

    return atomic_write_json(json.loads(json.dumps(summary, default=str)), path)
