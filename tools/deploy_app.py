"""Run the MONAI Deploy App SDK application of a bundle on a DICOM series folder: a DICOM SEG comes out.

Command line (from the checkout, in an environment with the ``deploy`` extra)::

    python -m tools deploy_app --bundle bundles/ma_sam --input ct_dicom --output seg_out \
        [--configs "['inference','deploy']"]

The app (:class:`shared_nets.deploy.app.BundleSegApp`) is built from the bundle folder itself: its configs
(merged in order; ``deploy`` last) and ``models/model.pt``. Several bundles (comma-separated) are branches
of one app (the series is read once), each writing into ``<output>/<bundle folder name>/``. The same app
packaged as a MONAI Application Package (container) is described in docs/deploy.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["main"]


def _names(value: str | Sequence[str], name: str) -> list[str]:
    if isinstance(value, str):
        items = [v.strip(" '\"") for v in value.strip("[]").split(",")]
    elif isinstance(value, Sequence):
        items = [str(v) for v in value]
    else:
        raise ValueError(f"{name} must be a comma-separated string or a list, got {value!r}.")
    items = [v for v in items if v]
    if not items:
        raise ValueError(f"{name} must name at least one entry, got {value!r}.")
    return items


def main(
    bundle: str | Sequence[str],
    input: str | None = None,  # noqa: A002 - the flag users type
    output: str | None = None,
    configs: str | Sequence[str] = "inference,deploy",
) -> list[str]:
    """Segment the DICOM series under ``input`` with each bundle; returns (fire prints) the SEG files written.

    Args:
        bundle: bundle folder, or several comma-separated.
        input: folder holding the DICOM series (default ``$HOLOSCAN_INPUT_PATH``, which a MAP container sets).
        output: folder of the SEG file, one subfolder per bundle when several are given (default
            ``$HOLOSCAN_OUTPUT_PATH``).
        configs: bundle config names merged in order (e.g. ``inference,demo,deploy`` for the demo model).
    """
    from shared_nets.deploy.app import run_app

    input = input or os.environ.get("HOLOSCAN_INPUT_PATH")  # noqa: A001
    output = output or os.environ.get("HOLOSCAN_OUTPUT_PATH")
    if not input or not output:
        raise ValueError(
            "input and output folders are required (--input/--output, or $HOLOSCAN_INPUT_PATH/$HOLOSCAN_OUTPUT_PATH)."
        )
    written = run_app(_names(bundle, "bundle"), input, output, _names(configs, "configs"))
    return [str(f) for files in written.values() for f in files]
