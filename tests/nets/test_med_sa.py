"""Med-SA network: contract shapes, identity at init, SD-Trans, HyP-Adpt, freezing, counts, bad input."""

from __future__ import annotations

import pytest
import torch

from shared_nets.med_sa import build_med_sa
from shared_nets.med_sa.blocks import HyPAdapter
from shared_nets.med_sa.network import MEDSA_OFFICIAL_CODE_SETTINGS, MedSA
from shared_nets.peft import trainable_parameter_report
from shared_nets.sam import build_sam

IMG = 32  # tiny SAM at 32 px, patch 8 -> 4x4 tokens (one window)


def tiny(**kw) -> MedSA:
    torch.manual_seed(0)
    args = dict(variant="tiny", img_size=IMG, patch_size=8, max_points=4, max_depth=4)
    args.update(kw)
    return build_med_sa(**args)


def volume(b=1, d=1, c=1, size=IMG, clicks=((0, 10, 12, 0),), box=None, seed=1) -> torch.Tensor:
    """``[B, c + 3, size, size, d]`` with clicks ``(item, i, j, k)`` (positive) and an optional box."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(b, c + 3, size, size, d)
    x[:, :c] = torch.randn(b, c, size, size, d, generator=g)
    for item, i, j, k in clicks:
        x[item, c, i, j, k] = 1
    if box is not None:
        item, i0, j0, i1, j1 = box
        x[item, c + 2, i0:i1, j0:j1, :] = 1
    return x


@pytest.mark.parametrize(
    "b, d, c, size, kw",
    [
        (1, 1, 1, IMG, {}),  # 2D, grey
        (2, 3, 1, 24, {}),  # 3D chunk, resized inside
        (1, 2, 3, IMG, {"prompt_scope": "slice", "automatic": True}),  # RGB
        (1, 2, 1, IMG, {"hyp_adapter": False, "depth_adapter": True, "adapter_act": "gelu"}),
        (1, 1, 1, IMG, {"prompt_fusion": "concat"}),
        (1, 1, 1, IMG, {"decoder_adapters": False}),
    ],
)
def test_shapes(b, d, c, size, kw):
    net = tiny(in_channels=c, **kw)
    x = volume(b=b, d=d, c=c, size=size, clicks=[(i, 5, 6, 0) for i in range(b)])
    y = net(x)
    assert y.shape == (b, 2, size, size, d)
    assert torch.isfinite(y).all()
    assert torch.all(y[:, 0] == 0)  # background logit 0: softmax = sigmoid(object logit)


def test_identity_to_sam_at_init_2d():
    """Zero-initialised adapters: 2D Med-SA equals frozen SAM (encoder embedding and mask)."""
    torch.manual_seed(0)
    sam = build_sam("tiny", img_size=IMG, patch_size=8).eval()
    net = tiny().eval()
    x = volume(clicks=[(0, 10, 12, 0)], box=(0, 4, 6, 20, 22))
    img = x[:, :1, ..., 0].expand(-1, 3, -1, -1)
    with torch.no_grad():
        ref_emb = sam.image_encoder(img)
        assert torch.allclose(net.encode(img, 1), ref_emb, atol=1e-5)
        coords, labels, boxes, valid = net.prompts(x[:, 1:])
        sparse, dense = net.embed_prompts(coords, labels, boxes, valid)
        ref, _ = sam.mask_decoder.predict_masks(ref_emb, sam.prompt_encoder.get_dense_pe(), sparse, dense)
        ref = torch.nn.functional.interpolate(ref[:, :1], size=(IMG, IMG), mode="bilinear", align_corners=False)
        out = net(x)[:, 1, ..., 0]
    assert torch.allclose(out, ref[:, 0], atol=1e-4)


def test_init_differs_from_sam_only_where_the_paper_implies():
    """SD-Trans adds the depth attention at init (3D differs from per-slice SAM); off, 3D equals SAM per slice.
    The official code's random adapter init changes even 2D outputs."""
    torch.manual_seed(0)
    sam = build_sam("tiny", img_size=IMG, patch_size=8).eval()
    imgs = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        ref = sam.image_encoder(imgs)
        assert not torch.allclose(tiny().eval().encode(imgs, 3), ref, atol=1e-3)
        assert torch.allclose(tiny(sd_trans=False).eval().encode(imgs, 3), ref, atol=1e-5)
        assert not torch.allclose(tiny(adapter_zero_init=False).eval().encode(imgs[:1], 1), ref[:1], atol=1e-3)


