"""Qwen2-VL and Qwen2.5-VL integrations on tiny random-init models."""

from __future__ import annotations

import pytest
import torch

import vtoken
from integrations_helpers import lm_inputs
from tiny_models import Q_IMAGE, Q_VIDEO, qwen_batch, tiny_qwen

VERSIONS = ["2", "2.5"]
METHODS = ["cls_attn", "kcenter", "dart", "random", "pool", "cls_attn+kcenter"]
TWO_SIZES = [[20, ("image", 8, 12), 30, 31], [21, ("image", 4, 8), 32]]  # 24 and 8 merged tokens


@pytest.mark.parametrize("version", VERSIONS)
def test_keep_all_matches_unwrapped_logits(version, attn_implementation):
    model = tiny_qwen(version, attn_implementation)
    batch = qwen_batch(TWO_SIZES)
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, "cls_attn+kcenter", keep=1.0):
            got = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("method", METHODS)
def test_quarter_budget_feeds_expected_counts(version, method):
    model = tiny_qwen(version)
    batch = qwen_batch(TWO_SIZES)
    with vtoken.wrapped(model, method, keep=0.25), torch.no_grad():
        seen, handle = lm_inputs(model)
        model(**batch)
        handle.remove()
    lengths = seen[0]["attention_mask"].sum(1).tolist()
    text = ((batch["input_ids"] != Q_IMAGE) & batch["attention_mask"].bool()).sum(1).tolist()
    assert lengths == [text[0] + 6, text[1] + 2], f"{method}: each image should keep a quarter of its tokens"


@pytest.mark.parametrize("version", VERSIONS)
def test_generate_padded_batch_with_different_image_sizes_equals_singles(version):
    model = tiny_qwen(version)
    batch = qwen_batch(TWO_SIZES, seed=4)
    with vtoken.wrapped(model, "dart", keep=0.5):
        together = model.generate(**batch, max_new_tokens=6, do_sample=False)
        for row, spec in enumerate(TWO_SIZES):
            single = model.generate(**_single(batch, row, spec), max_new_tokens=6, do_sample=False)
            assert torch.equal(together[row, -6:], single[0, -6:]), f"row {row} differs from its run alone"
    assert together.shape[1] == batch["input_ids"].shape[1] + 6


def _single(batch, row, spec):
    """Row ``row`` of a qwen_batch on its own, with that row's own pixels."""
    alone = qwen_batch([spec])
    sizes = (batch["image_grid_thw"].prod(-1)).tolist()
    start = sum(sizes[:row])
    alone["pixel_values"] = batch["pixel_values"][start : start + sizes[row]]
    return alone


@pytest.mark.parametrize("version", VERSIONS)
def test_two_images_in_one_prompt(version):
    model = tiny_qwen(version)
    batch = qwen_batch([[20, ("image", 4, 8), 21, ("image", 8, 8), 30]])
    with vtoken.wrapped(model, "kcenter", keep=3):
        seen, handle = lm_inputs(model)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        handle.remove()
    text = int((batch["input_ids"] != Q_IMAGE).sum())
    assert seen[0]["inputs_embeds"].shape[1] == text + 2 * 3
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("video_budget,expected", [("clip", 5), ("frame", 4 * 5)])
def test_video_prompt(version, video_budget, expected):
    model = tiny_qwen(version)
    batch = qwen_batch([[20, ("video", 4, 4, 8), 30, 31]])  # 4 temporal patches of 8 merged tokens each
    with vtoken.wrapped(model, "kcenter", keep=5, video_budget=video_budget):
        seen, handle = lm_inputs(model)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        handle.remove()
    text = int((batch["input_ids"] != Q_VIDEO).sum())
    assert seen[0]["inputs_embeds"].shape[1] == text + expected
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


@pytest.mark.parametrize("version", VERSIONS)
def test_kept_tokens_keep_their_mrope_positions(version):
    model = tiny_qwen(version)
    batch = qwen_batch(TWO_SIZES)
    full, _ = model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    with vtoken.wrapped(model, "random", keep=0.5), torch.no_grad():
        seen = []  # what the model's own forward receives after vtoken's pre-hook
        handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
        model(**batch)
        handle.remove()
        kept = model.vtoken.stats.kept["projector"]
    positions = seen[0]["position_ids"]
    for row in range(2):
        image_positions = (batch["input_ids"][row] == Q_IMAGE).nonzero()[:, 0]
        expected = full[:, row, image_positions[kept[row]]]
        got = positions[:, row][:, seen[0]["mm_token_type_ids"][row] == 1]
        assert torch.equal(got, expected), f"row {row}: kept tokens moved"


