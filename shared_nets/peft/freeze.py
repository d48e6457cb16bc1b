"""Freezing by parameter-name globs and a trainable-parameter report (the papers' "tunable parameters" tables)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

__all__ = [
    "freeze_except",
    "ParameterReport",
    "ParameterRow",
    "trainable_parameter_report",
    "log_trainable_parameters",
]


def freeze_except(model: nn.Module, patterns: str | Sequence[str]) -> int:
    """Set ``requires_grad`` to False on every parameter except those matching a glob, which are set to True.

    Names are ``model.named_parameters()`` names (shared parameters once, under their first
    name), matched with :func:`fnmatch.fnmatchcase`, e.g. ``"*.lora_*"``, ``"mask_decoder.*"``,
    ``"*fact_*"``, ``"*norm*"``.

    Args:
        model: the model to freeze, in place.
        patterns: one glob or a sequence of globs; an empty sequence freezes everything.

    Returns:
        The number of trainable parameter values afterwards.

    Raises:
        ValueError: if a pattern is not a non-empty string or matches no parameter (typo protection).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"patterns must be non-empty glob strings, got {bad!r}.")
    named = list(model.named_parameters())
    unused = [p for p in patterns if not any(fnmatchcase(name, p) for name, _ in named)]
    if unused:
        example = named[0][0] if named else "<model has no parameters>"
        raise ValueError(
            f"patterns {unused} match no parameter name of {type(model).__name__} (names look like {example!r})."
        )
    total = 0
    for name, param in named:
        keep = any(fnmatchcase(name, p) for p in patterns)
        param.requires_grad_(keep)
        total += param.numel() if keep else 0
    return total


@dataclass
class ParameterRow:
    """Parameter counts of one top-level child module (``name`` ``"(own)"`` for the root's own parameters)."""

    name: str
    trainable: int
    total: int


@dataclass
class ParameterReport:
    """Trainable-parameter summary of a model.

    Attributes:
        trainable: trainable parameter values (each shared parameter once).
        total: all parameter values of the model.
        percent: ``100 * trainable / (total_reference or total)``.
        total_reference: the denominator used for ``percent`` when given (e.g. SAM's total).
        rows: per top-level child module.
    """

    trainable: int
    total: int
    percent: float
    total_reference: int | None = None
    rows: list[ParameterRow] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["| module | trainable | total | trainable % |", "|---|---:|---:|---:|"]
        for row in self.rows:
            share = 100.0 * row.trainable / row.total if row.total else 0.0
            lines.append(f"| {row.name} | {row.trainable:,} | {row.total:,} | {share:.2f} |")
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        lines.append(f"| **all** | {self.trainable:,} | {self.total:,} | {share:.2f} |")
        if self.total_reference is not None:
            lines.append(f"| **of reference** | {self.trainable:,} | {self.total_reference:,} | {self.percent:.2f} |")
        return "\n".join(lines)


def trainable_parameter_report(model: nn.Module, total_reference: int | None = None) -> ParameterReport:
    """Count trainable and total parameters, overall and per top-level child module.

    Args:
        model: any module.
        total_reference: denominator for ``percent`` (e.g. the parameter count of plain SAM, so
            the share matches the papers' "% of SAM's parameters"); default the model's total.

    Returns:
        A :class:`ParameterReport`; ``str(report)`` is a markdown table.
    """
    if total_reference is not None and (
        isinstance(total_reference, bool) or not isinstance(total_reference, int) or total_reference <= 0
    ):
        raise ValueError(f"total_reference must be None or a positive integer, got {total_reference!r}.")
    seen: set[int] = set()

    def count(params) -> tuple[int, int]:
        trainable = total = 0
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    rows = []
    own = count(model.parameters(recurse=False))
    if own[1]:
        rows.append(ParameterRow("(own)", *own))
    for name, child in model.named_children():
        t, n = count(child.parameters())
        if n:
            rows.append(ParameterRow(name, t, n))
    trainable = sum(r.trainable for r in rows)
    total = sum(r.total for r in rows)
    denominator = total_reference if total_reference is not None else total
    percent = 100.0 * trainable / denominator if denominator else 0.0
    return ParameterReport(
        trainable=trainable, total=total, percent=percent, total_reference=total_reference, rows=rows
    )


def log_trainable_parameters(
    model: nn.Module, logger: logging.Logger | str, title: str = "trainable parameters"
) -> ParameterReport | None:
    """Log ``"<title>:"`` and the :func:`trainable_parameter_report` table at INFO level, on rank 0 only (in a
    multi-GPU run every rank holds the same network). Returns the report, or None on the other ranks.

    Args:
        model: the network (before a ``DistributedDataParallel`` wrapper, so the rows are its modules).
        logger: a logger or a logger name (e.g. the bundle's).
        title: the line above the table.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
        return None
    report = trainable_parameter_report(model)
    log = logging.getLogger(logger) if isinstance(logger, str) else logger
    log.info("%s:\n%s", title, report)
    return report
