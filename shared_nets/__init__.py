"""Shared network code for the SAM-adaptation MONAI bundles.

Core sub-packages:
    sam:     build SAM variants (vit_b / vit_l / vit_h / lite / tiny), load official checkpoints, and the
             pieces several methods share (slice stacking, block-by-block encoder runs, mask decoding).
    peft:    parameter-efficient fine-tuning layers (LoRA, FacT, SVD, adapters), freezing, merging.
    prompts: prompt simulation and checks, the guidance-channel codec, prompted inference.

One package per method: ma_sam, med_sa, sam3d_adapter, s_sam, h_sam (network.py, its layers, transforms,
data). ``nets`` only serves the import paths used before that layout. See docs/architecture.md.
"""

__version__ = "0.1.0"
DIST_NAME = "sam-adapter-bundles"