def test_sd_trans_mixes_slices_and_respects_windows():
    imgs = torch.randn(3, 3, 64, 64)  # 8x8 tokens; tiny block 0 uses 4x4 windows
    changed = imgs.clone()
    changed[0] += 1.0
    for sd_trans, mixes in ((True, True), (False, False)):
        net = tiny(img_size=64, sd_trans=sd_trans).eval()
        with torch.no_grad():
            a, b = net.encode(imgs, 3), net.encode(changed, 3)
        assert torch.allclose(a[1:], b[1:], atol=1e-6) is not mixes  # slices 1, 2 see slice 0 only through SD-Trans
    # the depth branch of a windowed block mixes a token only with the same position in other slices
    net = tiny(img_size=64).eval()
    blk = net.image_encoder.blocks[0]
    assert blk.window_size > 0
    tokens = torch.randn(3, 8, 8, 64)
    moved = tokens.clone()
    moved[0, 5, 6] += 1.0
    with torch.no_grad():
        diff = (blk.depth_branch(blk.norm1(moved), 3) - blk.depth_branch(blk.norm1(tokens), 3)).abs().sum(dim=(0, 3))
    assert diff[5, 6] > 0
    diff[5, 6] = 0
    assert torch.all(diff == 0)


def test_hyp_adapter_depends_on_prompt():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32)
    p1, p2 = torch.randn(2, 8), torch.randn(2, 8)
    for fusion in ("hyper", "add", "concat"):
        ad = HyPAdapter(32, 4, 8, fusion=fusion, zero_init=False)
        assert not torch.allclose(ad(x, p1), ad(x, p2))
        assert torch.allclose(ad(x[:1], p1[:1]), ad(x, p1)[:1], atol=1e-6)  # per-sample weights
    plain = HyPAdapter(32, 4, 8, fusion="none", zero_init=False)
    assert torch.allclose(plain(x, p1), plain(x, p2))
    # in the network: different clicks -> different prompt embedding and first-adapter output
    net = tiny()
    tr = net.mask_decoder.transformer
    embs = []
    for click in ((0, 3, 4, 0), (0, 20, 25, 0)):
        coords, labels, boxes, valid = net.prompts(volume(clicks=[click])[:, 1:])
        sparse, _ = net.embed_prompts(coords, labels, boxes, valid)
        embs.append(tr.prompt_embedding(sparse))
    assert not torch.allclose(embs[0], embs[1])
    hyp = tr.layers[0].hyp_adapter
    q = torch.randn(1, 11, 32)
    assert not torch.allclose(hyp.bottleneck(q, embs[0]), hyp.bottleneck(q, embs[1]))


def test_gradients_only_in_adapters():
    net = tiny()
    x = volume(d=2, clicks=[(0, 10, 12, 0), (0, 20, 5, 1)])
    net(x)[:, 1].sum().backward()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("adapter" in n or "prompt_reduce" in n for n in trainable)
    for name, p in net.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert not any(p.requires_grad for p in net.prompt_encoder.parameters())
    official = tiny(**MEDSA_OFFICIAL_CODE_SETTINGS)
    assert all(p.requires_grad for p in official.mask_decoder.parameters())
    full = tiny(full_finetune=True)
    unused = ("mask_decoder.iou_prediction_head.", "prompt_encoder.mask_downscaling.")  # no IoU loss, no masks
    assert all(p.requires_grad != n.startswith(unused) for n, p in full.named_parameters())


def test_parameter_counts_vs_paper():
    """Paper: ~13M trainable on ViT-H (2 %); the official code's settings train 82.9M (docs/deviations.md,
    "adapter width")."""
    with torch.device("meta"):
        paper = build_med_sa("vit_h")
        official = build_med_sa("vit_h", **MEDSA_OFFICIAL_CODE_SETTINGS)
    rep = trainable_parameter_report(paper)
    sam_total = 637_026_048 + 4_058_340 + 6_220
    enc = sum(p.numel() for n, p in paper.named_parameters() if p.requires_grad and n.startswith("image_encoder"))
    assert enc == 32 * 2 * (2 * 1280 * 80 + 80 + 1280)  # two D/16 adapters per block
    assert rep.trainable == 13_508_768
    assert 1.9 < 100 * rep.trainable / sam_total < 2.2
    assert rep.total - rep.trainable == sam_total  # frozen part is exactly SAM
    assert trainable_parameter_report(official).trainable == 82_855_140


