"""Dataset recipes: ``python -m tools prepare <dataset> --src DIR --out DIR [--seed 0] [recipe options]``.

Each recipe reads a dataset in its published folder layout and writes ``OUT/datalist.json`` in
MONAI's decathlon format (``name``, ``description``, ``labels``, ``modality``, ``training`` /
``validation`` / ``test`` lists of ``{"image", "label", "case"}`` with paths relative to OUT),
with the split the paper used: fixed where the paper names its cases, seeded (``--seed``) where
it is random. Volumes are converted to ``.nii.gz`` only where the source is not NIfTI, and labels
are written to OUT only where the paper maps or merges ids; ``--src`` is never written to.
docs/datasets.md lists downloads, layouts, commands, splits and label mappings.

=====================  =============================================================  ==========================
dataset                what                                                           options
=====================  =============================================================  ==========================
``btcv``               BTCV 13 organs, MA-SAM's 24/6 split                            ``merge_adrenals``, ``num_val``
``synapse``            Synapse 8 organs (SAMed/H-SAM ids), TransUNet's 18/12 split    ``label_ids``, ``num_val``
``msd_pancreas``       MSD Task07 pancreas tumour, 3DSAM-adapter's seeded 70/10/20    ``seed``
``msd_colon``          MSD Task10 colon cancer, seeded 70/10/20                       ``seed``
``kits21``             KiTS21 kidney tumour, seeded 70/10/20                          ``seed``
``lits17``             LiTS17 liver tumour, seeded 70/10/20                           ``seed``
``promise12``          PROMISE12 prostate (.mhd -> NIfTI), seeded 40/10               ``num_test``, ``num_val``
``prostate_multisite`` MA-SAM's 6-site prostate MRI, its per-site test cases          ``sites``, ``num_val``
``la``                 left atrium (.nrrd / UA-MT .h5 -> NIfTI), UA-MT's 80/20        ``num_labeled``, ``source``
``amos22``             AMOS 22 CT or MRI in BTCV ids (MA-SAM Fig. 6), labelled cases  ``modality``, ``shots``
=====================  =============================================================  ==========================
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RECIPES", "recipe", "recipe_options", "prepare", "main"]

#: dataset name -> ``"module:function"`` (imported only when used).
RECIPES: dict[str, str] = {
    "btcv": "tools.recipes.abdomen:prepare_btcv",
    "synapse": "tools.recipes.abdomen:prepare_synapse",
    "msd_pancreas": "tools.recipes.tumour:prepare_msd_pancreas",
    "msd_colon": "tools.recipes.tumour:prepare_msd_colon",
    "kits21": "tools.recipes.tumour:prepare_kits21",
    "lits17": "tools.recipes.tumour:prepare_lits17",
    "promise12": "tools.recipes.prostate:prepare_promise12",
    "prostate_multisite": "tools.recipes.prostate:prepare_prostate_multisite",
    "la": "tools.recipes.heart:prepare_la",
    "amos22": "tools.recipes.abdomen:prepare_amos22",
}


def recipe(dataset: str) -> Callable[..., dict[str, Any]]:
    """The recipe function of ``dataset`` (a key of :data:`RECIPES`)."""
    if dataset not in RECIPES:
        raise ValueError(f"dataset must be one of {sorted(RECIPES)}, got {dataset!r}.")
    module, _, attr = RECIPES[dataset].partition(":")
    return getattr(importlib.import_module(module), attr)


def recipe_options(dataset: str) -> dict[str, Any]:
    """The keyword options of ``dataset``'s recipe and their defaults (``seed``, ``progress``, ...)."""
    params = inspect.signature(recipe(dataset)).parameters
    return {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def prepare(dataset: str, src: str | Path, out: str | Path, **options: Any) -> Path:
    """Run the recipe for ``dataset`` on ``src`` and write ``out/datalist.json``.

    Args:
        dataset: a key of :data:`RECIPES`.
        src: the dataset folder as downloaded (read only).
        out: output folder (created; must not be inside ``src``).
        **options: the recipe's keyword options (see :func:`recipe_options`), e.g. ``seed=0``,
            ``merge_adrenals=True``.

    Returns:
        The path of the written datalist (written atomically: temporary file, then rename).

    Raises:
        ValueError: unknown dataset or option, bad option value, ``out`` inside ``src``.
        tools.recipes.common.DatasetLayoutError: ``src`` does not look like the dataset (a
            ``ValueError`` whose message names the folder/file and the expected layout).
    """
    from tools.recipes.common import check_folders, write_json_atomic

    fn = recipe(dataset)
    allowed = recipe_options(dataset)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"option(s) {unknown} are not known to the {dataset!r} recipe; its options are {sorted(allowed)}."
        )
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    src_dir, out_dir = check_folders(src, out)
    payload = fn(src_dir, out_dir, **options)
    used = {k: options.get(k, v) for k, v in allowed.items() if k != "progress"}
    payload["prepare"] = {
        "command": f"python -m tools prepare {dataset} --src SRC --out OUT"
        + "".join(f" --{k} {_cli_value(v)}" for k, v in used.items() if v != allowed[k] or k == "seed"),
        "dataset": dataset,
        "options": used,
    }
    return write_json_atomic(payload, out_dir / "datalist.json")


def _cli_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _summary(path: Path) -> str:
    import json

    content = json.loads(path.read_text())
    counts = ", ".join(
        f"{k} {len(content[k])}" for k in ("training", "validation", "test", "unlabeled") if content.get(k)
    )
    return f"wrote {path} ({content.get('name')}: {counts})"


def main(dataset: str | None = None, src: str | None = None, out: str | None = None, **options: Any) -> str:
    """Prepare a dataset: ``python -m tools prepare <dataset> --src DIR --out DIR [--seed 0] [--option value]``.

    Args:
        dataset: one of ``btcv``, ``synapse``, ``msd_pancreas``, ``msd_colon``, ``kits21``,
            ``lits17``, ``promise12``, ``prostate_multisite``, ``la`` (none: list them with their options).
        src: the dataset folder as downloaded (never written to).
        out: folder for ``datalist.json`` and any converted / re-mapped volumes.
        **options: recipe options, e.g. ``--seed 1``, ``--merge_adrenals``, ``--label_ids btcv``,
            ``--sites A``, ``--num_labeled 4``, ``--num_val 2``, ``--progress False``.

    Returns:
        A one-line summary naming the written datalist. Bad arguments print one ``error:`` line
        and exit with status 2; a source folder that does not look like the dataset exits with 1.
    """
    from shared_nets.data import DataError

    if dataset is None:
        lines = ["datasets (python -m tools prepare <dataset> --src DIR --out DIR [options]):"]
        for name in RECIPES:
            opts = ", ".join(f"--{k} {v!r}" for k, v in recipe_options(name).items())
            lines.append(f"  {name:20s} {opts}")
        return "\n".join(lines)
    try:
        return _summary(prepare(str(dataset), src, out, **options))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
