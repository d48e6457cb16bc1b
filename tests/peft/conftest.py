"""Fixtures for the shared_nets.peft tests: a seeded tiny SAM at 64 px and a perturbation helper."""

from __future__ import annotations

import fnmatch

import pytest
import torch

from shared_nets.sam import build_sam

#: Name globs of every PEFT parameter our layers create.
PEFT_PARAM_GLOBS = ("*lora_*", "*fact_*", "*.scale", "*.shift")


def _perturb(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> int:
    """Add Gaussian noise to the PEFT parameters of ``module``; returns how many tensors changed."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(fnmatch.fnmatchcase(name, pat) for pat in PEFT_PARAM_GLOBS):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
                n += 1
    return n


@pytest.fixture
def tiny_sam():
    torch.manual_seed(0)
    return build_sam("tiny", img_size=64).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def perturb():
    return _perturb
