"""Performance switches change no result beyond numerical tolerance.

Re-prompting with cached image embeddings (Med-SA, 3DSAM-adapter) gives the uncached answer and
the cache follows the image (the benchmark's real-size re-prompt FLOP ratio: tests/tools/test_bench.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared_nets.med_sa import build_med_sa
from shared_nets.med_sa.network import MEDSA_OFFICIAL_CODE_SETTINGS, MedSA
from shared_nets.sam.cache import EmbeddingCache
from shared_nets.sam3d_adapter.network import SAM3DAdapter

REPO = Path(__file__).resolve().parents[1]


def _medsa(**kw) -> MedSA:
    torch.manual_seed(0)
    return build_med_sa(variant="tiny", img_size=32, patch_size=8, max_points=4, max_depth=2, **kw).eval()


def _medsa_input(clicks, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 4, 32, 32, 2)
    x[:, :1] = torch.randn(1, 1, 32, 32, 2, generator=g)
    for channel, i, j, k in clicks:
        x[0, channel, i, j, k] = 1
    x[0, 3, 4:20, 6:24, :] = 1  # a box on both slices
    return x


def _sam3d(**kw) -> SAM3DAdapter:
    from shared_nets.sam3d_adapter import build_sam3d_adapter

    torch.manual_seed(0)
    return build_sam3d_adapter("tiny", img_size=32, sam_input_size=64, window_size=2, **kw).eval()


def _sam3d_input(clicks, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 3, 32, 32, 32)
    x[:, :1] = torch.randn(1, 1, 32, 32, 32, generator=g)
    for channel, i, j, k in clicks:
        x[0, channel, i, j, k] = 1
    return x


CASES = {
    "med_sa": (_medsa, _medsa_input, [(1, 10, 12, 0)], [(1, 10, 12, 0), (2, 14, 20, 1), (1, 8, 8, 1)]),
    "med_sa_official": (
        lambda **kw: _medsa(**MEDSA_OFFICIAL_CODE_SETTINGS, **kw),
        _medsa_input,
        [(1, 10, 12, 0)],
        [(1, 10, 12, 0), (2, 14, 20, 1)],
    ),
    "sam3d_adapter": (
        lambda **kw: _sam3d(cache_image_embedding=True, **kw),
        _sam3d_input,
        [(1, 16, 16, 16)],
        [(1, 16, 16, 16), (2, 20, 12, 16), (1, 4, 5, 6)],
    ),
}


def _caches(net: torch.nn.Module) -> list[EmbeddingCache]:
    return [v for m in net.modules() for v in vars(m).values() if isinstance(v, EmbeddingCache)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_reprompt_equals_uncached_and_follows_the_image(name):
    build, make, first_clicks, new_clicks = CASES[name]
    net = build()
    (cache,) = _caches(net)
    first, again = make(first_clicks), make(new_clicks)
    with torch.no_grad():
        net(first)
        assert cache.misses == 1
        cached = net(again)  # a new click on the same image: the encoder does not run again
        assert (cache.hits, cache.misses) == (1, 1)
        size, cache.size = cache.size, 0
        uncached = net(again)  # caching off: the plain forward
        cache.size = size
        torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
        assert not torch.equal(cached, net(first))  # the new clicks changed the answer

        other = make(new_clicks, seed=2)  # another image, same clicks: a miss, the other image's answer
        hits = cache.hits
        y_other = net(other)
        assert cache.hits == hits
        cache.size = 0
        torch.testing.assert_close(y_other, net(other), atol=1e-5, rtol=1e-5)
        cache.size = size

        for p in net.parameters():  # new weights invalidate every entry
            p.add_(0.01)
            break
        misses = cache.misses
        net(again)
        assert cache.misses == misses + 1
    hits = cache.hits
    net(again)  # with autograd: never served from the cache
    assert cache.hits == hits and not cache.entries


def test_cache_keeps_the_most_recent_windows():
    net = _sam3d(cache_image_embedding=True, cache_size=2)
    x = [_sam3d_input([(1, 16, 16, 16)], seed=s) for s in range(3)]
    (cache,) = _caches(net)
    with torch.no_grad():
        for xi in (x[0], x[1], x[0], x[2]):  # x[1] is the least recently used when x[2] arrives
            net(xi)
        assert (cache.hits, cache.misses) == (1, 3)
        net(x[0])
        net(x[1])
    assert (cache.hits, cache.misses) == (2, 4)
    with pytest.raises(ValueError, match="cache size"):
        EmbeddingCache(-1, net)


def test_sam3d_decoder_static_part_matches_forward():
    net = _sam3d()
    with torch.no_grad():
        image = torch.randn(2, 1, 32, 32, 32)
        feats = net.encode(image)
        for prompted in ([3], [0, 3], [1, 2]):
            static = net.decoder.static_part(feats, image, prompted)
            torch.testing.assert_close(
                net.decoder.forward_with_static(feats, static, prompted, net.patch_size),
                net.decoder(feats, image, net.patch_size),
                atol=1e-5,
                rtol=1e-5,
            )


# ---------------------------------------------------------------------------- gradient checkpointing
def _grad_ckpt_cases():
    from shared_nets.h_sam import build_h_sam
    from shared_nets.ma_sam import build_ma_sam
    from shared_nets.s_sam import build_s_sam
    from shared_nets.sam import enable_gradient_checkpointing

    def toggle_blocks(blocks):
        return lambda on: enable_gradient_checkpointing(blocks, on)

    def medsa():
        net = _medsa(full_finetune=True)
        return net, toggle_blocks(net.image_encoder.blocks), (_medsa_input([(1, 10, 12, 0)]),), {}

    def ssam():
        net = build_s_sam(variant="tiny", img_size=32, patch_size=8, class_names=("liver", "spleen"))
        return net, toggle_blocks(net.sam.image_encoder.blocks), (torch.randn(1, 1, 32, 32, 2),), {}

    def hsam():
        net = build_h_sam(variant="tiny", img_size=32, patch_size=8, num_classes=3, finetune="lora")
        label = torch.randint(0, 4, (1, 1, 32, 32, 2)).float()
        return net, toggle_blocks(net.image_encoder.blocks), (torch.randn(1, 1, 32, 32, 2),), {"label": label}

    def masam():
        net = build_ma_sam(variant="tiny", img_size=32, patch_size=8, num_classes=3, fact_rank=4, num_slices=2)
        return net, lambda on: setattr(net, "gradient_checkpointing", on), (torch.randn(1, 1, 32, 32, 2),), {}

    def sam3d():
        net = _sam3d(full_finetune=True)
        return net, lambda on: setattr(net, "use_checkpoint", on), (_sam3d_input([(1, 16, 16, 16)]),), {}

    return {"med_sa": medsa, "s_sam": ssam, "h_sam": hsam, "ma_sam": masam, "sam3d_adapter": sam3d}


@pytest.mark.parametrize("name", ["med_sa", "s_sam", "h_sam", "ma_sam", "sam3d_adapter"])
def test_gradient_checkpointing_keeps_outputs_and_gradients(name):
    torch.manual_seed(0)
    net, toggle, args, kwargs = _grad_ckpt_cases()[name]()
    net.train()
    first_block = next(
        m for m in net.modules() if isinstance(m, torch.nn.ModuleList) and "block" in type(m[0]).__name__.lower()
    )[0]
    calls = []
    norm = next(m for m in first_block.modules() if isinstance(m, torch.nn.LayerNorm))  # runs inside the block
    norm.register_forward_hook(lambda *a: calls.append(1))
    results = []
    for on in (False, True):
        toggle(on)
        calls.clear()
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # dropout / noise draw the same numbers in both runs
        out = net(*args, **kwargs)
        out = out[-1] if isinstance(out, (list, tuple)) else out
        out.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
        assert len(calls) == (2 if on else 1)  # checkpointed: the block runs again in the backward pass
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=1e-5)
    assert g0 and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------- dataset_type switch
BUNDLES = ["ma_sam", "med_sa", "s_sam", "h_sam", "sam3d_adapter"]


def _first_batch(bundle: str, data_dir: Path, dataset_type: str, cache_dir: Path) -> dict:
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    root = REPO / "bundles" / bundle
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "train.json"), str(root / "configs" / "demo.json")])
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update(
        {
            "bundle_root": str(root),
            "dataset_dir": str(data_dir),
            "dataset_type": dataset_type,
            "persistent_cache_dir": str(cache_dir),
            "num_workers": 0,
        }
    )
    parser["train#datalist"] = parser.get_parsed_content("train#datalist")[:1]  # one volume is enough
    set_determinism(seed=0)
    try:
        loader = parser.get_parsed_content("train#dataloader")
        assert type(loader.dataset).__name__ == dataset_type
        return next(iter(loader))
    finally:
        set_determinism(seed=None)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_dataset_types_give_the_same_first_batch(bundle, demo_data, tmp_path):
    batches = {
        t: _first_batch(bundle, demo_data, t, tmp_path / "cache")
        for t in ("CacheDataset", "Dataset", "PersistentDataset")
    }
    assert any((tmp_path / "cache" / "train").iterdir())  # PersistentDataset wrote its cache there
    ref = batches["CacheDataset"]
    for t, batch in batches.items():
        assert batch.keys() == ref.keys(), t
        for k in ("image", "label"):
            torch.testing.assert_close(
                torch.as_tensor(batch[k]), torch.as_tensor(ref[k]), msg=lambda m, t=t, k=k: f"{t} {k}: {m}"
            )
