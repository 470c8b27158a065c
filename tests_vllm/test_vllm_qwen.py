"""The vLLM plugin (Qwen2.5-VL, Qwen3-VL) against vtoken's transformers integrations on the same checkpoints."""

from __future__ import annotations

import math
import re
from importlib.metadata import entry_points

import pytest
import torch
from vllm.config import set_current_vllm_config
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm_helpers import FAMILIES, IMAGE_PAD, PROMPT, QWEN_FAMILIES, images, model_config, vllm_process

import vtoken
from vtoken.serving.plan import parse_plan

SIZES = [(16, 24), (32, 16), (28, 28), (8, 40), (40, 40)]  # pixels; the processor resizes to whole 4 px cells
PLANS = [  # the plan, and the placeholders an image of n merged tokens gets, written out independently
    ({"method": "kcenter", "keep": 0.25}, lambda n: max(1, math.floor(0.25 * n + 0.5))),
    ({"method": "random", "keep": 5, "seed": 3}, lambda n: 5),
    ({"method": "dart", "keep": "0.5"}, lambda n: max(1, math.floor(0.5 * n + 0.5))),
]
FAMILY_NAMES = QWEN_FAMILIES


def test_plugin_loads_through_its_entry_point():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    assert "vtoken" in {ep.name for ep in entry_points(group="vllm.general_plugins")}
    load_general_plugins()
    assert {family["arch"] for family in FAMILIES.values()} <= set(ModelRegistry.get_supported_archs())


