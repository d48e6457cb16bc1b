"""Write a NIfTI volume as a DICOM series folder (one file per slice), for trying the bundles' DICOM input.

Command line (from the checkout)::

    python -m tools nifti_to_dicom --nifti ct.nii.gz --out_dir ct_dicom [--modality CT] [--orientation LPS]

The folder can then stand in a datalist where a ``.nii.gz`` would (``{"image": "ct_dicom"}``); MONAI's
``LoadImaged`` reads it with ITK. Geometry, rescale and identifiers are those of
:func:`shared_nets.dicom.write_dicom_series`; the series is written to a temporary folder and renamed.
"""

from __future__ import annotations

import os

__all__ = ["main"]


def main(
    nifti: str,
    out_dir: str,
    modality: str = "CT",
    orientation: str | None = "LPS",
    patient_id: str = "ANON",
    series_description: str = "converted from NIfTI",
) -> None:
    """Convert ``nifti`` to the DICOM series folder ``out_dir`` and print what was written.

    Args:
        nifti: the ``.nii``/``.nii.gz`` volume.
        out_dir: the series folder to create (must not exist or be empty).
        modality: ``CT`` (values stored as HU) or ``MR``.
        orientation: voxel axes of the written series (``LPS``: the usual axial layout); ``None`` or
            ``""`` keeps the file's stored axes.
        patient_id: Patient ID of the series.
        series_description: Series Description.
    """
    from shared_nets.dicom import nifti_to_dicom

    paths = nifti_to_dicom(
        nifti,
        out_dir,
        modality=modality,
        orientation=orientation or None,
        patient_id=str(patient_id),
        series_description=series_description,
    )
    print(f"wrote {len(paths)} slices to {os.path.abspath(out_dir)}")
