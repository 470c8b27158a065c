"""What ``wrap`` refuses, and says, before any model runs; what the stats of a call report; and the
generate arguments a shorter prompt would otherwise change (``max_length``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

import vtoken
from tiny_models import TOKENS_PER_IMAGE, llava_batch, prompt_ids, tiny_llava, tiny_qwen, tiny_qwen3_vl
from vtoken.stages.base import Stage
from vtoken.tokens import Keep, TokenSet, sorted_topk


def batch_of_two():
    return llava_batch([prompt_ids([20, 21], 1, [30, 31, 32]), prompt_ids([22], 1, [33, 34])], seed=2)


# --- refused at wrap -----------------------------------------------------------------------------
def test_a_budgeted_method_without_budget_is_refused_at_wrap():
    model = tiny_llava()
    with pytest.raises(ValueError, match="dart at projector has no budget: pass keep="):
        vtoken.wrap(model, "dart")
    assert not hasattr(model, "vtoken") and "generate" not in model.__dict__


def test_method_at_site_form_is_accepted_by_wrap():
    model = vtoken.wrap(tiny_llava(), "dart@llm(2)", keep=16)
    assert [str(stage.site) for stage in model.vtoken.pipeline.stages] == ["llm(2)"]
    vtoken.unwrap(model)
    model = vtoken.wrap(tiny_llava(), "cls_attn@projector+kcenter@llm(2)", keep=16, cls_attn={"keep": 32})
    assert [str(stage.site) for stage in model.vtoken.pipeline.stages] == ["projector", "llm(2)"]
    with pytest.raises(ValueError, match="'dart@' in 'dart@' has '@' but no site"):
        vtoken.build_pipeline("dart@", 16, {})
    with pytest.raises(ValueError, match="dart@llm\\(2\\) already names its site"):
        vtoken.build_pipeline("dart@llm(2)", 16, {"site": "projector"})


def test_an_empty_name_in_a_pipeline_is_named_as_such():
    with pytest.raises(ValueError, match="empty method name in 'kcenter\\+'.*registered methods: .*cls_attn"):
        vtoken.wrap(tiny_llava(), "kcenter+", keep=8)


def test_errors_name_the_models_own_family():
    with pytest.raises(ValueError, match="qwen3_vl has no vision site for stage kcenter: its DeepStack"):
        vtoken.wrap(tiny_qwen3_vl(False), "kcenter", keep=4, site="vision(1)")
    with pytest.raises(ValueError, match="positions='compact': qwen2_5_vl keeps M-RoPE positions"):
        vtoken.wrap(tiny_qwen("2.5"), "kcenter", keep=4, positions="compact")


def test_a_one_layer_language_model_says_it_has_no_llm_site():
    with pytest.raises(ValueError, match="no llm\\(K\\) site \\(this model has 1 llm layer"):
        vtoken.wrap(tiny_llava(text_layers=1), "fastv", keep=8)


def test_accepted_sites_listed_are_the_ones_that_work():
    """The refusal of llm(99) lists vision(L) only where the model can prune (before the feature layer)."""
    model = tiny_llava(vision_layers=4)  # feature layer -2: hidden state 3 comes out of block 2
    accepted_sites = "accepted: vision\\(L\\) with 0 <= L < 2 .*llm\\(K\\) with 1 <= K < 4"
    with pytest.raises(ValueError, match=accepted_sites) as error:
        vtoken.wrap(model, "kcenter", keep=8, site="llm(99)")
    message = str(error.value)
    accepted = [f"vision({layer})" for layer in range(2)] + ["llm(1)", "llm(3)", "projector"]
    for site in accepted:
        vtoken.wrap(model, "kcenter", keep=8, site=site)
        vtoken.unwrap(model)
    with pytest.raises(ValueError, match="vision\\(2\\) does not exist"):
        vtoken.wrap(model, "kcenter", keep=8, site="vision(2)")
    assert "0 <= L < 2" in message


@dataclass
class _NeedsShift(Stage):
    """A test stage that asks the projector for a signal only vision sites have."""

    name: ClassVar[str] = "needs_shift"
    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "llm")

    def signals(self) -> dict[str, dict[str, Any]]:
        return {"mlp_shift": {}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        return Keep(indices=sorted_topk(tokens.signals["mlp_shift"], k))


@pytest.mark.parametrize("site,offered", [("projector", "'cls_attn'"), ("llm(2)", "'key_norm'")])
def test_a_signal_the_site_does_not_provide_is_refused_at_wrap(site, offered):
    model = tiny_llava()
    with pytest.raises(ValueError, match=f"needs_shift at {site.replace('(', '.').replace(')', '.')} need.s. the "
                                         f"signal.s. 'mlp_shift' .*provides: .*{offered}"):
        vtoken.wrap(model, _NeedsShift(keep=8, site=site))
    assert not hasattr(model, "vtoken")


def test_pool_after_a_selecting_site_is_refused_at_wrap():
    pipeline = vtoken.Pipeline([vtoken.KCenter(keep=64, site="vision(0)"), vtoken.Pool(keep=16)])
    with pytest.raises(ValueError, match="pool at projector needs the tokens on their full grid, but kcenter at "
                                         "vision\\(0\\) selects a subset"):
        vtoken.wrap(tiny_llava(), pipeline)
    # merging first keeps a grid: pixel_shuffle then pool is fine
    model = vtoken.wrap(tiny_llava(), vtoken.Pipeline([vtoken.PixelShuffle(layer=0), vtoken.Pool(keep=9)]))
    with torch.no_grad():
        model(**batch_of_two())
    assert model.vtoken.stats.records[-1].tokens_out == 9


def test_pool_on_a_multi_frame_clip_says_why():
    from tiny_models import qwen_batch

    model = vtoken.wrap(tiny_qwen("2"), "pool", keep=4)
    with pytest.raises(ValueError, match="span several frames .*video_budget='frame'"), torch.no_grad():
        model(**qwen_batch([[20, ("video", 2, 4, 4), 21]]))


def test_wrap_leaves_the_callers_stage_objects_alone():
    stage = vtoken.KCenter(keep=8, site="vision(-3)")
    pipeline = vtoken.Pipeline([stage])
    shallow = vtoken.wrap(tiny_llava(vision_layers=4), pipeline)
    assert str(stage.site) == "vision(-3)", "wrap must not resolve the caller's stage in place"
    assert str(shallow.vtoken.pipeline.stages[0].site) == "vision(1)"
    deep = vtoken.wrap(tiny_llava(vision_layers=7), pipeline)  # the same Pipeline on a deeper model
    assert str(deep.vtoken.pipeline.stages[0].site) == "vision(4)"
    assert shallow.vtoken.pipeline.stages[0] is not stage


# --- stats -----------------------------------------------------------------------------------------
def test_stats_of_two_stages_at_one_site_add_up_to_the_budget():
    model = vtoken.wrap(tiny_llava(), "dart+dart", keep=64)
    with torch.no_grad():
        model(**batch_of_two())
    rows = [(r.stage, r.tokens_in, r.tokens_out) for r in model.vtoken.stats.records]
    assert rows == [("dart", TOKENS_PER_IMAGE, 32), ("dart", TOKENS_PER_IMAGE - 32, 32)]


def test_a_text_only_call_leaves_empty_stats():
    model = vtoken.wrap(tiny_llava(), "kcenter", keep=16)
    batch = batch_of_two()
    with torch.no_grad():
        model(**batch)
        assert model.vtoken.stats.records
        model(input_ids=torch.tensor([[1, 20, 21]]))
    assert model.vtoken.stats.records == [] and model.vtoken.stats.kept == {}


# --- generate arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["projector", "llm(2)"])
def test_max_length_counts_the_callers_prompt(site):
    model = tiny_llava()
    batch = batch_of_two()
    total = batch["input_ids"].shape[1] + 5
    unwrapped = model.generate(**batch, max_length=total, do_sample=False)
    with vtoken.wrapped(model, "kcenter", keep=16, site=site):
        pruned = model.generate(**batch, max_length=total, do_sample=False, min_length=total)
    assert pruned.shape == unwrapped.shape == (2, total)


def test_assisted_generation_is_refused_with_the_supported_modes():
    model = vtoken.wrap(tiny_llava(), "kcenter", keep=16)
    with pytest.raises(ValueError, match="prompt-lookup decoding .* supported: greedy, sampling, beam search"):
        model.generate(**batch_of_two(), max_new_tokens=3, prompt_lookup_num_tokens=2)


def test_a_manual_decode_loop_follows_the_llm_site_through_its_cache():
    """model(...) calls with the cache passed back (each its own call) decode as generate does."""
    model = vtoken.wrap(tiny_llava(), "fastv", keep=16, site="llm(2)")
    batch = batch_of_two()
    expected = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens = []
    with torch.no_grad():
        out = model(**batch, position_ids=positions, use_cache=True)
        for _ in range(4):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions,
                        past_key_values=out.past_key_values, use_cache=True)
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_a_budget_above_the_images_tokens_is_refused_at_wrap():
    model = tiny_llava()
    for spec in ("kcenter", "fastv", "dart@llm(2)"):
        with pytest.raises(ValueError, match=f"keep={TOKENS_PER_IMAGE + 1} tokens per image exceeds the "
                                             f"{TOKENS_PER_IMAGE} visual tokens every image gives this llava"):
            vtoken.wrap(model, spec, keep=TOKENS_PER_IMAGE + 1)
        assert not hasattr(model, "vtoken")
    # after a merging vision(L) site the count is the merged one: only the first site is checked
    vtoken.wrap(model, vtoken.Pipeline([vtoken.PixelShuffle(layer=0), vtoken.KCenter(keep=16)]))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_cls_attn_layer_the_tower_lacks_is_refused_at_wrap(family):
    model = tiny_llava() if family == "llava" else tiny_qwen("2")
    with pytest.raises(ValueError, match="cls_attn layer 99 is not a vision"):
        vtoken.wrap(model, "cls_attn", keep=8, cls_attn={"layers": (99,)})
    assert not hasattr(model, "vtoken")
