"""Standalone ViTs: timm and open_clip VisionTransformers wrapped directly, vision(L) sites only.

Random-init models only (nothing is downloaded): timm ``vit_base_patch16_224`` and open_clip ``ViT-B-32``
for one test each, tiny 64px / patch-8 ViTs (8 x 8 = 64 patches, depth 4) for the rest.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vtoken
import vtoken.integrations.open_clip_vit  # registers open_clip_vit
import vtoken.integrations.timm_vit  # registers timm_vit

GRID = 8
PATCHES = GRID * GRID
DEPTH = 4
FAMILIES = ["timm", "open_clip", "open_clip_seq_first"]


# --- models ------------------------------------------------------------------------------------------
def tiny_timm(**kwargs):
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    options = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": DEPTH, "num_heads": 4,
               "num_classes": 10}
    return vision_transformer.VisionTransformer(**{**options, **kwargs}).eval()


def tiny_open_clip(seq_first: bool = False, **kwargs):
    transformer = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(0)
    options = {"image_size": 64, "patch_size": 8, "width": 64, "layers": DEPTH, "heads": 4, "mlp_ratio": 4,
               "output_dim": 32, "output_tokens": True}
    model = transformer.VisionTransformer(**{**options, **kwargs}).eval()
    if seq_first:  # the layout of open_clip releases whose transformer runs sequence-first ([T, B, D])
        model.transformer.batch_first = False
        for block in model.transformer.resblocks:
            block.attn.batch_first = False
    return model


def res_post_block():
    return pytest.importorskip("timm.models.vision_transformer").ResPostBlock


def tiny(family: str, **kwargs):
    if family == "timm":
        return tiny_timm(**kwargs)
    return tiny_open_clip(seq_first=family == "open_clip_seq_first", **kwargs)


def tower(model):
    return getattr(model, "visual", model)


def blocks(model):
    return model.blocks if hasattr(model, "blocks") else tower(model).transformer.resblocks


def seq_first(model) -> bool:
    return not hasattr(model, "blocks") and not tower(model).transformer.batch_first


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def outputs(model, x) -> tuple[torch.Tensor, ...]:
    """Every tensor the model returns: timm logits and token features, open_clip (pooled, tokens)."""
    with torch.no_grad():
        if hasattr(model, "forward_features"):
            features = model.forward_features(x)
            return model.forward_head(features), features
        if hasattr(model, "encode_image"):
            return (model.encode_image(x),)
        out = model(x)
        return out if isinstance(out, tuple) else (out,)


def run_counting(model, x) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    """One forward: the tokens each block sees, and the outputs."""
    seen: list[int] = []
    first = seq_first(model)
    handles = [block.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0 if first else 1]))
               for block in blocks(model)]
    try:
        result = outputs(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return seen, result


def block_lengths(model, x) -> list[int]:
    return run_counting(model, x)[0]


def block_input(model, x, layer: int) -> torch.Tensor:
    """Block ``layer``'s input in the unwrapped model, batch-first."""
    seen = []
    handle = blocks(model)[layer].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        outputs(model, x)
    finally:
        handle.remove()
    return seen[0].transpose(0, 1) if seq_first(model) else seen[0]


def snapshot(model) -> dict:
    """Every module's hook dicts (and the model's attributes), to check unwrap leaves nothing behind."""
    hooks = {
        name: {key: dict(value) for key, value in vars(module).items()
               if "hooks" in key and isinstance(value, dict)}
        for name, module in model.named_modules()
    }
    return {"hooks": hooks, "attributes": sorted(vars(model))}


def state(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict(keep_vars=True).items()}


def assert_restored(model, x, expected_outputs, before_snapshot, before_state) -> None:
    assert not hasattr(model, "vtoken")
    assert snapshot(model) == before_snapshot
    now = model.state_dict(keep_vars=True)
    assert now.keys() == before_state.keys()
    for name, value in before_state.items():
        assert torch.equal(now[name], value), name
    for got, want in zip(outputs(model, x), expected_outputs, strict=True):
        assert torch.equal(got, want)


