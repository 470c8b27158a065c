"""The vLLM plugin for LLaVA-1.5 against vtoken's LLaVA integration (positions="compact") on the same checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from vllm.config import set_current_vllm_config
from vllm_helpers import FAMILIES, images, model_config, vllm_process

import vtoken
from vtoken.serving.plan import LLAVA_POSITIONS, parse_plan

ARCH = FAMILIES["llava"]["arch"]
IMAGE = 3  # tiny_models.IMAGE_TOKEN
TOKENS = 144  # tiny_models.TOKENS_PER_IMAGE: a 12 x 12 patch grid
PROMPT = "what <image> is in <image> red"


@pytest.mark.parametrize("plan, kept", [
    ({"method": "kcenter", "keep": 0.25}, math.floor(0.25 * TOKENS + 0.5)),
    ({"method": "dart", "keep": 64}, 64),
    ({"method": "pool", "keep": 36}, 36),
])
def test_each_image_gets_exactly_the_kept_count_of_placeholders(checkpoints, plan, kept):
    config = model_config(checkpoints("llava"), plan, ARCH)
    for sizes in ([(16, 24), (200, 100)], [(168, 168), (40, 300)]):  # the processor resizes every image alike
        out = vllm_process(config, PROMPT, images(sizes))
        ranges = out["mm_placeholders"]["image"]
        assert [r.length for r in ranges] == [kept, kept]
        assert out["prompt_token_ids"].count(IMAGE) == 2 * kept
    stock = vllm_process(model_config(checkpoints("llava"), None, FAMILIES["llava"]["stock"]), PROMPT,
                         images([(16, 24), (200, 100)]))
    assert [r.length for r in stock["mm_placeholders"]["image"]] == [TOKENS, TOKENS]


def test_original_positions_are_refused_and_cache_keys_carry_the_plan(checkpoints):
    with pytest.raises(ValueError, match="numbers a prompt's positions itself"):
        parse_plan({"method": "kcenter", "keep": 0.25, "positions": "original"}, LLAVA_POSITIONS)
    pictures = images([(16, 24), (200, 100)])
    keys = [vllm_process(model_config(checkpoints("llava"), plan, ARCH), PROMPT, pictures)["mm_hashes"]["image"]
            for plan in ({"method": "kcenter", "keep": 0.25}, {"method": "kcenter", "keep": 0.5})]
    assert not set(keys[0]) & set(keys[1])


@pytest.mark.parametrize("plan", [
    {"method": "kcenter", "keep": 0.25},
    {"method": "dart", "keep": 64},
    {"method": "random", "keep": 20, "seed": 1},
    {"method": "pool", "keep": 36},
])
def test_kept_embeddings_equal_the_transformers_integration(vllm_models, checkpoints, plan):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from integrations_helpers import lm_inputs

    model, vllm_config = vllm_models("llava")
    model.vtoken_plan = parse_plan(plan, LLAVA_POSITIONS)  # the same model weights under each plan
    pictures = images([(16, 24), (200, 100)], seed=3)
    out = vllm_process(model_config(checkpoints("llava"), plan, ARCH), PROMPT, pictures)
    items = out["mm_kwargs"]["image"]
    with set_current_vllm_config(vllm_config), torch.no_grad():
        kept = model.embed_multimodal(pixel_values=torch.stack([item["pixel_values"].data for item in items]))

    reference = LlavaForConditionalGeneration.from_pretrained(checkpoints("llava"), dtype=torch.float32).eval()
    batch = AutoProcessor.from_pretrained(checkpoints("llava"))(text=[PROMPT], images=pictures, return_tensors="pt")
    options = {k: v for k, v in plan.items() if k not in ("method", "keep")}
    vtoken.wrap(reference, plan["method"], keep=plan["keep"], **options)
    seen, handle = lm_inputs(reference)
    with torch.no_grad():
        reference(**batch)
    handle.remove()
    assert [s.tolist() for s in model.last_kept] == [s.tolist() for s in reference.vtoken.stats.kept["projector"]]
    embeds = seen[0]["inputs_embeds"][0]
    ids = out["prompt_token_ids"]
    assert embeds.shape[0] == len(ids)  # the shortened prompt, as long as vLLM's
    positions = seen[0].get("position_ids")  # compact: numbered without gaps, as vLLM numbers its prompt
    assert positions is None or positions[0].tolist() == list(range(len(ids)))
    torch.testing.assert_close(torch.cat(kept), embeds[torch.tensor(ids) == IMAGE], rtol=0, atol=1e-5)