@pytest.mark.parametrize("version", VERSIONS)
def test_llm_site_keep_all_and_exact_count(version):
    model = tiny_qwen(version)
    batch = qwen_batch(TWO_SIZES)
    expected = model.generate(**batch, max_new_tokens=5, do_sample=False)
    with vtoken.wrapped(model, "fastv", keep=1.0, site="llm(2)"):
        assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False), expected)
    with vtoken.wrapped(model, "dart", keep=0.5, site="llm(2)"), torch.no_grad():
        seen = []
        handle = model.model.language_model.layers[2].register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
        handle.remove()
    # rows keep their text and 12 and 4 visual tokens; padding goes, the shorter row is refilled with dead slots
    text = ((batch["input_ids"] != Q_IMAGE) & batch["attention_mask"].bool()).sum(1)
    assert seen[0].shape[1] == max(int(text[0]) + 12, int(text[1]) + 4)
    assert out.shape[1] == batch["input_ids"].shape[1] + 5


def received_attention_reference(model, batch, block_index, window: bool):
    """Dense float64 reference for Qwen's cls_attn substitute."""
    import transformers.vision_utils as vu

    visual = model.model.visual
    captured = {}
    handle = visual.blocks[block_index].register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(h=args[0], kw=kwargs), with_kwargs=True)
    with torch.no_grad():
        model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    handle.remove()
    block = visual.blocks[block_index]
    h = block.norm1(captured["h"]).double()
    n = h.shape[0]
    qkv = torch.nn.functional.linear(h, block.attn.qkv.weight.double(), block.attn.qkv.bias.double())
    q, k, _ = qkv.reshape(n, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = (t.double() for t in captured["kw"]["position_embeddings"])

    def rot(x):
        half = x.shape[-1] // 2
        return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]

    q, k = rot(q), rot(k)
    scores = torch.zeros(n, dtype=torch.float64)
    bounds = captured["kw"]["cu_seqlens"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        attention = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * block.attn.scaling
        scores[a:b] = attention.softmax(-1).mean(0).mean(0)
    merged = scores.view(-1, 4).mean(1)
    if window:
        index, _ = vu.get_vision_window_index(batch["image_grid_thw"], spatial_merge_size=2,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
        merged = merged[torch.argsort(index)]
    return torch.split(merged, (batch["image_grid_thw"].prod(-1) // 4).tolist())


@pytest.mark.parametrize("version,block", [("2", 2), ("2", 0), ("2.5", 3), ("2.5", 0)])
def test_cls_attn_substitute_equals_dense_reference(version, block):
    model = tiny_qwen(version)
    batch = qwen_batch(TWO_SIZES)
    expected = received_attention_reference(model, batch, block, window=version == "2.5")
    from vtoken.integrations import Qwen2VLIntegration

    integration = Qwen2VLIntegration(model, vtoken.Pipeline([vtoken.ClsAttn(layers=(block,))], keep=4))
    integration.encoder_sites = None
    with torch.no_grad():
        encoded = integration.encode_images(batch, {"cls_attn": {"layers": (block,)}})
    for unit, reference in zip(encoded.units, expected):
        torch.testing.assert_close(unit.signals["cls_attn"].double(), reference, atol=1e-6, rtol=1e-5)


def test_compact_positions_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="accepted: 'original'"):
        vtoken.wrap(tiny_qwen("2"), "kcenter", keep=4, positions="compact")


def test_unwrap_restores_qwen():
    model = tiny_qwen("2.5")
    batch = qwen_batch(TWO_SIZES)
    with torch.no_grad():
        expected = model(**batch).logits
    vtoken.wrap(model, "dart", keep=0.25, site="llm(2)")
    with torch.no_grad():
        model(**batch)
    vtoken.unwrap(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


@pytest.mark.parametrize("method,options", [("pixel_shuffle", dict(layer=0, ratio=1)),
                                            ("kcenter", dict(keep=1.0, site="vision(1)"))])
def test_vision_site_keep_all_matches_unwrapped(method, options):
    model = tiny_qwen("2")
    batch = qwen_batch(TWO_SIZES)
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, method, **options):
            got = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,options,kept", [
    ("pixel_shuffle", dict(layer=0), [6, 2]),
    ("kcenter", dict(keep=0.5, site="vision(1)"), [12, 4]),
    ("repshift", dict(keep=2, layer=1), [2, 2]),
    ("cls_attn", dict(keep=3, site="vision(0)"), [3, 3]),
])
def test_vision_site_prunes_whole_merge_groups(method, options, kept):
    model = tiny_qwen("2")
    batch = qwen_batch(TWO_SIZES)
    with vtoken.wrapped(model, method, **options):
        later = []
        handle = model.model.visual.blocks[2].register_forward_pre_hook(
            lambda module, args, kwargs: later.append(args[0].shape[0]), with_kwargs=True)
        seen, lm_handle = lm_inputs(model)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        handle.remove(), lm_handle.remove()
    text = ((batch["input_ids"] != Q_IMAGE) & batch["attention_mask"].bool()).sum(1).tolist()
    assert seen[0]["attention_mask"].sum(1).tolist() == [text[0] + kept[0], text[1] + kept[1]]
    assert later[0] == 4 * sum(kept), "later vision blocks see only the kept merge groups (4 patches each)"
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


