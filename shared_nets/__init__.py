"""Shared network code for the SAM-adaptation MONAI bundles.

Sub-packages:
    sam:     build SAM variants (vit_b / vit_l / vit_h / tiny) and load official checkpoints.
    peft:    parameter-efficient fine-tuning layers (LoRA, FacT, SVD, adapters), freezing, merging.
    prompts: prompt simulation transforms and the guidance-channel codec.
    nets:    one module per method (MA-SAM, Med-SA, 3DSAM-adapter, S-SAM, H-SAM).
"""

__version__ = "0.1.0"
DIST_NAME = "sam-adapter-bundles"
