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
    directly with the kept tokens' DeepStack features. ``kept_per_unit``: the kept slots of each image,
    then of each clip."""
    inner = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions, _ = inner.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch.get("image_grid_thw"),
                                        video_grid_thw=batch.get("video_grid_thw"), attention_mask=mask)
    # per unit (images, then clips): features and DeepStack levels
    units, by_token = [], {}
    for kind, token, pixels, grids in (("image", Q_IMAGE, "pixel_values", "image_grid_thw"),
                                       ("video", Q_VIDEO, "pixel_values_videos", "video_grid_thw")):
        if batch.get(pixels) is None:
            continue
        out = getattr(inner, f"get_{kind}_features")(batch[pixels], batch[grids], return_dict=True)
        levels = getattr(out, "deepstack_features", None) or []
        by_token[token] = list(range(len(units), len(units) + len(out.pooler_output)))
        units += [(features, [level[i] for level in levels]) for i, features in enumerate(out.pooler_output)]
    depth = len(units[0][1])
    rows = [{"pos": [], "embeds": [], "visual": [], "stack": [[] for _ in range(depth)]} for _ in range(ids.shape[0])]
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
        deepstack = {}
        if depth:
            deepstack = dict(visual_pos_masks=visual, deepstack_visual_embeds=[torch.stack(v) for v in row["stack"]])
        hidden = inner.language_model(inputs_embeds=embeds, position_ids=pos, **deepstack).last_hidden_state
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


# several images and videos in one prompt: two images of different sizes and a clip, then a clip, an image
# and a 3-frame clip (timestamp tokens between the frames)
MULTI = [[20, ("image", 4, 4), 30, ("image", 8, 4), 31, ("video", 2, 4, 4), 32],
         [21, ("video", 2, 4, 4), 22, ("image", 4, 8), ("video", 3, 4, 4), 33]]


def _blocks_in_placeholder_order(batch):
    """(token, index among that kind, placeholder count) of each image and clip, in the order their
    placeholders appear (row by row), from the grids alone."""
    sizes = {}
    for token, key in ((Q_IMAGE, "image_grid_thw"), (Q_VIDEO, "video_grid_thw")):
        grids = [] if batch.get(key) is None else batch[key].tolist()
        sizes[token] = [t * h * w // 4 for t, h, w in grids]
    blocks, used, count = [], {Q_IMAGE: 0, Q_VIDEO: 0}, {Q_IMAGE: 0, Q_VIDEO: 0}
    for token in batch["input_ids"].flatten().tolist():
        if token not in sizes:
            continue
        if used[token] == 0:
            blocks.append((token, count[token], sizes[token][count[token]]))
        used[token] += 1
        if used[token] == sizes[token][count[token]]:
            used[token], count[token] = 0, count[token] + 1
    return blocks


def _per_clip(kept, batch, video_budget):
    """The kept slots of each image, then of each clip (a clip's frames joined under the 'frame' budget),
    from the record, which lists the units in placeholder order."""
    frames = batch["video_grid_thw"][:, 0].tolist()
    images = 0 if batch.get("image_grid_thw") is None else batch["image_grid_thw"].shape[0]
    out, rest = [None] * (images + len(frames)), list(kept)
    for token, index, _ in _blocks_in_placeholder_order(batch):
        units = frames[index] if token == Q_VIDEO and video_budget == "frame" else 1
        out[index if token == Q_IMAGE else images + index] = torch.cat(rest[:units])
        rest = rest[units:]
    assert not rest
    return out


@pytest.mark.parametrize("video_budget", ["clip", "frame"])
@pytest.mark.parametrize("build", [tiny_qwen3_vl, tiny_qwen3_5], ids=["qwen3_vl", "qwen3_5"])
def test_several_images_and_videos_equal_hand_pruned_reference(build, video_budget):
    """Two images of different sizes and clips in one prompt, per clip or per frame budgets: every image
    and clip (or frame) keeps 2 tokens, the timestamps stay, each kept token keeps its (t, h, w) position
    and the text after it continues from the unpruned extent (the reference feeds get_rope_index's
    positions of the full prompt at the kept tokens)."""
    model = build()
    batch = qwen3_batch(MULTI, side="right", seed=5)
    with vtoken.wrapped(model, "kcenter", keep=2, video_budget=video_budget), torch.no_grad():
        seen, handle = lm_inputs(model)
        got = model(**batch).logits
        handle.remove()
        kept = model.vtoken.stats.kept["projector"]
        frames = batch["video_grid_thw"][:, 0].tolist()
        units = 3 + (sum(frames) if video_budget == "frame" else len(frames))
        assert [k.numel() for k in kept] == [2] * units
        per_clip = _per_clip(kept, batch, video_budget)
        expected, width = _hand_pruned_logits(model, batch, per_clip)
    visual = 2 * (torch.tensor([[1, 1, frames[0]], [frames[1], 1, frames[2]]]) if video_budget == "frame"
                  else torch.ones(2, 3, dtype=torch.long)).sum(1)
    text = ((batch["input_ids"] != Q_IMAGE) & (batch["input_ids"] != Q_VIDEO) & batch["attention_mask"].bool()).sum(1)
    assert seen[0]["attention_mask"].sum(1).tolist() == (text + visual).tolist()
    assert got.shape[1] == width
    for row, reference in enumerate(expected):
        torch.testing.assert_close(got[row, : reference.shape[0]], reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("video_budget", ["clip", "frame"])
def test_several_images_and_videos_keep_all_and_generate(video_budget):
    model = tiny_qwen3_vl()
    batch = qwen3_batch(MULTI, seed=6)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model(**batch).logits
        with vtoken.wrapped(model, "kcenter", keep=1.0, video_budget=video_budget):
            torch.testing.assert_close(model(**batch).logits[valid], expected[valid], atol=1e-5, rtol=0)
    with vtoken.wrapped(model, "kcenter", keep=2, video_budget=video_budget):
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : batch["input_ids"].shape[1]], batch["input_ids"])


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


def test_llm_sites_inside_and_after_the_deepstack_layers_and_refusals():
    model = tiny_qwen3_vl()
    batch = qwen3_batch(ROWS)
    levels = len(Q3_DEEPSTACK)
    for site in range(1, levels + 1):
        with vtoken.wrapped(model, "fastv", keep=3, site=f"llm({site})"), torch.no_grad():
            model(**batch)
            counts = model.vtoken.stats.llm_layer_tokens  # the first row's visual tokens per decoder layer
            assert counts == [4] * site + [3] * (4 - site)
    with pytest.raises(ValueError, match="has no vision site for stage cls_attn: its DeepStack mergers read"):
        vtoken.wrap(model, "cls_attn", keep=3, site="vision(1)")
    with torch.no_grad():  # a refused wrap leaves the model as it was
        torch.testing.assert_close(model(**batch).logits, tiny_qwen3_vl()(**batch).logits)


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]


def _hand_pruned_inside_deepstack(model, single, site, kept):
    """The reference for one unpadded row with an llm(K) site inside the DeepStack layers: the unwrapped
    model's own language-model inputs (embeddings, positions, visual mask, DeepStack levels), run layer by
    layer; at layer K the sequence becomes the text and the kept visual positions (``kept``: indices among
    the row's visual positions), and each remaining level is added after its layer at the kept ones."""
    lm = model.model.language_model
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**single)
    handle.remove()
    inputs = seen[0]
    hidden, positions = inputs["inputs_embeds"], inputs["position_ids"]
    text_positions, positions = (positions[0], positions[1:]) if positions.shape[0] == 4 else (None, positions)
    rotary = lm.rotary_emb(hidden, positions)
    visual, stack = inputs["visual_pos_masks"][0], list(inputs["deepstack_visual_embeds"])
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            if index == site:
                keep = ~visual
                keep[visual.nonzero()[:, 0][kept]] = True
                hidden, visual = hidden[:, keep], visual[keep]
                rotary = tuple(table[:, keep] for table in rotary)
                text_positions = None if text_positions is None else text_positions[:, keep]
                stack = [level[kept] for level in stack]
            hidden = layer(hidden, attention_mask=_causal(hidden.shape[1]), position_ids=text_positions,
                           position_embeddings=rotary)
            if index < len(stack):
                hidden = hidden.clone()
                hidden[0, visual] = hidden[0, visual] + stack[index]
        return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("moe", MOE)
@pytest.mark.parametrize("method", ["fastv", "kcenter", "dart"])
def test_llm_site_inside_the_deepstack_layers_equals_hand_pruned_reference(moe, method):
    """llm(1) with two DeepStack levels: level 0 goes to every visual token, level 1 only to the kept ones
    (3 per image or clip), at their positions in the shortened sequence."""
    model = tiny_qwen3_vl(moe)
    for row in ROWS:
        single = qwen3_batch([row], seed=2)
        with vtoken.wrapped(model, method, keep=3, site="llm(1)"), torch.no_grad():
            got = model(**single).logits
            kept = model.vtoken.stats.kept["llm(1)"][0]
        assert kept.numel() == 3 * sum(not isinstance(item, int) for item in row)
        expected = _hand_pruned_inside_deepstack(model, single, 1, kept)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


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


# --- the contract with several images and videos per prompt -------------------------------------------
# contract_models.MULTI_VISUAL_CASES: the Qwen3 families on rows with two images of different sizes, a video,
# an image and a video. Every clause of test_contract.py runs on them; the labels clause is replaced below by
# one that lays the labels out along each kept visual run (test_contract's reference assumes one image a row).
import test_contract as contract  # noqa: E402
from contract_models import MULTI_VISUAL_CASES  # noqa: E402

MULTI_STAGES = [pytest.param(case, stage, id=f"{case.name}-{stage.id}") for case in MULTI_VISUAL_CASES
                for stage in case.stages]


@pytest.mark.parametrize("case,stage", MULTI_STAGES)
def test_multi_visual_contract(case, stage):
    contract.run_clauses_without_labels(case, stage)


def _surviving_labels(model, batch, labels, width):
    """The labels at the positions the returned logits hold: each row's text and the visual tokens every
    site kept (from the call's selection records, site by site), together at the end of the row (left
    padding)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    visual = (ids == Q_IMAGE) | (ids == Q_VIDEO)
    records = model.vtoken.stats.kept
    if "projector" in records:  # kept slots per image or clip, in placeholder order (the record's order)
        blocks = iter([(set(k.tolist()), size) for k, (_, _, size)
                       in zip(records["projector"], _blocks_in_placeholder_order(batch))])
        slots, size, slot = set(), 0, 0
        for r, p in visual.nonzero().tolist():
            if slot == size:
                (slots, size), slot = next(blocks), 0
            visual[r, p] = slot in slots
            slot += 1
    llm_sites = sorted((site for site in records if site.startswith("llm(")), key=lambda site: int(site[4:-1]))
    for site in llm_sites:  # each row's kept visual tokens, indexed in the row's present visual order
        for r, kept in enumerate(records[site]):
            positions = visual[r].nonzero()[:, 0]
            visual[r] = False
            visual[r, positions[kept]] = True
    present = (mask & (ids != Q_IMAGE) & (ids != Q_VIDEO)) | visual
    out = torch.full((ids.shape[0], width), -100, dtype=labels.dtype)
    for r in range(ids.shape[0]):
        values = labels[r][present[r]]
        out[r, width - values.numel():] = values
    return out


@pytest.mark.parametrize("case,stage", MULTI_STAGES)
def test_multi_visual_labels_give_the_loss_of_the_returned_logits(case, stage):
    model = case.model()
    batch = case.batch("left")
    labels = batch["input_ids"].masked_fill((batch["input_ids"] == Q_IMAGE) | (batch["input_ids"] == Q_VIDEO), -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
        with vtoken.wrapped(model, stage.method, **stage.keep_all):
            torch.testing.assert_close(model(**batch, labels=labels).loss, expected, atol=1e-5, rtol=0)
        with vtoken.wrapped(model, stage.method, **stage.prune):
            out = model(**batch, labels=labels)
            aligned = _surviving_labels(model, batch, labels, out.logits.shape[1])
            shortened = any(site == "projector" or site.startswith("llm(") for site in model.vtoken.stats.kept)
    assert aligned.shape[1] < labels.shape[1] if shortened else torch.equal(aligned, labels)
    reference = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), aligned[:, 1:].flatten(),
                                                  ignore_index=-100)
    torch.testing.assert_close(out.loss, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("video_budget", ["clip", "frame"])
def test_processor_from_disk_drives_generate_on_a_video(tmp_path, video_budget):
    """Qwen3-VL's processor, saved and reloaded, writes a clip as timestamped frames; generate() with pruning
    keeps the budget per clip or per frame, keep=1.0 equals the unwrapped model, and the prompt comes back."""
    import numpy as np
    from transformers import AutoProcessor

    from tiny_processors import tiny_qwen3_vl_processor

    tiny_qwen3_vl_processor().save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 24, 3), dtype=np.uint8)  # 4 frames, 2 temporal patches
    image = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    text = ["<|vision_start|><|video_pad|><|vision_end|> what is the color",
            "<|vision_start|><|image_pad|><|vision_end|> how many <|vision_start|><|video_pad|><|vision_end|>"]
    inputs = processor(text=text, images=[image], videos=[frames, frames[:, :, :16]], padding=True,
                       return_tensors="pt", videos_kwargs=dict(do_sample_frames=False, fps=2.0))
    grids = inputs["video_grid_thw"].tolist()
    assert grids == [[2, 8, 12], [2, 8, 8]]
    starts = (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum(1)
    assert starts.tolist() == [1 + 2, 1 + 1 + 2]  # each frame its own run, inside the prompt's own
    model = tiny_qwen3_vl()
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with vtoken.wrapped(model, "kcenter", keep=1.0, video_budget=video_budget):
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), expected)
    with vtoken.wrapped(model, "kcenter", keep=0.5, video_budget=video_budget):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        kept = [k.numel() for k in model.vtoken.stats.kept["projector"]]
    # placeholder order: the first row's clip, the second row's image, then its clip
    assert kept == ([24, 8, 16] if video_budget == "clip" else [12, 12, 8, 8, 8])
    assert torch.equal(out, uncached)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
