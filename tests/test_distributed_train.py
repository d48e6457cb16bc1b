"""multi_gpu_train.json helpers in shared_nets.distributed (process group, per-rank logging and handlers) and
shared_nets.peft.log_trainable_parameters, in one process: other ranks are simulated by patching
torch.distributed's rank queries."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.handlers import CheckpointLoader, LrScheduleHandler, StatsHandler, TensorBoardStatsHandler

from shared_nets import distributed as D
from shared_nets.peft import log_trainable_parameters, trainable_parameter_report


def _as_rank(monkeypatch, rank: int, world: int = 2) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)


def _train_handlers(tmp_path) -> list:
    """train#handlers of the bundles (LR schedule first, console output last), plus what finetune.json appends."""
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    schedule = LrScheduleHandler(torch.optim.lr_scheduler.StepLR(opt, 1))
    console = [ProgressBar(), StatsHandler(), TensorBoardStatsHandler(log_dir=str(tmp_path))]
    loader = CheckpointLoader(load_path=str(tmp_path / "model_btcv.pt"), load_dict={"model": torch.nn.Linear(1, 1)})
    return [schedule, *console, loader]


def test_main_process_handlers_keeps_all_on_rank_zero_and_without_a_group(monkeypatch, tmp_path):
    handlers = _train_handlers(tmp_path)
    assert D.main_process_handlers(handlers) == handlers  # no process group
    _as_rank(monkeypatch, 0)
    assert D.main_process_handlers(handlers) == handlers


def test_main_process_handlers_drops_console_output_by_type_on_other_ranks(monkeypatch, tmp_path):
    _as_rank(monkeypatch, 1)
    handlers = _train_handlers(tmp_path)
    kept = D.main_process_handlers(handlers)
    assert kept == [handlers[0], handlers[-1]]  # the fine-tuning CheckpointLoader stays on every rank
    plain = handlers[:-1]  # train.json alone: the same as the slice the JSON used
    assert D.main_process_handlers(plain) == plain[: -3 if dist.get_rank() > 0 else None]


@pytest.mark.parametrize("rank,level", [(0, logging.INFO), (1, logging.WARNING), (3, logging.WARNING)])
def test_quiet_other_ranks(monkeypatch, rank, level):
    _as_rank(monkeypatch, rank, world=4)
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    D.quiet_other_ranks(trainer, evaluator)
    assert trainer.logger.level == evaluator.logger.level == level


def test_init_process_group_joins_once_and_selects_the_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    D.init_process_group(torch.device("cpu"))
    assert calls == [("init", {"backend": "gloo"})]

    calls.clear()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    D.init_process_group(torch.device("cuda:1"))
    assert calls == [("set_device", torch.device("cuda:1"))]

    calls.clear()
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    D.init_process_group(torch.device("cuda:0"))
    assert calls == [("init", {"backend": "nccl"}), ("set_device", torch.device("cuda:0"))]


def test_shutdown_waits_then_leaves_only_with_a_group(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    D.shutdown()
    assert calls == []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    D.shutdown()
    assert calls == ["barrier", "destroy"]


def test_log_trainable_parameters_on_rank_zero_only(monkeypatch, caplog):
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    net[0].weight.requires_grad_(False)
    with caplog.at_level(logging.INFO, logger="sam3d_adapter"):
        report = log_trainable_parameters(net, "sam3d_adapter")
    # the text the bundle's JSON logged: 'trainable parameters:\n' + str(report)
    expected = "trainable parameters:\n" + str(trainable_parameter_report(net))
    assert [r.getMessage() for r in caplog.records] == [expected]
    assert report.trainable == 3 + 3 + 1
    caplog.clear()
    with caplog.at_level(logging.INFO):
        log_trainable_parameters(net, logging.getLogger("s_sam"), title="S-SAM trainable parameters")
    assert caplog.records[0].getMessage().startswith("S-SAM trainable parameters:\n| ")

    caplog.clear()
    _as_rank(monkeypatch, 1)
    with caplog.at_level(logging.INFO):
        assert log_trainable_parameters(net, "sam3d_adapter") is None
    assert caplog.records == []
