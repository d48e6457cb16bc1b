"""freeze_except (globs, typo protection) and trainable_parameter_report (counts, reference share, table)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared_nets.peft import ParameterReport, freeze_except, inject_lora, trainable_parameter_report


def test_freeze_except_globs(tiny_sam):
    inject_lora(tiny_sam.image_encoder, r=2)
    decoder = sum(p.numel() for p in tiny_sam.mask_decoder.parameters())
    lora = 4 * 2 * (2 * 64 + 64 * 2)
    assert freeze_except(tiny_sam, ["*.lora_*", "mask_decoder.*"]) == lora + decoder
    for name, p in tiny_sam.named_parameters():
        assert p.requires_grad == (".lora_" in name or name.startswith("mask_decoder.")), name
    assert freeze_except(tiny_sam, "prompt_encoder.*") == sum(p.numel() for p in tiny_sam.prompt_encoder.parameters())
    assert not any(p.requires_grad for p in tiny_sam.mask_decoder.parameters())
    assert freeze_except(tiny_sam, []) == 0


def test_freeze_except_typo_raises_and_changes_nothing(tiny_sam):
    before = [p.requires_grad for p in tiny_sam.parameters()]
    with pytest.raises(ValueError, match=r"\['\*\.lroa_\*'\] match no parameter"):
        freeze_except(tiny_sam, ["mask_decoder.*", "*.lroa_*"])
    assert [p.requires_grad for p in tiny_sam.parameters()] == before
    with pytest.raises(ValueError, match="non-empty glob"):
        freeze_except(tiny_sam, [""])


def test_report_counts_and_table(tiny_sam):
    freeze_except(tiny_sam, ["mask_decoder.*"])
    decoder = sum(p.numel() for p in tiny_sam.mask_decoder.parameters())
    total = sum(p.numel() for p in tiny_sam.parameters())
    report = trainable_parameter_report(tiny_sam)
    assert isinstance(report, ParameterReport)
    assert (report.trainable, report.total) == (decoder, total)
    assert report.percent == pytest.approx(100 * decoder / total)
    assert [r.name for r in report.rows] == ["image_encoder", "prompt_encoder", "mask_decoder"]
    assert [r.trainable for r in report.rows] == [0, 0, decoder]
    table = str(report)
    assert table.splitlines()[0] == "| module | trainable | total | trainable % |"
    assert f"| mask_decoder | {decoder:,} | {decoder:,} | 100.00 |" in table
    ref = trainable_parameter_report(tiny_sam, total_reference=10 * total)
    assert ref.percent == pytest.approx(10 * decoder / total)
    assert "of reference" in str(ref)
    with pytest.raises(ValueError, match="total_reference"):
        trainable_parameter_report(tiny_sam, total_reference=0)


def test_report_counts_shared_and_own_parameters_once():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.own = nn.Parameter(torch.zeros(3))
            self.a = nn.Linear(4, 4)
            self.b = nn.Sequential(self.a, nn.Linear(4, 2, bias=False))

    report = trainable_parameter_report(Net())
    assert report.total == 3 + 20 + 8
    assert [(r.name, r.total) for r in report.rows] == [("(own)", 3), ("a", 20), ("b", 8)]
