"""Qwen3-VL and Qwen3-VL-MoE (DeepStack), Qwen3.5 and Qwen3.5-MoE (hybrid decoder) on tiny random-init models."""

from __future__ import annotations

import pytest
import torch

import vtoken
from integrations_helpers import lm_inputs
from tiny_models import Q3_DEEPSTACK, Q_IMAGE, Q_VIDEO, qwen3_batch, tiny_qwen3_5, tiny_qwen3_vl

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3VLMoeForConditionalGeneration"):
    pytest.skip("Qwen3-VL needs a transformers with Qwen3VLForConditionalGeneration", allow_module_level=True)

MOE = [False, True]
# two image sizes (4 and 8 tokens) and a 2-frame clip (2 x 4 tokens, written frame by frame)
ROWS = [[20, ("image", 4, 4), 30, 31], [21, ("image", 8, 4), 22, ("video", 2, 4, 4), 32]]


@pytest.mark.parametrize("moe", MOE)
def test_keep_all_matches_unwrapped_logits(moe, attn_implementation):
    model = tiny_qwen3_vl(moe, attn_implementation)
    batch = qwen3_batch(ROWS)
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, "cls_attn+kcenter", keep=1.0):
            got = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


def _hand_pruned_logits(model, batch, kept_per_unit):
    """The reference: the model's own vision features and DeepStack features, the dropped placeholders
    removed by hand, each kept token at its original M-RoPE position, fed to the language model
    directly with the kept tokens' DeepStack features."""
    inner = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions, _ = inner.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"],
                                        video_grid_thw=batch["video_grid_thw"], attention_mask=mask)
    image = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    video = inner.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True)
    # per unit (images, then clips): features, DeepStack levels, kept slots
    units = [(image.pooler_output[i], [level[i] for level in image.deepstack_features]) for i in range(2)]
    units += [(video.pooler_output[0], [level[0] for level in video.deepstack_features])]
    by_token = {Q_IMAGE: [0, 1], Q_VIDEO: [2]}
    rows = [{"pos": [], "embeds": [], "visual": [], "stack": [[] for _ in Q3_DEEPSTACK]} for _ in range(ids.shape[0])]
    text_embeds = inner.get_input_embeddings()(ids)
    cursor = {Q_IMAGE: 0, Q_VIDEO: 0}  # next slot within the current unit of that kind
    current = {Q_IMAGE: 0, Q_VIDEO: 0}
    for r in range(ids.shape[0]):
        for p in range(ids.shape[1]):
            if not mask[r, p]:
                continue
            token = int(ids[r, p])
            row = rows[r]
            if token in by_token:
                unit = by_token[token][current[token]]
                features, stack = units[unit]
                slot = cursor[token]
                cursor[token] += 1
                if cursor[token] == features.shape[0]:
                    cursor[token], current[token] = 0, current[token] + 1
                if slot not in kept_per_unit[unit].tolist():
                    continue
                row["embeds"].append(features[slot])
                for level, values in enumerate(stack):
                    row["stack"][level].append(values[slot])
                row["visual"].append(True)
            else:
                row["embeds"].append(text_embeds[r, p])
                row["visual"].append(False)
            row["pos"].append(positions[:, r, p])
    width = max(len(row["embeds"]) for row in rows)
    logits = []
    for row in rows:  # one row at a time: no padding in the reference
        embeds = torch.stack(row["embeds"])[None]
        pos = torch.stack(row["pos"], dim=1)[:, None]
        visual = torch.tensor(row["visual"])[None]
        stack = [torch.stack(level) for level in row["stack"]]
        hidden = inner.language_model(inputs_embeds=embeds, position_ids=pos, visual_pos_masks=visual,
                                      deepstack_visual_embeds=stack).last_hidden_state
        logits.append(model.lm_head(hidden)[0])
    return logits, width


@pytest.mark.parametrize("moe", MOE)
@pytest.mark.parametrize("method", ["kcenter", "cls_attn", "random"])
def test_pruned_prefill_equals_hand_pruned_reference(moe, method):
    """keep=3 per image and per clip: the language model receives exactly 3 visual tokens per unit, every
    DeepStack level is taken at exactly those tokens, and the logits equal the hand-pruned forward."""
    model = tiny_qwen3_vl(moe)
    batch = qwen3_batch(ROWS, side="right")
    with vtoken.wrapped(model, method, keep=3), torch.no_grad():
        seen, handle = lm_inputs(model)
        got = model(**batch).logits
        handle.remove()
        kept = model.vtoken.stats.kept["projector"]
        assert [k.numel() for k in kept] == [3, 3, 3]
        lm = seen[0]
        assert lm["visual_pos_masks"].sum(1).tolist() == [3, 6]
        assert len(lm["deepstack_visual_embeds"]) == len(Q3_DEEPSTACK)
        expected, width = _hand_pruned_logits(model, batch, kept)
    assert got.shape[1] == width
    for row, reference in enumerate(expected):
        torch.testing.assert_close(got[row, : reference.shape[0]], reference, atol=1e-5, rtol=0)