def test_official_rel_pos_tables_are_loaded(tmp_path):
    torch.manual_seed(3)
    src = build_sam("tiny", img_size=64)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "sam_tiny.pth"
    torch.save(src.state_dict(), path)
    net = build_med_sa("tiny", checkpoint=str(path), img_size=64, max_points=4)
    for blk_src, blk in zip(src.image_encoder.blocks, net.image_encoder.blocks):
        assert torch.equal(blk.attn.rel_pos_h, blk_src.attn.rel_pos_h)
        assert blk.attn.rel_pos_h.abs().sum() > 0
    resized = build_med_sa("tiny", checkpoint=str(path), img_size=128, max_points=4)
    assert resized.image_encoder.blocks[1].attn.rel_pos_h.shape[0] == 2 * (128 // 16) - 1  # a global block


def test_box_and_click_decoding():
    net = tiny(prompt_scope="slice")
    x = volume(size=16, d=2, clicks=[(0, 3, 5, 1)], box=(0, 2, 4, 8, 10))
    coords, labels, boxes, valid = net.prompts(x[:, 1:])
    s = IMG / 16
    assert labels.tolist() == [[-1] * 4, [1, -1, -1, -1]]
    assert coords[1, 0].tolist() == [5 * s, 3 * s]  # (x=j, y=i) in SAM's frame
    assert valid.tolist() == [True, True]
    assert boxes[0].tolist() == [4 * s, 2 * s, 9 * s, 7 * s]  # last pixel inclusive, as SAM's boxes
    chunk = tiny(prompt_scope="chunk")
    _, labels, _, _ = chunk.prompts(x[:, 1:])
    assert labels[:, 0].tolist() == [1, 1]  # the chunk's click reaches every slice


def test_unprompted_slices_are_background_and_automatic_mode():
    x = volume(d=2, clicks=[(0, 10, 12, 0)])
    net = tiny(prompt_scope="slice")
    rows = []
    net.mask_decoder.transformer.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    y = net(x)
    assert rows == [1]  # the decoder ran for the prompted slice only
    assert torch.all(y[0, 1, ..., 1] == -20.0)
    assert not torch.all(y[0, 1, ..., 0] == -20.0)
    empty = volume(clicks=[])
    with pytest.raises(ValueError, match="no prompt.*automatic=True"):
        tiny()(empty)
    assert torch.isfinite(tiny(automatic=True)(empty)).all()


def test_embedding_cache_reuses_encoder_for_new_clicks():
    net = tiny(embedding_cache=2).eval()
    x1 = volume(clicks=[(0, 10, 12, 0)])
    x2 = x1.clone()
    x2[0, 2, 20, 20, 0] = 1  # a corrective negative click, same image
    other = x1.clone()
    other[0, 0] += 1  # another image (e.g. the next window)
    with torch.no_grad():
        net(x1)
        net(other)
        y2 = net(x2)  # same image as x1, new clicks: embedding reused
        assert net.cache_hits == 1
        net.clear_cache()
        assert torch.allclose(net(x2), y2)
        assert net.cache_hits == 1
        for p in net.image_encoder.blocks[0].space_adapter.parameters():
            p.add_(0.1)  # new weights invalidate the cache
        net(x2)
        assert net.cache_hits == 1
        net(x2)
        assert net.cache_hits == 2
    net(x2)  # with autograd: never cached
    assert net.cache_hits == 2
    assert tiny(embedding_cache=0).eval().embedding_cache == 0


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(1, 4, IMG, IMG), r"\[B, 4, H, W, D\]"),
        (torch.zeros(1, 5, IMG, IMG, 1), r"\[B, 4, H, W, D\]"),
        (volume(d=6), "chunk of 6 slices but max_depth=4"),
        (volume(clicks=[(0, i, i, 0) for i in range(5)]), "max_points=4"),
    ],
)
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        tiny()(x)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_classes": 3}, "num_classes must be 2"),
        ({"in_channels": 2}, "in_channels"),
        ({"prompt_fusion": "multiply"}, "prompt_fusion"),
        ({"prompt_scope": "volume"}, "prompt_scope"),
        ({"adapter_act": "tanh"}, "adapter_act"),
        ({"adapter_ratio": 0}, "ratio"),
        ({"max_points": 0}, "max_points"),
        ({"sd_trans": "yes"}, "sd_trans"),
        ({"embedding_cache": -1}, "embedding_cache"),
        ({"variant": "vit_x"}, "variant"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


# ---------------------------------------------------------------- prompts, interaction, evaluation helpers
from shared_nets.med_sa.interactive import (  # noqa: E402
    InteractiveRefinementCurve,
    MedSAClickInteraction,
    add_corrective_clicks,
    corrective_click,
)
from shared_nets.med_sa.transforms import ObjectLabeld, SimulatePromptSettingd  # noqa: E402
from shared_nets.prompts import CheckPromptsd  # noqa: E402


def test_corrective_click_goes_to_the_largest_error_region():
    target = torch.zeros(16, 16, 4, dtype=torch.bool)
    target[2:9, 2:9, :] = True  # 196 voxels, all missed
    pred = torch.zeros_like(target)
    pred[12:15, 12:15, 1] = True  # 9 false-positive voxels
    positive, (i, j, k) = corrective_click(pred, target)
    assert positive and 4 <= i <= 6 and 4 <= j <= 6  # interior of the missed square
    pred[:, :, :] = target
    pred[10:16, 10:16, :] = True  # now the false positives dominate
    positive, (i, j, _) = corrective_click(pred, target)
    assert not positive and i >= 10 and j >= 10
    assert corrective_click(target, target) is None


def test_add_corrective_clicks_respects_max_points():
    x = torch.zeros(1, 4, 8, 8, 1)
    target = torch.zeros(1, 8, 8, 1)
    target[0, 2:6, 2:6] = 1
    pred = torch.zeros_like(target)
    assert add_corrective_clicks(x, pred, target, 1, max_points=2)[0][0] is True
    assert x[0, 1].sum() == 1
    x[0, 2, 0, 0, 0] = 1  # second slot used by a negative click
    assert add_corrective_clicks(x, pred, target, 1, max_points=2) == [None]


@pytest.mark.parametrize(
    "prompts, match",
    [
        ({"foreground": [[3, 4, 20]]}, "outside the image"),
        ({"background": [[-1, 4, 2]]}, "outside the image"),
        ({"roi": [2, 2, 0, 2, 8, 4]}, "zero extent or inverted"),
        ({"roi": [8, 2, 0, 2, 8, 4]}, "zero extent or inverted"),
        ({"roi": [0, 0, 0, 17, 8, 4]}, "outside the image"),
        ({"foreground": [[1, 1, 1], [2, 2, 1]], "background": [[3, 3, 1]]}, "max_points=2"),
        # a number beyond float64 (an OverflowError before) and non-finite boxes (passed every check before)
        ({"foreground": [[10**400, 1, 1]]}, "must be a list of"),
        ({"roi": [0, 0, 0, float("nan"), 8, 4]}, "NaN or infinite"),
        ({"roi": [float("-inf"), 0, 0, 2, 8, 4]}, "NaN or infinite"),
    ],
)
def test_check_prompts_rejects_bad_prompts(prompts, match):
    check = CheckPromptsd(max_points=2)
    with pytest.raises(ValueError, match=match):
        check({"image": torch.zeros(1, 16, 16, 4), **prompts})


def test_check_prompts_requires_a_prompt_unless_automatic():
    with pytest.raises(ValueError, match="no prompt: pass clicks as 'foreground'.*'automatic': true"):
        CheckPromptsd(require_prompt=True)({"image": torch.zeros(1, 8, 8, 2), "foreground": []})
    assert CheckPromptsd(require_prompt=True)({"image": torch.zeros(1, 8, 8, 2), "roi": [0, 0, 0, 2, 2, 1]})


def test_check_prompts_passes_good_prompts():
    d = {"image": torch.zeros(1, 16, 16, 4), "foreground": [[1, 1, 1], [2, 2, 2]], "roi": [0, 0, 0, 16, 16, 4]}
    assert CheckPromptsd(max_points=1)(d)["roi"] == d["roi"]


def test_prompt_settings_and_object_label():
    label = torch.zeros(1, 24, 24, 3)
    label[0, 4:14, 6:16, :2] = 6
    label[0, 18:22, 18:22, 2] = 2
    d = ObjectLabeld()({"label": label, "object_id": 6})
    assert set(d["label"].unique().tolist()) == {0.0, 1.0} and d["label"].sum() == 10 * 10 * 2
    sim = SimulatePromptSettingd(setting="3-points")
    sim.set_random_state(0)
    out = sim(d)
    assert len(out["foreground"]) == 6 and out["roi"] == []  # 3 per slice with the object
    assert all(d["label"][0, i, j, k] == 1 for i, j, k in out["foreground"])
    sim.setting = "bbox0.5"
    boxes = sim(d)["roi"]
    assert len(boxes) == 2 and out["background"] == []
    for i0, j0, _, i1, j1, _ in boxes:
        inter = max(0, min(i1, 14) - max(i0, 4)) * max(0, min(j1, 16) - max(j0, 6))
        assert abs(inter / (200 - inter) - 0.5) < 0.05
    with pytest.raises(ValueError, match="prompt setting"):
        sim.setting = "5-points"


def _engine_data(n=2):
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        x = torch.zeros(4, IMG, IMG, 2)
        x[0] = torch.randn(IMG, IMG, 2, generator=g)
        label = torch.zeros(1, IMG, IMG, 2)
        label[0, 8:20, 10:24] = 1
        x[1, 12, 15, :] = 1
        items.append({"image": x, "label": label, "object_id": 6})
    return items


def test_click_interaction_and_refinement_curve(tmp_path):
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    net = tiny()
    data = DataLoader(_engine_data(), batch_size=2)
    interaction = MedSAClickInteraction(max_clicks=2, seed=1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-3),
        loss_function=lambda y, t: torch.nn.functional.cross_entropy(y, t[:, 0].long()),
        iteration_update=interaction,
    )
    trainer.run()
    assert interaction.clicks_added > 0  # corrective clicks reached the trained batch
    curve = InteractiveRefinementCurve(num_clicks=2, output_dir=str(tmp_path))
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net.eval())
    curve.attach(evaluator)
    hits = net.cache_hits
    evaluator.run()
    assert [f"refine_dice_{n}" in evaluator.state.metrics for n in range(3)] == [True] * 3
    assert len(curve.rows) == 2 and all(len(r) == 3 for r in curve.rows)
    assert net.cache_hits - hits == 3  # the curve's 1 + 2 runs all reused the evaluator's image embeddings
    assert (tmp_path / "refinement_curve.csv").read_text().count("\n") == 4


