"""Fill a training cache whose first volume is bad while a worker thread is busy with the next one.

Used by ``test_bad_inputs.py``: ``python tests/reliability/bad_cache_worker.py DIR``. Writes a NaN volume
and a good one to ``DIR`` and builds the bundles' ``CacheDataset`` (``shared_nets.data.build_dataset``, as
every ``train.json`` does) over ``[bad, good, good]``. The good volumes go through a transform that runs
small torch operations for a while, as the real preprocessing of a big volume does, so that the cache's
worker thread is inside torch when the ``DataError`` of the bad volume reaches the top level. The process
must then exit 1 (the error), never abort.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.transforms import Compose, EnsureChannelFirstd, Lambdad

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from shared_nets.data import CheckFinited, LoadImaged, build_dataset

    torch.set_num_threads(1)
    out = sys.argv[1]
    bad = np.zeros((8, 8, 8), np.float32)
    bad[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), os.path.join(out, "bad.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), os.path.join(out, "good.nii.gz"))

    def busy(x):
        start = time.monotonic()
        while time.monotonic() - start < 2.0:  # many short GIL-releasing torch calls, like real preprocessing
            x = torch.as_tensor(x) * 1.0
        return x

    transform = Compose(
        [LoadImaged("image"), EnsureChannelFirstd("image"), CheckFinited("image"), Lambdad("image", busy)]
    )
    items = [{"image": os.path.join(out, name)} for name in ("bad.nii.gz", "good.nii.gz", "good.nii.gz")]
    build_dataset("CacheDataset", items, transform, num_workers=0)  # raises the bad volume's DataError


if __name__ == "__main__":
    main()