def test_deepstack_features_follow_the_kept_tokens():
    """The DeepStack rows the language model receives are the full ones at the kept slots, per level."""
    model = tiny_qwen3_vl()
    batch = qwen3_batch([[20, ("image", 8, 4), 30]])
    with torch.no_grad():
        full = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        with vtoken.wrapped(model, "kcenter", keep=5):
            seen, handle = lm_inputs(model)
            model(**batch)
            handle.remove()
            kept = model.vtoken.stats.kept["projector"][0]
    for level, received in enumerate(seen[0]["deepstack_visual_embeds"]):
        torch.testing.assert_close(received, full.deepstack_features[level][0][kept], atol=0, rtol=0)


@pytest.mark.parametrize("moe", MOE)
def test_cached_generate_equals_no_cache_with_pruning(moe):
    model = tiny_qwen3_vl(moe)
    batch = qwen3_batch(ROWS, seed=3)
    with vtoken.wrapped(model, "kcenter", keep=3):
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        beams = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    assert torch.equal(cached, uncached)
    assert beams.shape[0] == 4


def test_llm_site_after_the_deepstack_layers_and_refusals():
    model = tiny_qwen3_vl()
    batch = qwen3_batch(ROWS)
    levels = len(Q3_DEEPSTACK)
    with vtoken.wrapped(model, "fastv", keep=3, site=f"llm({levels})"), torch.no_grad():
        model(**batch)
        counts = model.vtoken.stats.llm_layer_tokens  # the first row's visual tokens per decoder layer
        assert counts == [4] * levels + [3] * (4 - levels)
    with pytest.raises(ValueError, match="DeepStack level"):
        vtoken.wrap(model, "fastv", keep=3, site=f"llm({levels - 1})")
    with pytest.raises(ValueError, match="has no vision site for stage cls_attn: its DeepStack mergers read"):
        vtoken.wrap(model, "cls_attn", keep=3, site="vision(1)")
    with torch.no_grad():  # a refused wrap leaves the model as it was
        torch.testing.assert_close(model(**batch).logits, tiny_qwen3_vl()(**batch).logits)


# --- Qwen3.5 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("moe", MOE)
def test_qwen3_5_keep_all_and_pruned_counts(moe):
    model = tiny_qwen3_5(moe)
    batch = qwen3_batch(ROWS)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, "cls_attn+kcenter", keep=1.0):
            torch.testing.assert_close(model(**batch).logits[valid], expected[valid], atol=1e-5, rtol=0)
        with vtoken.wrapped(model, "kcenter", keep=3):
            seen, handle = lm_inputs(model)
            model(**batch)
            handle.remove()
            assert [k.numel() for k in model.vtoken.stats.kept["projector"]] == [3, 3, 3]
    text = ((batch["input_ids"] != Q_IMAGE) & (batch["input_ids"] != Q_VIDEO) & valid).sum(1)
    assert seen[0]["attention_mask"].sum(1).tolist() == (text + torch.tensor([3, 6])).tolist()


def test_qwen3_5_refuses_llm_and_vision_sites():
    model = tiny_qwen3_5()
    with pytest.raises(ValueError, match="linear-attention"):
        vtoken.wrap(model, "fastv", keep=3, site="llm(2)")
    with pytest.raises(ValueError, match="vision"):
        vtoken.wrap(model, "cls_attn", keep=3, site="vision(1)")


@pytest.mark.parametrize("build", [tiny_qwen3_vl, tiny_qwen3_5], ids=["qwen3_vl", "qwen3_5"])
def test_processor_from_disk_end_to_end(tmp_path, build):
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from tiny_processors import tiny_qwen3_vl_processor

    def image(width, height, seed):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))

    tiny_qwen3_vl_processor().save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = build()
    text = ["<|vision_start|><|image_pad|><|vision_end|> what is the color",
            "<|vision_start|><|image_pad|><|vision_end|> how many <|vision_start|><|image_pad|><|vision_end|>"]
    inputs = processor(images=[image(24, 16, 0), image(16, 16, 1), image(28, 20, 2)], text=text, padding=True,
                       return_tensors="pt")
    assert "mm_token_type_ids" in inputs and inputs["image_grid_thw"].shape[0] == 3
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with vtoken.wrapped(model, "kcenter", keep=1.0):
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), expected)
    with vtoken.wrapped(model, "kcenter", keep=0.5):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert [k.numel() for k in model.vtoken.stats.kept["projector"]] == [12, 8, 18]
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
