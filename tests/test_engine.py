"""shared_nets.engine: the gradient-clipping handler, the one call of MONAI's private engine step,
and the checkpoint loader's error classification (tiny networks, CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from shared_nets.engine import ClipGradients, RNGState, run_default_iteration


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    net[0].weight.requires_grad_(False)
    return net


def _backward(net: torch.nn.Module, scale: float = 1000.0) -> None:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    (net(x).square().sum() * scale).backward()


def _grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def test_clip_gradients_bounds_trainable_norm_and_leaves_frozen_alone():
    net = _net()
    frozen = net[0].weight
    frozen.grad = torch.full_like(frozen, 7.0)  # a stale gradient on a frozen parameter must not be touched
    _backward(net)
    trainable = [p for p in net.parameters() if p.requires_grad]
    before = [p.grad.clone() for p in trainable]
    assert _grad_norm(trainable) > 1.0
    engine = SimpleNamespace(amp=False, scaler=None, network=net, optimizer=None)
    ClipGradients(max_norm=1.0)(engine)
    assert _grad_norm(trainable) == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(frozen.grad, torch.full_like(frozen, 7.0))
    # the direction is kept: one common factor
    ratios = torch.cat([(a.grad / b).flatten() for a, b in zip(trainable, before)])
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))


def test_clip_gradients_below_max_norm_is_unchanged():
    net = _net()
    _backward(net, scale=1e-6)
    grads = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    ClipGradients(max_norm=1.0)(SimpleNamespace(amp=False, scaler=None, network=net, optimizer=None))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, [p for p in net.parameters() if p.requires_grad]))


class _RecordingScaler:
    def __init__(self):
        self.unscaled = []

    def unscale_(self, optimizer):
        self.unscaled.append(optimizer)


@pytest.mark.parametrize("amp,with_scaler,expected", [(True, True, 1), (False, True, 0), (True, False, 0)])
def test_clip_gradients_unscales_only_under_amp_with_a_scaler(amp, with_scaler, expected):
    net = _net()
    _backward(net)
    scaler = _RecordingScaler() if with_scaler else None
    opt = object()
    ClipGradients(1.0)(SimpleNamespace(amp=amp, scaler=scaler, network=net, optimizer=opt))
    if scaler is not None:
        assert scaler.unscaled == [opt] * expected


def test_clip_gradients_matches_the_bundle_lambda_in_a_trainer():
    """Attached to a SupervisedTrainer, the clipped gradients equal those of the JSON lambda it replaces."""

    def run(attach) -> list[torch.Tensor]:
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        data = [{"image": torch.randn(2, 4) * 100, "label": torch.randn(2, 2)} for _ in range(3)]
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=1,
            train_data_loader=data,
            network=net,
            optimizer=opt,
            loss_function=torch.nn.MSELoss(),
        )
        attach(trainer, net)
        trainer.run()
        return [p.grad.clone() for p in net.parameters() if p.requires_grad]

    def lambda_handler(trainer, net):
        from monai.engines import IterationEvents

        def clip(engine):
            if engine.amp and engine.scaler is not None:
                engine.scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)

        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, clip)

    new = run(lambda trainer, net: ClipGradients(1.0).attach(trainer))
    old = run(lambda_handler)
    assert all(torch.equal(a, b) for a, b in zip(new, old))
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in new]))) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_clip_gradients_rejects_non_positive_max_norm(bad):
    with pytest.raises(ValueError, match="max_norm"):
        ClipGradients(bad)


@pytest.mark.parametrize("engine_cls", [SupervisedTrainer, SupervisedEvaluator])
def test_monai_engines_keep_their_private_iteration(engine_cls):
    """run_default_iteration relies on MONAI's engines keeping their step in ``_iteration``."""
    assert callable(getattr(engine_cls, "_iteration", None))


def test_run_default_iteration_runs_the_engine_step():
    net = torch.nn.Linear(3, 1)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[], network=net, decollate=False)
    batch = {"image": torch.ones(2, 3), "label": torch.zeros(2, 1)}
    out = run_default_iteration(evaluator, batch)
    assert torch.allclose(out["pred"], net(torch.ones(2, 3)))


def test_rng_state_round_trips_numpy_global_state():
    rng = RNGState()
    np.random.seed(123)
    state = rng.state_dict()
    expected = np.random.random(5)
    np.random.random(7)
    rng.load_state_dict(state)
    assert np.array_equal(np.random.random(5), expected)


def _loader_engine():
    from ignite.engine import Engine

    return Engine(lambda e, b: None)


def _load(path, net, **kw):
    from shared_nets.engine import CheckpointLoader

    CheckpointLoader(load_path=str(path), load_dict={"model": net}, **kw)(_loader_engine())


def test_checkpoint_loader_loads_a_fitting_checkpoint(tmp_path):
    src, dst = _net(), torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    torch.save({"model": src.state_dict()}, tmp_path / "wrapped.pt")
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    for name in ("wrapped.pt", "bare.pt"):
        torch.nn.init.zeros_(dst[1].weight)
        _load(tmp_path / name, dst)
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


@pytest.mark.parametrize(
    "other,hints",
    [
        (torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)), "(mis-shaped tensors)"),
        (torch.nn.Sequential(torch.nn.Linear(4, 8)), "(missing keys)"),
        (torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2)), "(unexpected keys)"),
        (
            torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3, bias=False)),
            "(missing keys, mis-shaped tensors)",
        ),
    ],
)
def test_checkpoint_loader_names_what_does_not_fit(tmp_path, other, hints):
    torch.save({"model": other.state_dict()}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt' does not fit this network \(") as e:
        _load(tmp_path / "model.pt", _net())
    assert hints in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_loader_non_strict_allows_extra_and_missing_keys_but_not_shapes(tmp_path):
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    torch.save({"model": bigger.state_dict()}, tmp_path / "model.pt")
    _load(tmp_path / "model.pt", _net(), strict=False)
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    torch.save({"model": wrong.state_dict()}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="mis-shaped"):
        _load(tmp_path / "wrong.pt", _net(), strict=False)
    _load(tmp_path / "wrong.pt", _net(), strict_shape=False)  # MONAI loads only what fits


@pytest.mark.parametrize("content", [b"", b"\x00junk" * 100, "truncated"])
def test_checkpoint_loader_unreadable_files(tmp_path, content):
    path = tmp_path / "model.pt"
    if content == "truncated":
        torch.save({"model": _net().state_dict()}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.pt' is not a readable PyTorch checkpoint \("):
        _load(path, _net())


def test_checkpoint_loader_missing_file_and_missing_entry(tmp_path):
    from shared_nets.engine import CheckpointLoader

    with pytest.raises(FileNotFoundError, match="does not exist; train the bundle first"):
        _load(tmp_path / "absent.pt", _net())
    net = _net()
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = CheckpointLoader(load_path=str(tmp_path / "model.pt"), load_dict={"model": net, "optimizer": opt})
    with pytest.raises(ValueError, match=r"does not fit this network \(no 'optimizer' entry\)"):
        loader(_loader_engine())


def test_checkpoint_loader_check_runs_no_state_dict_hooks(tmp_path):
    """The key check reads the module tree: a layer whose ``state_dict()`` does work (an SVD) is not asked."""

    class Counting(torch.nn.Linear):
        calls = 0

        def _save_to_state_dict(self, *args):
            Counting.calls += 1
            super()._save_to_state_dict(*args)

    net = torch.nn.Sequential(Counting(2, 2))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    Counting.calls = 0
    _load(tmp_path / "model.pt", net)
    assert Counting.calls == 0
