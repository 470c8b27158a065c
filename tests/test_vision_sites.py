"""vision(L) sites inside LLaVA's CLIP tower: pixel shuffle, representation shift and friends."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tiny_models import GRID, TOKENS_PER_IMAGE, llava_batch, prompt_ids, tiny_llava
from vtoken.stages.pixel_shuffle import space_to_channel


def block_inputs(model, index):
    seen = []
    layers = model.model.vision_tower.encoder.layers
    handle = layers[index].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    return seen, handle


def lm_length(model, batch, **generate):
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    with torch.no_grad():
        out = model.generate(**batch, **generate) if generate else model(**batch)
    handle.remove()
    return seen[0], out


def test_pixel_shuffle_shrinks_later_layers_and_the_prompt():
    model = tiny_llava(vision_layers=4)
    batch = llava_batch([prompt_ids([20], 1, [30, 31]), prompt_ids([21, 22], 1, [32])])
    text = batch["input_ids"].shape[1] - TOKENS_PER_IMAGE
    with vtoken.wrapped(model, "pixel_shuffle", layer=0):
        before, h0 = block_inputs(model, 0)
        after, h1 = block_inputs(model, 1)
        length, out = lm_length(model, batch, max_new_tokens=3, do_sample=False)
        h0.remove(), h1.remove()
        records = [(r.site, r.tokens_in, r.tokens_out) for r in model.vtoken.stats.records]
    assert before[0].shape[1] == TOKENS_PER_IMAGE + 1
    assert after[0].shape[1] == TOKENS_PER_IMAGE // 4 + 1, "layers after L see N/4 patches plus [CLS]"
    assert length == text + TOKENS_PER_IMAGE // 4
    assert records == [("vision(0)", TOKENS_PER_IMAGE, TOKENS_PER_IMAGE // 4)]
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_pixel_shuffle_ratio_one_equals_unwrapped():
    model = tiny_llava(vision_layers=4)
    batch = llava_batch([prompt_ids([20], 1, [30])])
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, "pixel_shuffle", layer=1, ratio=1):
            got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_pixel_shuffle_then_kcenter_at_the_projector():
    model = tiny_llava(vision_layers=4)
    batch = llava_batch([prompt_ids([20], 1, [30])])
    text = batch["input_ids"].shape[1] - TOKENS_PER_IMAGE
    pipeline = vtoken.Pipeline([vtoken.PixelShuffle(layer=1), vtoken.KCenter(keep=16)])
    with vtoken.wrapped(model, pipeline):
        length, _ = lm_length(model, batch)
        kept = model.vtoken.stats.kept["projector"][0]
    assert length == text + 16
    assert kept.unique().numel() == 16 and int(kept.max()) < TOKENS_PER_IMAGE, "kept slots are original positions"


def test_shortcut_is_the_mean_and_the_residual_is_added():
    tokens = vtoken.TokenSet.from_features(torch.randn(2, 16, 6), grid=(4, 4))
    plain = vtoken.PixelShuffle(layer=0).select(tokens, 4)
    blocks = tokens.features.view(2, 2, 2, 2, 2, 6).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 4, 6)
    torch.testing.assert_close(plain.features, blocks.mean(2))
    residual = torch.nn.Linear(4 * 6, 6)
    state = {"weight": torch.randn(6, 24), "bias": torch.randn(6)}
    stage = vtoken.PixelShuffle(layer=0).load_residual(residual, state)
    merged = stage.select(tokens, 4).features
    expected = blocks.mean(2) + space_to_channel(tokens.features, 4, 4, 2) @ state["weight"].T + state["bias"]
    torch.testing.assert_close(merged, expected)


def test_pixel_shuffle_refuses_a_ratio_that_does_not_divide_the_grid():
    tokens = vtoken.TokenSet.from_features(torch.randn(1, 25, 4), grid=(5, 5))
    with pytest.raises(ValueError, match="ratio 2 does not divide the 5x5 token grid"):
        vtoken.PixelShuffle(layer=0).select(tokens, 6)


def test_repshift_keeps_largest_mlp_updates():
    model = tiny_llava(vision_layers=4)
    batch = llava_batch([prompt_ids([20], 1, [30])])
    layer = model.model.vision_tower.encoder.layers[1]
    updates = []
    handle = layer.mlp.register_forward_hook(lambda module, args, output: updates.append(output))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    norms = updates[0][0, 1:].norm(dim=-1)
    expected = sorted(sorted(range(TOKENS_PER_IMAGE), key=lambda i: (-float(norms[i]), i))[:20])
    text = batch["input_ids"].shape[1] - TOKENS_PER_IMAGE
    with vtoken.wrapped(model, "repshift", layer=1, keep=20):
        length, _ = lm_length(model, batch)
        kept = model.vtoken.stats.kept["vision(1)"][0]
    assert length == text + 20
    assert kept.tolist() == expected


@pytest.mark.parametrize("method", ["cls_attn", "kcenter", "random", "pool"])
def test_other_stages_run_inside_the_encoder(method):
    model = tiny_llava(vision_layers=4)
    batch = llava_batch([prompt_ids([20], 1, [30])])
    text = batch["input_ids"].shape[1] - TOKENS_PER_IMAGE
    with vtoken.wrapped(model, method, keep=36, site="vision(0)"):
        length, _ = lm_length(model, batch)
    assert length == text + 36


def test_stage_without_layer_is_refused():
    with pytest.raises(ValueError, match="needs its encoder layer: pass layer=L"):
        vtoken.PixelShuffle()
    with pytest.raises(ValueError, match="take\\(s\\) no budget"):
        vtoken.wrap(tiny_llava(vision_layers=4), "pixel_shuffle", keep=10, layer=0)


def test_unwrap_after_vision_site_restores_model():
    model = tiny_llava(vision_layers=4)
    batch = llava_batch([prompt_ids([20], 1, [30])])
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, "pixel_shuffle", layer=0):
            model(**batch)
        assert torch.equal(model(**batch).logits, expected)
    assert GRID * GRID == TOKENS_PER_IMAGE