# ---------------------------------------------------------------- composition: MedSA from built parts
def test_med_sa_composes_built_parts():
    """MedSA takes a SAM that already carries the adapters and builds nothing; build_med_sa returns MedSA."""
    from torch import nn

    from shared_nets.med_sa.blocks import MedSAEncoderBlock

    torch.manual_seed(0)
    sam = build_sam("tiny", img_size=IMG, patch_size=8)
    sam.image_encoder.blocks = nn.ModuleList(
        MedSAEncoderBlock(blk, 4, "relu", 0.5, True, True, False) for blk in sam.image_encoder.blocks
    )
    n_params = sum(p.numel() for p in sam.parameters())
    net = MedSA(sam, img_size=IMG, max_points=4, max_depth=4, decoder_adapters=False)
    assert net.image_encoder is sam.image_encoder and net.mask_decoder is sam.mask_decoder
    assert sum(p.numel() for p in net.parameters()) == n_params  # nothing added
    out = net.eval()(volume(d=2))
    assert out.shape == (1, 2, IMG, IMG, 2) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="max_points"):
        MedSA(sam, max_points=0)


def test_build_med_sa_returns_the_same_network_as_before():
    """The builder's tiny networks: MedSA, with the keys and trainable counts the flat constructor gave."""
    paper = tiny()
    official = tiny(**MEDSA_OFFICIAL_CODE_SETTINGS)
    assert type(paper) is MedSA and type(official) is MedSA
    for net, keys, trainable, total in ((paper, 272, 7372, 275544), (official, 250, 66144, 293708)):
        rep = trainable_parameter_report(net)
        assert (len(net.state_dict()), rep.trainable, rep.total) == (keys, trainable, total)