@pytest.mark.parametrize("entry, reason", [
    ({"method": "fastv", "keep": 0.5}, "prompt-dependent, an llm(K) stage chooses"),
    ({"method": "kcenter@llm(2)", "keep": 0.5}, "prompt-dependent, an llm(K) stage chooses"),
    ({"method": "kcenter+fastv", "keep": 0.5}, "fastv@llm(2) cannot be served: it is prompt-dependent"),
    ({"method": "decode_topk", "keep": 0.5}, "prompt-dependent, a decode stage chooses"),
    ({"method": "cdpruner", "keep": 0.5}, "prompt-dependent, scoring the image's tokens against the prompt's text"),
    ({"method": "cls_attn", "keep": 0.5}, "needs 'cls_attn' ([CLS] attention) from inside the vision tower"),
    ({"method": "hiprune", "keep": 0.5}, "from inside the vision tower"),
    ({"method": "kcenter@vision(1)", "keep": 0.5}, "prunes at the projector only"),
    ({"method": "dycoke"}, "prunes video clips"),
    ({"method": "kcenter", "keep": 0.5, "positions": "compact"}, "accepted: 'original'"),
    ({"method": "kcenter", "keep": 2.0}, "must be in (0, 1]"),
    ("kcenter", "must be an object with a method"),
])
def test_prompt_dependent_and_bad_plans_are_refused_with_the_reason(entry, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_plan(entry)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_architecture_without_a_plan_is_refused(checkpoints, family):
    with pytest.raises(ValueError, match="needs its plan"):
        vllm_process(model_config(checkpoints(family), None, FAMILIES[family]["arch"]), PROMPT,
                     images([(16, 24), (16, 24)]))


def hf_grids(checkpoint, pictures) -> list[list[int]]:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint).image_processor(pictures, return_tensors="pt")[
        "image_grid_thw"].tolist()


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("plan, expected", PLANS)
def test_each_image_gets_exactly_the_kept_count_of_placeholders(checkpoints, family, plan, expected):
    config = model_config(checkpoints(family), plan, FAMILIES[family]["arch"])
    for first, second in zip(SIZES, SIZES[1:] + SIZES[:1]):
        pictures = images([first, second])
        counts = [expected(h * w // 4) for _, h, w in hf_grids(checkpoints(family), pictures)]
        out = vllm_process(config, PROMPT, pictures)
        ranges = out["mm_placeholders"]["image"]
        assert [r.length for r in ranges] == counts
        ids = out["prompt_token_ids"]
        assert ids.count(IMAGE_PAD) == sum(counts)
        assert all(ids[r.offset + i] == IMAGE_PAD for r in ranges for i in range(r.length))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_vllms_own_architecture_is_left_unpruned(checkpoints, family):
    pictures = images(SIZES[:2])
    config = model_config(checkpoints(family), None, FAMILIES[family]["stock"])
    stock = vllm_process(config, PROMPT, pictures)
    expected = [h * w // 4 for _, h, w in hf_grids(checkpoints(family), pictures)]
    assert [r.length for r in stock["mm_placeholders"]["image"]] == expected


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_multimodal_cache_keys_carry_the_plan(checkpoints, family):
    checkpoint, arch = checkpoints(family), FAMILIES[family]["arch"]
    pictures = images([(16, 24), (32, 16)])
    quarter = vllm_process(model_config(checkpoint, {"method": "kcenter", "keep": 0.25}, arch), PROMPT, pictures)
    again = vllm_process(model_config(checkpoint, {"keep": 0.25, "method": "kcenter"}, arch), PROMPT, pictures)
    half = vllm_process(model_config(checkpoint, {"method": "kcenter", "keep": 0.5}, arch), PROMPT, pictures)
    stock = vllm_process(model_config(checkpoint, None, FAMILIES[family]["stock"]), PROMPT, pictures)
    keys = [out["mm_hashes"]["image"] for out in (quarter, again, half, stock)]
    assert keys[0] == keys[1]  # the same plan, written in another order
    assert len({key for row in (keys[0], keys[2], keys[3]) for key in row}) == 6
    given = [vllm_process(model_config(checkpoint, plan, arch), PROMPT, pictures,
                          mm_uuid_items={"image": ["first", "second"]})["mm_hashes"]["image"]
             for plan in ({"method": "kcenter", "keep": 0.25}, {"method": "kcenter", "keep": 0.5})]
    assert [key.split("+vtoken-")[0] for key in given[0]] == ["first", "second"]  # client-given ids keep theirs
    assert not set(given[0]) & set(given[1])


def run_vllm(vllm_models, checkpoints, family: str, plan: dict, pictures):
    """The plugin model under ``plan``: the prompt, its placeholder ranges, the model's embeddings (with
    position channels) and the positions laid out before they are known."""
    model, vllm_config = vllm_models(family)
    model.vtoken_plan = parse_plan(plan)  # the same model weights under each plan
    out = vllm_process(model_config(checkpoints(family), plan, FAMILIES[family]["arch"]), PROMPT, pictures)
    items, ranges = out["mm_kwargs"]["image"], out["mm_placeholders"]["image"]
    with set_current_vllm_config(vllm_config), torch.no_grad():
        embeddings = model.embed_multimodal(
            pixel_values=torch.cat([item["pixel_values"].data for item in items]),
            image_grid_thw=torch.stack([item["image_grid_thw"].data for item in items]),
        )
    ids = out["prompt_token_ids"]
    features = [MultiModalFeatureSpec(data=item, modality="image", identifier=key, mm_position=where)
                for item, key, where in zip(items, out["mm_hashes"]["image"], ranges)]
    laid_out, _ = model.get_mrope_input_positions(ids, features)
    return model, ids, ranges, list(embeddings), laid_out


def transformers_run(checkpoint, plan: dict, pictures):
    """vtoken's transformers integration on the checkpoint: what the decoder receives (input embeddings,
    M-RoPE positions, Qwen3-VL's DeepStack levels at the kept tokens), and the slots kept per image."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from integrations_helpers import lm_inputs

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    batch = AutoProcessor.from_pretrained(checkpoint)(text=[PROMPT], images=pictures, return_tensors="pt")
    options = {k: v for k, v in plan.items() if k not in ("method", "keep")}
    vtoken.wrap(model, plan["method"], keep=vtoken.budget.parse_budget(plan["keep"]), **options)
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen[0], model.vtoken.stats.kept["projector"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("plan", [
    {"method": "kcenter", "keep": 0.25},
    {"method": "dart", "keep": 0.5},
    {"method": "random", "keep": 5, "seed": 3},
    {"method": "pool", "keep": 0.25},
])
def test_kept_embeddings_and_positions_equal_the_transformers_integration(vllm_models, checkpoints, family, plan):
    pictures = images([(16, 24), (32, 16)], seed=1)
    model, ids, _, embeddings, laid_out = run_vllm(vllm_models, checkpoints, family, plan, pictures)
    kept, positions, _ = model.recompute_mrope_positions(ids, embeddings, laid_out, 0)

    seen, expected_slots = transformers_run(checkpoints(family), plan, pictures)
    assert [s.tolist() for s in model.last_kept] == [s.tolist() for s in expected_slots]
    assert positions.tolist() == seen["position_ids"][-3:, 0].tolist()
    embeds = seen["inputs_embeds"][0]
    assert embeds.shape[0] == len(ids)
    kept = torch.cat(kept)
    width = embeds.shape[1]
    torch.testing.assert_close(kept[:, :width], embeds[torch.tensor(ids) == IMAGE_PAD], rtol=0, atol=1e-5)
    levels = seen.get("deepstack_visual_embeds") or []
    assert kept.shape[1] == width * (1 + len(levels))
    assert len(levels) == (2 if family == "qwen3_vl" else 0)
    for level, expected in enumerate(levels):  # DeepStack: each level at the same kept tokens
        torch.testing.assert_close(kept[:, width * (level + 1):width * (level + 2)], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_runner_takes_the_position_path(vllm_models, family):
    """vLLM's model runner strips the position channels and recomputes positions only for a model that
    supports multimodal pruning, while its multimodal config says pruning is on."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    model, vllm_config = vllm_models(family)
    assert supports_multimodal_pruning(model)
    assert vllm_config.model_config.multimodal_config.is_multimodal_pruning_enabled()
    assert vllm_config.model_config.multimodal_config.video_pruning_rate is None  # EVS itself stays off


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_positions_are_the_same_when_the_prompt_is_prefilled_in_chunks(vllm_models, checkpoints, family):
    """Chunked prefill: the runner passes each chunk the part of each image's embeddings inside it and the
    positions as the earlier chunks left them; the result equals one pass over the whole prompt."""
    plan = {"method": "kcenter", "keep": 0.25}
    model, ids, ranges, embeddings, laid_out = run_vllm(vllm_models, checkpoints, family, plan,
                                                        images([(16, 24), (32, 16)], seed=2))
    _, whole, whole_delta = model.recompute_mrope_positions(ids, embeddings, laid_out.clone(), 0)
    first, second = ranges
    splits = [1, first.offset + 1, first.offset + first.length + 2, second.offset + 3, len(ids) - 1]
    for split in splits:  # before, inside, between and after the images
        positions, delta = laid_out.clone(), None
        for start, end in ((0, split), (split, len(ids))):
            parts = [e[max(start - r.offset, 0):min(end - r.offset, r.length)] for e, r in zip(embeddings, ranges)
                     if max(start - r.offset, 0) < min(end - r.offset, r.length)]
            _, positions, delta = model.recompute_mrope_positions(ids, parts, positions, start)
        assert positions.tolist() == whole.tolist()
        assert delta == whole_delta


def test_qwen3_vl_refuses_videos_with_the_reason(checkpoints):
    import numpy as np
    from vllm.multimodal import MULTIMODAL_REGISTRY

    config = model_config(checkpoints("qwen3_vl"), {"method": "kcenter", "keep": 0.25}, FAMILIES["qwen3_vl"]["arch"])
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    video = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    metadata = {"fps": 2.0, "duration": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3],
                "video_backend": "opencv", "do_sample_frames": False}
    with pytest.raises(ValueError, match="serves images only"):
        processor("<|vision_start|><|video_pad|><|vision_end|> what",
                  processor.info.parse_mm_data({"video": [(video, metadata)]}))
