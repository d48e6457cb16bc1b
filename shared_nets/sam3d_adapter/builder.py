"""Thin typed builder of :class:`~shared_nets.sam3d_adapter.network.SAM3DAdapter` from a SAM backbone.

Like ``segment_anything``'s ``build_sam_vit_b`` for ``Sam``: SAM is built (and its checkpoint loaded) first, its
image encoder's pieces are wrapped into the 3D tokenizer and blocks, then the necks, prompt encoder(s) and
decoder are built and handed to the network. The order in which modules are created (and random numbers drawn)
is fixed, so one torch seed gives the same weights on every call.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared_nets.peft import apply_peft, log_peft_build, resolve_peft
from shared_nets.sam import build_sam, get_variant

from .encoder import Block3D, Neck3D, SpatialAdapter3D, VolumeTokenizer
from .heads import PROMPT_LAYERS, MultiLevelDecoder3D, PromptEncoder3D
from .lite import LiteSAM3DAdapter, LiteVolumeEncoder, lite_grid
from .network import PROMPT_ENCODER_MODES, SAM3DAdapter, _as_patch_size, _check_click_options, _check_in_channels

__all__ = ["build_sam3d_adapter"]


def build_sam3d_adapter(
    variant: str = "vit_b",
    checkpoint: str | None = None,
    img_size: int | Sequence[int] = 128,
    num_classes: int = 2,
    in_channels: int = 1,
    *,
    sam_input_size: int = 512,
    patch_size: int = 16,
    window_size: int | None = None,
    adapter_dim: int | None = None,
    decoder_channels: int | None = None,
    prompt_encoder: str = "visual_sampler",
    prompt_levels: Sequence[int] = (4,),
    prompt_layer: str = "two_way",
    num_global_queries: int = 10,
    use_point_labels: bool = False,
    max_points: int = 64,
    no_positive: str = "error",
    background_logit: float = 10.0,
    use_multi_level: bool = True,
    peft: str | None = None,
    full_finetune: bool | None = None,
    spatial_adapters: bool | None = None,
    lora_rank: int = 4,
    fact_rank: int = 32,
    adapter_final_relu: bool = False,
    adapter_zero_init: bool | None = None,
    depth_embed_init: str = "zeros",
    slice_embed_init: str = "mean",
    use_checkpoint: bool = False,
    cache_image_embedding: bool = False,
    cache_size: int = 8,
) -> SAM3DAdapter:
    """Build a 3DSAM-adapter network around a SAM backbone, with the method's trainable parameters.

    Trainable by default (as the official code): slice/depth embeddings, block norms, adapters, depth
    rel-pos tables, necks, prompt encoder(s), decoder: exactly 25,462,400 parameters for ViT-B at the
    default settings (the poster's 25.46M), 22,298,240 without prompt encoder (automatic mode; the poster
    lists the encoder's 15,209,984 = 15.21M).

    Deliberate differences from the official code (each a switch where both are useful):
    adapters zero-initialised and without the trailing ReLU (``adapter_final_relu``,
    ``adapter_zero_init``), depth embedding zero-initialised (``depth_embed_init``),
    slice-merging conv initialised as the mean (``slice_embed_init``), prompt layers that use
    SAM's full two-way attention (``prompt_layer``), only the prompt encoders in use are built
    (the official script builds four and uses one), necks every depth/4 blocks for any backbone
    (the official loop hard-codes 12 blocks), shifted-window masks not stored in checkpoints.

    Args:
        variant: SAM backbone ``vit_b`` (the paper), ``vit_l``, ``vit_h``, ``tiny``, or ``lite``: LiteMedSAM's
            TinyViT run slice by slice with the 3D adapters before its blocks and necks on its stage outputs
            (:mod:`shared_nets.sam3d_adapter.lite`; ``patch_size`` and ``window_size`` do not apply).
        checkpoint: official SAM ``.pth`` (loaded strictly before the 3D parts are added), or None.
        img_size: input patch ``H = W = D`` (int) or ``[H, W, D]`` with ``H == W``; the
            tokeniser needs each side times ``sam_input_size / H`` to be a multiple of
            ``patch_size * window_size``.
        num_classes: output channels ``K`` incl. background (2: background, object).
        in_channels: image channels, 1 (grey, repeated) or 3.
        sam_input_size: in-plane side the patch is resized to before SAM's patch embedding
            (512 in the official code, for its 128^3 prompted and 256^3 automatic patches); at ``lite``
            the slice side fed to TinyViT (its grid is ``sam_input_size / 4``, and the depth is resampled
            to the same step).
        patch_size: SAM's patch size (16; 8 gives ``tiny`` CPU demos a finer grid at a quarter of
            the cost, only without a checkpoint). Slices are merged in groups of the same size.
        window_size: 3D attention window in tokens; None = 8 (4 for ``tiny``).
        adapter_dim: adapter bottleneck width; None = embed_dim // 2 (384 for ViT-B).
        decoder_channels: width of the decoder's level heads; None = neck width // 2 (128).
        prompt_encoder: ``"visual_sampler"`` (the method), ``"positional_encoding"`` (poster
            ablation) or ``"none"`` (automatic segmentation, poster Table 2).
        prompt_levels: feature levels 1-4 where the prompt enters (poster ablation "Feature
            Level"; default ``[4]``, the bottleneck).
        prompt_layer: ``"two_way"`` (SAM's two-way attention) or ``"official"`` (the released
            layer, which skips the tokens-to-image attention).
        num_global_queries: learnable global queries per prompt layer (10).
        use_point_labels: let the visual sampler tell positive from negative clicks (a learned
            label embedding; the method ignores click labels).
        max_points: clicks decoded per patch (positives first; see ``decode_points``).
        no_positive: a patch without a positive click raises ``ValueError`` (``"error"``) or,
            if it holds negative clicks, is predicted as background (``"background"``: for
            sliding-window inference where a window may catch only negative clicks) or segmented
            from its negative clicks alone (``"run"``: what the official training does for crops
            without tumour, where only its random points are given). A patch without any click
            always raises.
        background_logit: channel-0 logit written for such background patches (others get its
            negative).
        use_multi_level: aggregate all four levels in the decoder (poster ablation "multi-layer
            aggregation"); False decodes the bottleneck only.
        peft: how SAM's blocks are tuned, one of :data:`shared_nets.peft.PEFT_METHODS`; None is the
            method's ``"adapter"`` (its 3D spatial adapters). ``lora``/``fact`` go on the q/v rows of every
            3D window attention's ``qkv`` (SAM's own ``Linear``), ``svd`` on the blocks' qkv, proj and MLP
            linears; ``full`` trains every parameter (poster comparison "Full fine-tuning"; also what a
            ``tiny`` model without pretrained weights needs). The 3D structure (slice/depth embeddings,
            depth rel-pos tables, block norms, necks, prompt encoders, decoder) trains under every setting.
        full_finetune: old switch, alias of ``peft="full"`` (a different ``peft`` raises).
        spatial_adapters: build the 3D spatial adapters; None: only for ``peft="adapter"``. True adds them
            to another setting (e.g. LoRA and adapters); False with ``peft="adapter"`` raises.
        lora_rank: LoRA rank for ``peft="lora"``.
        fact_rank: FacT rank for ``peft="fact"``.
        adapter_final_relu: ReLU after the adapter's up-projection, as the official code.
        adapter_zero_init: zero-initialise adapter up-projections (identity at start); None =
            True unless ``adapter_final_relu``.
        depth_embed_init: ``"zeros"`` or ``"ones"`` (official).
        slice_embed_init: ``"mean"`` or ``"default"`` (official: PyTorch's initialisation).
        use_checkpoint: gradient checkpointing of the transformer blocks (memory for 128^3 ViT-B).
        cache_image_embedding: in eval mode without gradients, reuse the image features when
            the same patch comes again with new clicks (interactive refinement); the decoder's
            prompt-independent part (heads of the levels without a prompt, the image channel
            and their share of the classifier's first convolution) is cached with them, so a
            re-prompt runs only the prompt encoder and the prompted level's decoder path.
        cache_size: patches kept in that cache (the windows of one volume).

    Returns:
        The composed :class:`SAM3DAdapter`.
    """
    if full_finetune is not None and not isinstance(full_finetune, bool):
        raise ValueError(f"full_finetune must be true or false, got {full_finetune!r}.")
    peft = resolve_peft(peft, "adapter", full_finetune=full_finetune)
    if spatial_adapters is None:
        spatial_adapters = peft == "adapter"
    if not isinstance(spatial_adapters, bool):
        raise ValueError(f"spatial_adapters must be true, false or null, got {spatial_adapters!r}.")
    if peft == "adapter" and not spatial_adapters:
        raise ValueError("peft='adapter' contradicts spatial_adapters=false (the method's adapters are its 3D ones).")
    v = get_variant(variant)
    patch = _as_patch_size(img_size)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    _check_in_channels(in_channels)
    if prompt_encoder not in PROMPT_ENCODER_MODES:
        raise ValueError(f"prompt_encoder must be one of {PROMPT_ENCODER_MODES}, got {prompt_encoder!r}.")
    if prompt_layer not in PROMPT_LAYERS:
        raise ValueError(f"prompt_layer must be one of {PROMPT_LAYERS}, got {prompt_layer!r}.")
    _check_click_options(max_points, no_positive)
    ws = (4 if v.name == "tiny" else 8) if window_size is None else window_size
    if not isinstance(ws, int) or ws < 1:
        raise ValueError(f"window_size must be a positive integer, got {window_size!r}.")
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
    if v.encoder == "tiny_vit":
        grid, resized = lite_grid(patch, sam_input_size)
    else:
        grid, resized = SAM3DAdapter._token_grid(patch, sam_input_size, ws, patch_size)

    levels = sorted({int(x) for x in prompt_levels}) if prompt_encoder != "none" else []
    if prompt_encoder != "none" and (not levels or any(x not in (1, 2, 3, 4) for x in levels)):
        raise ValueError(f"prompt_levels must be a non-empty list of levels 1-4, got {list(prompt_levels)!r}.")
    decoded = [1, 2, 3, 4] if use_multi_level else [4]
    if any(x not in decoded for x in levels):
        raise ValueError(
            f"prompt_levels {levels} include levels the decoder does not use "
            "(use_multi_level=False decodes level 4 only)."
        )
    if v.encoder_depth < 4:
        raise ValueError(
            f"the encoder needs at least 4 blocks for four feature levels, {v.name} has {v.encoder_depth}."
        )

    zero_init = (not adapter_final_relu) if adapter_zero_init is None else bool(adapter_zero_init)
    if v.encoder == "tiny_vit":
        return _build_lite(
            v,
            checkpoint,
            patch,
            sam_input_size,
            num_classes=num_classes,
            in_channels=in_channels,
            levels=levels,
            decoded=decoded,
            adapter_ratio=0.5 if adapter_dim is None else adapter_dim / v.encoder_embed_dim,
            adapter_final_relu=adapter_final_relu,
            adapter_zero_init=zero_init,
            decoder_channels=decoder_channels,
            prompt_encoder=prompt_encoder,
            prompt_layer=prompt_layer,
            num_global_queries=num_global_queries,
            use_point_labels=use_point_labels,
            max_points=max_points,
            no_positive=no_positive,
            background_logit=background_logit,
            full_finetune=full_finetune,
            use_checkpoint=use_checkpoint,
            cache_image_embedding=cache_image_embedding,
            cache_size=cache_size,
        )
    # SAM first (official weights loaded strictly at twice the token grid: 1024 for a 32^2
    # grid, i.e. no resizing for ViT-B at the defaults), then the 3D parts around its pieces.
    sam = build_sam(v, checkpoint, img_size=2 * sam_input_size, patch_size=patch_size)
    enc = sam.image_encoder
    dim, out_dim = v.encoder_embed_dim, v.prompt_embed_dim
    tokenizer = VolumeTokenizer(
        enc.patch_embed,
        enc.pos_embed,
        grid,
        resized,
        depth_embed_init=depth_embed_init,
        slice_embed_init=slice_embed_init,
    )
    hidden = dim // 2 if adapter_dim is None else adapter_dim
    shift = ws // 2 if min(grid) > ws else 0  # one window per axis: nothing to shift
    blocks = [
        Block3D(
            blk,
            grid,
            ws,
            shift=shift if i % 2 == 0 else 0,
            adapter=SpatialAdapter3D(dim, hidden, final_relu=adapter_final_relu, zero_init=zero_init)
            if spatial_adapters
            else None,
        )
        for i, blk in enumerate(enc.blocks)
    ]
    necks = {k: Neck3D(dim, out_dim) for k in decoded}
    prompt_encoders = {
        k: PromptEncoder3D(
            out_dim,
            v.decoder_num_heads,
            v.decoder_mlp_dim,
            depth=2,
            num_global_queries=num_global_queries,
            encoding=prompt_encoder,
            layer=prompt_layer,
            use_point_labels=use_point_labels,
        )
        for k in levels
    }
    ch = out_dim // 2 if decoder_channels is None else decoder_channels
    if not isinstance(ch, int) or ch < 1:
        raise ValueError(f"decoder_channels must be a positive integer, got {decoder_channels!r}.")
    decoder = MultiLevelDecoder3D(out_dim, ch, num_classes, num_levels=len(decoded), image_channels=1)
    del sam, enc  # SAM's 2D neck, prompt encoder and mask decoder are not used

    net = SAM3DAdapter(
        tokenizer,
        blocks,
        necks,
        decoder,
        prompt_encoders,
        img_size=patch,
        in_channels=in_channels,
        max_points=max_points,
        no_positive=no_positive,
        background_logit=background_logit,
        use_checkpoint=use_checkpoint,
        cache_image_embedding=cache_image_embedding,
        cache_size=cache_size,
        variant=v.name,
    )
    # LoRA / FacT / SVD on SAM's linears inside the 3D blocks (the network is the encoder: ``net.blocks``)
    peft_patterns = []
    if peft in ("lora", "fact", "svd"):
        svd_include = ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")  # no 2D neck: the necks are 3D convs
        peft_patterns = apply_peft(net, peft, lora_rank=lora_rank, fact_rank=fact_rank, svd_include=svd_include)
    net.peft = peft  # the uniform name of the setting across the five networks
    net.set_trainable(peft == "full", peft_patterns)
    log_peft_build(net, "3DSAM-adapter", peft)
    return net


def _build_lite(
    v,
    checkpoint: str | None,
    patch: tuple[int, int, int],
    sam_input_size: int,
    *,
    num_classes: int,
    in_channels: int,
    levels: list[int],
    decoded: list[int],
    adapter_ratio: float,
    adapter_final_relu: bool,
    adapter_zero_init: bool,
    decoder_channels: int | None,
    prompt_encoder: str,
    prompt_layer: str,
    num_global_queries: int,
    use_point_labels: bool,
    max_points: int,
    no_positive: str,
    background_logit: float,
    full_finetune: bool,
    use_checkpoint: bool,
    cache_image_embedding: bool,
    cache_size: int,
) -> LiteSAM3DAdapter:
    """The ``lite`` network (see :mod:`shared_nets.sam3d_adapter.lite`): LiteMedSAM loaded strictly at
    ``sam_input_size``, its TinyViT wrapped slice-wise with the 3D adapters, then the method's heads."""
    sam = build_sam(v, checkpoint, img_size=sam_input_size)
    encoder = LiteVolumeEncoder(
        sam.image_encoder,
        patch,
        sam_input_size,
        adapter_ratio=adapter_ratio,
        adapter_final_relu=adapter_final_relu,
        adapter_zero_init=adapter_zero_init,
    )
    out_dim = v.prompt_embed_dim
    necks = {k: Neck3D(encoder.level_dims[k - 1], out_dim) for k in decoded}
    prompt_encoders = {
        k: PromptEncoder3D(
            out_dim,
            v.decoder_num_heads,
            v.decoder_mlp_dim,
            depth=2,
            num_global_queries=num_global_queries,
            encoding=prompt_encoder,
            layer=prompt_layer,
            use_point_labels=use_point_labels,
        )
        for k in levels
    }
    ch = out_dim // 2 if decoder_channels is None else decoder_channels
    if not isinstance(ch, int) or ch < 1:
        raise ValueError(f"decoder_channels must be a positive integer, got {decoder_channels!r}.")
    decoder = MultiLevelDecoder3D(out_dim, ch, num_classes, num_levels=len(decoded), image_channels=1)
    del sam  # LiteMedSAM's 2D prompt encoder and mask decoder are not used
    net = LiteSAM3DAdapter(
        encoder,
        necks,
        decoder,
        prompt_encoders,
        img_size=patch,
        in_channels=in_channels,
        max_points=max_points,
        no_positive=no_positive,
        background_logit=background_logit,
        use_checkpoint=use_checkpoint,
        cache_image_embedding=cache_image_embedding,
        cache_size=cache_size,
        variant=v.name,
    )
    net.set_trainable(full_finetune)
    return net