STAGES = {  # method -> (wrap options at vision(1), patches after block 1)
    "pixel_shuffle": ({"layer": 1}, PATCHES // 4),
    "cls_attn": ({"keep": 10, "site": "vision(1)"}, 10),
    "kcenter": ({"keep": 10, "site": "vision(1)"}, 10),
    "repshift": ({"keep": 10, "layer": 1}, 10),
    "random": ({"keep": 0.25, "site": "vision(1)"}, PATCHES // 4),
    "pool": ({"keep": 12, "site": "vision(1)"}, 12),
}


# --- the models ------------------------------------------------------------------------------
def test_timm_vit_base_pixel_shuffle_at_layer_6(monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = images(1, 224)
    expected = outputs(model, x)  # the library may add hooks lazily: snapshot after a first forward
    before, params = snapshot(model), state(model)

    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: sdpa_calls.append(1) or sdpa(*args, **kwargs))
    vtoken.wrap(model, "pixel_shuffle", layer=6)
    assert type(model.vtoken.integration).name == "timm_vit"
    lengths, (logits, features) = run_counting(model, x)
    assert lengths == [197] * 7 + [50] * 5, "blocks after 6 see 196 / 4 patches plus [CLS]"
    assert logits.shape == (1, 1000) and features.shape == (1, 50, 768) and torch.isfinite(logits).all()
    assert len(sdpa_calls) == 12, "every block still runs its fused attention"
    records = [(r.stage, r.site, r.tokens_in, r.tokens_out, r.calls) for r in model.vtoken.stats.records]
    assert records == [("pixel_shuffle", "vision(6)", 196, 49, 1)]
    integration = model.vtoken.integration
    assert integration.encoder_sites.result(integration.last_call)[1] == (7, 7)
    monkeypatch.undo()
    vtoken.unwrap(model)
    assert_restored(model, x, expected, before, params)

    # the stages that score with the model's own signals (the tiny models below run every stage)
    for method, options in [("cls_attn", {"site": "vision(6)"}), ("repshift", {"layer": 6})]:
        with vtoken.wrapped(model, method, keep=49, **options):
            assert block_lengths(model, x) == [197] * 7 + [50] * 5, method
    assert snapshot(model) == before


def test_open_clip_vit_b_32_cls_attn_on_the_full_clip_model():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    x = images(2, 224)
    text = torch.randint(1, 1000, (1, 77), generator=torch.Generator().manual_seed(2))
    expected = outputs(model, x)
    with torch.no_grad():
        text_features = model.encode_text(text)
    before, params = snapshot(model), state(model)

    vtoken.wrap(model, "cls_attn", keep=24, site="vision(6)")
    assert type(model.vtoken.integration).name == "open_clip_vit"
    lengths, (embedding,) = run_counting(model, x)
    assert lengths == [50] * 7 + [25] * 5
    assert embedding.shape == (2, 512) and torch.isfinite(embedding).all()
    kept = model.vtoken.stats.kept["vision(6)"]
    assert len(kept) == 2 and all(row.unique().numel() == 24 and int(row.max()) < 49 for row in kept)
    with torch.no_grad():
        assert torch.equal(model.encode_text(text), text_features), "the text tower is untouched"
    vtoken.unwrap(model)
    assert_restored(model, x, expected, before, params)


# --- every stage on every family ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(STAGES))
def test_stage_runs_at_its_budget_and_unwrap_restores(family, method):
    model = tiny(family, **({"init_values": 0.1} if family == "timm" else {"ls_init_value": 0.1}))
    x = images()
    expected = outputs(model, x)
    before, params = snapshot(model), state(model)
    options, budget = STAGES[method]

    vtoken.wrap(model, method, **options)
    outputs(model, x)  # a first call, so the stats below must be of the last call only
    lengths, got = run_counting(model, x)
    assert lengths == [1 + PATCHES] * 2 + [1 + budget] * 2
    assert got[-1].shape[-2] == budget + (1 if family == "timm" else 0)  # timm keeps [CLS] in its features
    assert got[0].shape[0] == 2 and all(torch.isfinite(t).all() for t in got)
    records = [(r.site, r.tokens_in, r.tokens_out, r.calls) for r in model.vtoken.stats.records]
    assert records == [("vision(1)", PATCHES, budget, 1)], "stats cover the last call only"
    kept = model.vtoken.stats.kept["vision(1)"]
    assert [row.numel() for row in kept] == [budget, budget]
    assert all(bool((row[1:] > row[:-1]).all()) and int(row.max()) < PATCHES for row in kept)
    vtoken.unwrap(model)
    assert_restored(model, x, expected, before, params)


@pytest.mark.parametrize("family", FAMILIES)
def test_pixel_shuffle_ratio_one_equals_unwrapped(family):
    model = tiny(family)
    x = images()
    expected = outputs(model, x)
    with vtoken.wrapped(model, "pixel_shuffle", layer=1, ratio=1):
        got = outputs(model, x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_sequence_first_layout_is_the_same_model():
    batch_first, seq_first_model = tiny_open_clip(), tiny_open_clip(seq_first=True)
    x = images()
    for a, b in zip(outputs(batch_first, x), outputs(seq_first_model, x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with vtoken.wrapped(batch_first, "cls_attn", keep=10, site="vision(1)"):
        outputs(batch_first, x)
        kept = batch_first.vtoken.stats.kept["vision(1)"]
    with vtoken.wrapped(seq_first_model, "cls_attn", keep=10, site="vision(1)"):
        outputs(seq_first_model, x)
        assert all(torch.equal(a, b) for a, b in zip(seq_first_model.vtoken.stats.kept["vision(1)"], kept))


def test_two_vision_sites_and_a_dynamic_image_size():
    model = tiny_timm(dynamic_img_size=True)
    pipeline = vtoken.Pipeline([vtoken.PixelShuffle(layer=0), vtoken.ClsAttn(keep=5, site="vision(2)")])
    with vtoken.wrapped(model, pipeline):
        assert block_lengths(model, images()) == [65, 17, 17, 6]
        wide = torch.randn(1, 3, 48, 80)  # a 6 x 10 grid: 60 patches -> 15 after the 2 x 2 shuffle
        assert block_lengths(model, wide) == [61, 16, 16, 6]
        assert outputs(model, wide)[1].shape == (1, 6, 64)
        records = [(r.stage, r.site, r.tokens_in, r.tokens_out) for r in model.vtoken.stats.records]
    assert records == [("pixel_shuffle", "vision(0)", 60, 15), ("cls_attn", "vision(2)", 15, 5)]


# --- the signals against slow references -------------------------------------------------------------
def reference_cls_row(block, hidden: torch.Tensor) -> torch.Tensor:
    """Full softmax(q k^T * scale) in float64, all rows, from the block's weights; row 0, mean over heads."""
    block = copy.deepcopy(block).double()
    x = hidden.double()
    attn = block.attn
    if hasattr(attn, "qkv"):  # timm Attention
        from timm.models.vision_transformer import ResPostBlock

        normed = x if isinstance(block, ResPostBlock) else block.norm1(x)
        b, t, _ = normed.shape
        q, k, _ = attn.qkv(normed).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, scale = attn.q_norm(q), attn.k_norm(k), attn.head_dim ** -0.5
    elif isinstance(attn, torch.nn.MultiheadAttention):  # open_clip's default block: torch computes it
        normed = block.ln_1(x)
        attn.batch_first = True
        _, weights = attn(normed, normed, normed, need_weights=True, average_attn_weights=True)
        return weights[:, 0]
    else:  # open_clip's Attention (qk_norm)
        normed = block.ln_1(x)
        b, t, d = normed.shape
        q, k, _ = torch.nn.functional.linear(normed, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q = attn.ln_q(q.reshape(b, t, attn.num_heads, -1).transpose(1, 2)).double()
        k = attn.ln_k(k.reshape(b, t, attn.num_heads, -1).transpose(1, 2)).double()
        scale = (d // attn.num_heads) ** -0.5
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [B, H, T, T]
    return probs[:, :, 0].mean(dim=1)


CLS_MODELS = {
    "timm": lambda: tiny_timm(),
    "timm_qk_norm_registers": lambda: tiny_timm(qk_norm=True, reg_tokens=2, qkv_bias=True),
    "timm_res_post": lambda: tiny_timm(block_fn=res_post_block(), init_values=0.5),
    "open_clip": lambda: tiny_open_clip(),
    "open_clip_seq_first": lambda: tiny_open_clip(seq_first=True),
    "open_clip_qk_norm": lambda: tiny_open_clip(qk_norm=True),
}


@pytest.mark.parametrize("name", list(CLS_MODELS))
def test_cls_attn_row_equals_slow_reference(name):
    model = CLS_MODELS[name]()
    x = images()
    hidden = block_input(model, x, 2)
    expected = reference_cls_row(blocks(model)[2], hidden)
    prefix = getattr(model, "num_prefix_tokens", 1)
    with vtoken.wrapped(model, "cls_attn", keep=12, site="vision(2)"):
        row = model.vtoken.integration.layout.cls_row(blocks(model)[2], hidden)
        outputs(model, x)
        kept = model.vtoken.stats.kept["vision(2)"]
    torch.testing.assert_close(row.double(), expected, atol=1e-6, rtol=1e-4)
    order = torch.sort(expected[:, prefix:], dim=-1, descending=True, stable=True).indices
    top = order[:, :12].sort(dim=-1).values
    assert torch.equal(torch.stack(kept), top)


@pytest.mark.parametrize("name", ["timm", "timm_res_post", "open_clip", "open_clip_seq_first"])
def test_repshift_equals_slow_reference(name):
    """Score: the norm of what the block's MLP adds, captured with plain hooks as block output minus the
    MLP branch's input; random LayerScale gains make the MLP's own output rank differently."""
    if name.startswith("timm"):
        extra = {"block_fn": res_post_block()} if name == "timm_res_post" else {}
        model = tiny_timm(init_values=0.5, **extra)
    else:
        model = tiny_open_clip(seq_first=name.endswith("seq_first"), ls_init_value=0.5)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1 and parameter.shape[0] == 64:  # norms, layer scales, biases
                parameter.copy_(torch.rand(64, generator=generator) * 2)
    block = blocks(model)[1]
    branch = {"timm": "norm2", "timm_res_post": "mlp"}.get(name, "ln_2")  # input: x before the MLP update
    seen = {}
    handles = [
        getattr(block, branch).register_forward_pre_hook(lambda m, args: seen.__setitem__("mid", args[0])),
        block.register_forward_hook(lambda m, args, output: seen.__setitem__("out", output)),
    ]
    x = images()
    outputs(model, x)
    for handle in handles:
        handle.remove()
    update = seen["out"] - seen["mid"]
    update = update.transpose(0, 1) if seq_first(model) else update
    norms = update[:, 1:].double().norm(dim=-1)
    expected = torch.sort(norms, dim=-1, descending=True, stable=True).indices[:, :20].sort(-1).values
    with vtoken.wrapped(model, "repshift", layer=1, keep=20):
        outputs(model, x)
        kept = torch.stack(model.vtoken.stats.kept["vision(1)"])
    assert torch.equal(kept, expected)


# --- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["timm", "open_clip"])
@pytest.mark.parametrize("layer", [3, 7, -1, -5])
def test_layer_out_of_range_names_the_accepted_range(family, layer):
    model = tiny(family)
    accepted = r"does not exist in this 4-block .* accepted: vision\(L\) with 0 <= L < 3"
    with pytest.raises(ValueError, match=accepted):
        vtoken.wrap(model, "pixel_shuffle", layer=layer)
    assert not hasattr(model, "vtoken")


def test_sites_other_than_vision_are_refused():
    with pytest.raises(ValueError, match=r"only vision\(L\) sites; stage kcenter is at projector; accepted: "
                                         r"vision\(L\) with 0 <= L < 3"):
        vtoken.wrap(tiny_timm(), "kcenter", keep=8)


@pytest.mark.parametrize("options,reason", [
    ({"class_token": False, "global_pool": "avg"}, "has no class token"),
    ({"class_token": False, "reg_tokens": 2, "global_pool": "avg"}, "has no class token"),
    ({"global_pool": "avg"}, "pools by global_pool='avg'"),
    ({"class_token": False, "global_pool": "map"}, "has no class token"),
])
def test_cls_attn_without_a_pooled_class_token_is_refused_on_timm(options, reason):
    model = tiny_timm(**options)
    message = f"cls_attn at vision\\(1\\) is not available .*{reason}.* use kcenter"
    with pytest.raises(ValueError, match=message):
        vtoken.wrap(model, "cls_attn", keep=8, site="vision(1)")
    assert not hasattr(model, "vtoken")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()), "no hook left behind"
    with vtoken.wrapped(model, "kcenter", keep=8, site="vision(1)"):  # other stages still run
        assert block_lengths(model, images())[-1] == model.num_prefix_tokens + 8


@pytest.mark.parametrize("options,reason", [
    ({"pool_type": "avg"}, "pool_type='avg'"),
    ({"attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 4}, "attentional pooler"),
])
def test_cls_attn_on_a_non_cls_open_clip_tower_is_refused(options, reason):
    model = tiny_open_clip(**options)
    with pytest.raises(ValueError, match=f"cls_attn at vision\\(1\\) is not available .*{reason}"):
        vtoken.wrap(model, "cls_attn", keep=8, site="vision(1)")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_what_cannot_run_on_a_shortened_sequence_is_refused_at_call_time():
    model = tiny_timm(patch_drop_rate=0.5)
    vtoken.wrap(model, "kcenter", keep=8, site="vision(1)")
    with pytest.raises(ValueError, match="attn_mask"):
        model(images(), attn_mask=torch.ones(65, 65, dtype=torch.bool))
    model.train()
    with pytest.raises(ValueError, match="got 33 tokens, but 1 prefix token.*8x8 patch grid make 65"):
        model(images())
    model.eval()
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(images())
    vtoken.unwrap(model)


def test_integrations_are_registered_and_matched():
    models = vtoken.list_models()
    assert {"timm.VisionTransformer", "open_clip.VisionTransformer"} <= set(models)
    timm_vit = vtoken.integrations.timm_vit.TimmViTIntegration
    open_clip_vit = vtoken.integrations.open_clip_vit.OpenClipViTIntegration
    assert timm_vit.matches(tiny_timm()) and not timm_vit.matches(torch.nn.Linear(2, 2))
    assert open_clip_vit.matches(tiny_open_clip()) and not open_clip_vit.matches(tiny_timm())
    assert not open_clip_vit.matches(torch.nn.Linear(2, 2))
