"""The vLLM plugin for Qwen2.5-VL against vtoken's transformers integration on the same checkpoint."""

from __future__ import annotations

import math
import re
from importlib.metadata import entry_points

import pytest
import torch
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm_helpers import ARCH, IMAGE_PAD, PROMPT, images, model_config, vllm_process

import vtoken
from vtoken.serving.plan import parse_plan

SIZES = [(16, 24), (32, 16), (28, 28), (8, 40), (40, 40)]  # pixels; the processor resizes to whole 4 px cells
PLANS = [  # the plan, and the placeholders an image of n merged tokens gets, written out independently
    ({"method": "kcenter", "keep": 0.25}, lambda n: max(1, math.floor(0.25 * n + 0.5))),
    ({"method": "random", "keep": 5, "seed": 3}, lambda n: 5),
    ({"method": "dart", "keep": "0.5"}, lambda n: max(1, math.floor(0.5 * n + 0.5))),
]


def test_plugin_loads_through_its_entry_point():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    assert "vtoken" in {ep.name for ep in entry_points(group="vllm.general_plugins")}
    load_general_plugins()
    assert ARCH in ModelRegistry.get_supported_archs()


@pytest.mark.parametrize("entry, reason", [
    ({"method": "fastv", "keep": 0.5}, "prompt-dependent, an llm(K) stage chooses"),
    ({"method": "kcenter@llm(2)", "keep": 0.5}, "prompt-dependent, an llm(K) stage chooses"),
    ({"method": "decode_topk", "keep": 0.5}, "prompt-dependent, a decode stage chooses"),
    ({"method": "kcenter+fastv", "keep": 0.5}, "fastv@llm(2) cannot be served: it is prompt-dependent"),
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


def test_the_architecture_without_a_plan_is_refused(checkpoint):
    with pytest.raises(ValueError, match="needs its plan"):
        vllm_process(model_config(checkpoint, None), PROMPT, images([(16, 24), (16, 24)]))


@pytest.mark.parametrize("plan, expected", PLANS)
def test_each_image_gets_exactly_the_kept_count_of_placeholders(checkpoint, plan, expected):
    from transformers import AutoProcessor

    hf_processor = AutoProcessor.from_pretrained(checkpoint)
    config = model_config(checkpoint, plan)
    for first, second in zip(SIZES, SIZES[1:] + SIZES[:1]):
        pictures = images([first, second])
        grids = hf_processor.image_processor(pictures, return_tensors="pt")["image_grid_thw"].tolist()
        counts = [expected(h * w // 4) for _, h, w in grids]
        out = vllm_process(config, PROMPT, pictures)
        ranges = out["mm_placeholders"]["image"]
        assert [r.length for r in ranges] == counts
        ids = out["prompt_token_ids"]
        assert ids.count(IMAGE_PAD) == sum(counts)
        assert all(ids[r.offset + i] == IMAGE_PAD for r in ranges for i in range(r.length))

def test_vllms_own_architecture_is_left_unpruned(checkpoint):
    from transformers import AutoProcessor

    pictures = images(SIZES[:2])
    grids = AutoProcessor.from_pretrained(checkpoint).image_processor(pictures, return_tensors="pt")["image_grid_thw"]
    stock = vllm_process(model_config(checkpoint, None, arch="Qwen2_5_VLForConditionalGeneration"), PROMPT, pictures)
    assert [r.length for r in stock["mm_placeholders"]["image"]] == [h * w // 4 for _, h, w in grids.tolist()]


def test_multimodal_cache_keys_carry_the_plan(checkpoint):
    pictures = images([(16, 24), (32, 16)])
    quarter = vllm_process(model_config(checkpoint, {"method": "kcenter", "keep": 0.25}), PROMPT, pictures)
    again = vllm_process(model_config(checkpoint, {"keep": 0.25, "method": "kcenter"}), PROMPT, pictures)
    half = vllm_process(model_config(checkpoint, {"method": "kcenter", "keep": 0.5}), PROMPT, pictures)
    stock = vllm_process(model_config(checkpoint, None, arch="Qwen2_5_VLForConditionalGeneration"), PROMPT, pictures)
    keys = [out["mm_hashes"]["image"] for out in (quarter, again, half, stock)]
    assert keys[0] == keys[1]  # the same plan, written in another order
    assert len({key for row in (keys[0], keys[2], keys[3]) for key in row}) == 6


def test_cache_keys_carry_the_plan_also_for_client_given_ids(checkpoint):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    keys = []
    for plan in ({"method": "kcenter", "keep": 0.25}, {"method": "kcenter", "keep": 0.5}):
        processor = MULTIMODAL_REGISTRY.create_processor(model_config(checkpoint, plan))
        out = processor(PROMPT, processor.info.parse_mm_data({"image": images([(16, 24), (32, 16)])}),
                        mm_uuid_items={"image": ["first", "second"]})
        keys.append(out["mm_hashes"]["image"])
    assert [key.split("+vtoken-")[0] for key in keys[0]] == ["first", "second"]
    assert not set(keys[0]) & set(keys[1])


def transformers_run(checkpoint, plan: dict, pictures):
    """vtoken's transformers integration on the checkpoint: the decoder's input embeddings and M-RoPE
    positions (last three rows), and the slots kept per image."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from integrations_helpers import lm_inputs

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    batch = AutoProcessor.from_pretrained(checkpoint)(text=[PROMPT], images=pictures, return_tensors="pt")
    options = {k: v for k, v in plan.items() if k not in ("method", "keep")}
    vtoken.wrap(model, plan["method"], keep=vtoken.budget.parse_budget(plan["keep"]), **options)
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    kwargs = seen[0]
    return kwargs["inputs_embeds"][0], kwargs["position_ids"][-3:, 0], model.vtoken.stats.kept["projector"]


@pytest.mark.parametrize("plan", [
    {"method": "kcenter", "keep": 0.25},
    {"method": "dart", "keep": 0.5},
    {"method": "random", "keep": 5, "seed": 3},
    {"method": "pool", "keep": 0.25},
])
def test_kept_embeddings_and_positions_equal_the_transformers_integration(checkpoint, vllm_model, plan):
    model, _ = vllm_model
    model.vtoken_plan = parse_plan(plan)  # the same model weights under each plan
    pictures = images([(16, 24), (32, 16)], seed=1)
    out = vllm_process(model_config(checkpoint, plan), PROMPT, pictures)
    items = out["mm_kwargs"]["image"]
    with torch.no_grad():
        embeddings = model.embed_multimodal(
            pixel_values=torch.cat([item["pixel_values"].data for item in items]),
            image_grid_thw=torch.stack([item["image_grid_thw"].data for item in items]),
        )
    ids = out["prompt_token_ids"]
    features = [MultiModalFeatureSpec(data=item, modality="image", identifier=key, mm_position=where)
                for item, key, where in zip(items, out["mm_hashes"]["image"], out["mm_placeholders"]["image"])]
    laid_out, _ = model.get_mrope_input_positions(ids, features)
    kept, positions, _ = model.recompute_mrope_positions(ids, list(embeddings), laid_out, 0)

    embeds, expected_positions, expected_slots = transformers_run(checkpoint, plan, pictures)
    assert [s.tolist() for s in model.last_kept] == [s.tolist() for s in expected_slots]
    assert positions.tolist() == expected_positions.tolist()
    image_rows = torch.tensor(ids) == IMAGE_PAD
    assert embeds.shape[0] == len(ids)
    torch.testing.assert_close(torch.cat(kept), embeds[image_rows], rtol=0, atol=1e-5)


def test_the_runner_takes_the_position_path(vllm_model):
    """vLLM's model runner strips the position channels and recomputes positions only for a model that
    supports multimodal pruning, while its multimodal config says pruning is on."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    model, vllm_config = vllm_model
    assert supports_multimodal_pruning(model)
    assert vllm_config.model_config.multimodal_config.is_multimodal_pruning_enabled()
    assert vllm_config.model_config.multimodal_config.video_pruning_rate is None  # EVS itself stays off


@pytest.mark.parametrize("split", [1, 3, 5, 12, 15, 20])
def test_positions_are_the_same_when_the_prompt_is_prefilled_in_chunks(checkpoint, vllm_model, split):
    """Chunked prefill: the runner passes each chunk the part of each image's embeddings inside it and the
    positions as the earlier chunks left them; the result equals one pass over the whole prompt."""
    model, _ = vllm_model
    plan = {"method": "kcenter", "keep": 0.25}
    model.vtoken_plan = parse_plan(plan)
    out = vllm_process(model_config(checkpoint, plan), PROMPT, images([(16, 24), (32, 16)], seed=2))
    items, ranges = out["mm_kwargs"]["image"], out["mm_placeholders"]["image"]
    with torch.no_grad():
        embeddings = model.embed_multimodal(
            pixel_values=torch.cat([item["pixel_values"].data for item in items]),
            image_grid_thw=torch.stack([item["image_grid_thw"].data for item in items]),
        )
    ids = out["prompt_token_ids"]
    features = [MultiModalFeatureSpec(data=item, modality="image", identifier=key, mm_position=where)
                for item, key, where in zip(items, out["mm_hashes"]["image"], ranges)]
    laid_out, _ = model.get_mrope_input_positions(ids, features)
    _, whole, whole_delta = model.recompute_mrope_positions(ids, list(embeddings), laid_out.clone(), 0)

    positions, delta = laid_out.clone(), None
    for start, end in ((0, split), (split, len(ids))):
        parts = [e[max(start - r.offset, 0):min(end - r.offset, r.length)] for e, r in zip(embeddings, ranges)
                 if max(start - r.offset, 0) < min(end - r.offset, r.length)]
        _, positions, delta = model.recompute_mrope_positions(ids, parts, positions, start)
    assert positions.tolist() == whole.tolist()
    assert delta == whole_delta
