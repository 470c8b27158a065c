"""The llm(K) site: pruning inside the decoder with cache-correct generation (DART, FastV)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import vtoken
from tiny_models import TOKENS_PER_IMAGE, llava_batch, prompt_ids, tiny_llava


def two_prompts():
    return [prompt_ids([20, 21], 1, [30, 31, 32, 33]), prompt_ids([22], 1, [34, 35])]


@vtoken.register_stage("replay_test")
@dataclass
class Replay(vtoken.Stage):
    """Keeps given positions: the same pruning again, for cache-vs-recompute comparisons."""

    rows: list = field(default_factory=list)
    site_kinds = ("llm", "projector")

    def select(self, tokens, k):
        return vtoken.Keep(indices=torch.stack(self.rows)[:, :k])


def layer_inputs(model, index):
    seen = []
    handle = model.model.language_model.layers[index].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize("method", ["dart", "fastv"])
def test_keep_all_at_llm2_matches_unwrapped(method, attn_implementation):
    model = tiny_llava(attn_implementation)
    batch = llava_batch(two_prompts())
    with torch.no_grad():
        expected_logits = model(**batch).logits
    expected = model.generate(**batch, max_new_tokens=6, do_sample=False)
    with vtoken.wrapped(model, method, keep=1.0, site="llm(2)"):
        with torch.no_grad():
            got_logits = model(**batch).logits
        got = model.generate(**batch, max_new_tokens=6, do_sample=False)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got_logits[valid], expected_logits[valid], atol=1e-5, rtol=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method,keep", [("dart", 40), ("fastv", 0.5), ("kcenter", 24)])
def test_layer_after_k_sees_exactly_the_budget(method, keep):
    model = tiny_llava()
    batch = llava_batch(two_prompts())
    text = (batch["input_ids"].shape[1]) - TOKENS_PER_IMAGE
    with vtoken.wrapped(model, method, keep=keep, site="llm(2)"), torch.no_grad():
        seen, handle = layer_inputs(model, 2)  # registered after vtoken's hooks, so it sees their result
        earlier, handle1 = layer_inputs(model, 1)
        model(**batch)
        layer_counts = model.vtoken.stats.llm_layer_tokens
    handle.remove(), handle1.remove()
    expected = keep if isinstance(keep, int) else int(keep * TOKENS_PER_IMAGE)
    assert earlier[0].shape[1] == text + TOKENS_PER_IMAGE, "layers before K see every token"
    assert seen[0].shape[1] == text + expected, f"layer 3 saw {seen[0].shape[1] - text} visual tokens"
    assert layer_counts == [TOKENS_PER_IMAGE] * 2 + [expected] * 2


@pytest.mark.parametrize("method", ["dart", "fastv"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_generation_equals_recomputation(method, attn):
    model = tiny_llava(attn)
    batch = llava_batch(two_prompts(), seed=3)
    steps = 20
    with vtoken.wrapped(model, method, keep=30, site="llm(2)"):
        cached = model.generate(**batch, max_new_tokens=steps, do_sample=False)
        kept = model.vtoken.stats.kept["llm(2)"]
    prompt_length = batch["input_ids"].shape[1]
    with vtoken.wrapped(model, Replay(rows=kept, keep=30, site="llm(2)")), torch.no_grad():
        sequence, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(steps):
            logits = model(input_ids=sequence, attention_mask=mask, pixel_values=batch["pixel_values"],
                           use_cache=False, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    assert torch.equal(cached[:, prompt_length:], sequence[:, prompt_length:])


@pytest.mark.parametrize("method", ["dart", "fastv"])
def test_batch_equals_members_alone(method):
    model = tiny_llava()
    prompts = two_prompts()
    batch = llava_batch(prompts, seed=7)
    with vtoken.wrapped(model, method, keep=32, site="llm(2)"):
        together = model.generate(**batch, max_new_tokens=8, do_sample=False)
        for row, prompt in enumerate(prompts):
            alone = llava_batch([prompt])
            alone["pixel_values"] = batch["pixel_values"][row : row + 1]
            single = model.generate(**alone, max_new_tokens=8, do_sample=False)
            assert torch.equal(together[row, -8:], single[0, -8:]), f"row {row} differs from its run alone"


def test_rows_with_different_image_counts_use_dead_slots():
    model = tiny_llava()
    prompts = [prompt_ids([20], 2, [30, 31]), prompt_ids([21, 22], 1, [32])]
    batch = llava_batch(prompts, seed=1)
    with vtoken.wrapped(model, "fastv", keep=16, site="llm(2)"):
        together = model.generate(**batch, max_new_tokens=6, do_sample=False)
        start = 0
        for row, prompt in enumerate(prompts):
            images = 2 if row == 0 else 1
            alone = llava_batch([prompt])
            alone["pixel_values"] = batch["pixel_values"][start : start + images]
            start += images
            single = model.generate(**alone, max_new_tokens=6, do_sample=False)
            assert torch.equal(together[row, -6:], single[0, -6:]), f"row {row} differs from its run alone"


def test_projector_and_llm_sites_compose():
    model = tiny_llava()
    batch = llava_batch(two_prompts())
    text = batch["input_ids"].shape[1] - TOKENS_PER_IMAGE
    pipeline = vtoken.Pipeline([vtoken.Dart(keep=64), vtoken.FastV(keep=16)])
    with vtoken.wrapped(model, pipeline):
        seen, handle = layer_inputs(model, 2)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        sites = [(r.site, r.tokens_in, r.tokens_out) for r in model.vtoken.stats.records]
    handle.remove()
    assert sites == [("projector", TOKENS_PER_IMAGE, 64), ("llm(2)", 64, 16)]
    assert seen[0].shape[1] == text + 16
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


def test_scoring_never_falls_back_to_eager_attention(monkeypatch):
    import transformers.models.clip.modeling_clip as clip
    import transformers.models.llama.modeling_llama as llama

    def refuse(*args, **kwargs):
        raise AssertionError("eager attention (a full attention map) was used")

    model = tiny_llava("sdpa")
    monkeypatch.setattr(llama, "eager_attention_forward", refuse)
    monkeypatch.setattr(clip, "eager_attention_forward", refuse)
    batch = llava_batch(two_prompts())
    for method, site in [("fastv", "llm(2)"), ("dart", "llm(2)"), ("cls_attn", "projector"), ("kcenter", "projector")]:
        with vtoken.wrapped(model, method, keep=20, site=site):
            model.generate(**batch, max_new_tokens=2, do_sample=False)


@vtoken.register_stage("signal_probe_test")
@dataclass
class SignalProbe(vtoken.Stage):
    """Records the signals the decoder site hands it and keeps the first k tokens."""

    seen: list = field(default_factory=list)
    site_kinds = ("llm",)

    def signals(self):
        return {"last_query_attn": {}, "key_norm": {}}

    def select(self, tokens, k):
        self.seen.append({name: value.clone() for name, value in tokens.signals.items()})
        return vtoken.Keep(indices=torch.arange(k).expand(tokens.batch_size, k))


def test_llm_signals_equal_the_models_attention_row_and_cached_keys():
    """FastV's row and DART's key norms equal what the model itself computes at layer K-1 (its eager
    attention map, its cached keys), and that layer's keys are computed once, not recomputed."""
    model = tiny_llava("eager")
    batch = llava_batch([prompt_ids([20, 21], 1, [30, 31, 32, 33])])
    visual = (batch["input_ids"][0] == 3).nonzero()[:, 0]
    with torch.no_grad():
        reference = model(**batch, output_attentions=True, use_cache=True)
    row = reference.attentions[1][0, :, -1].mean(0)[visual]
    keys = reference.past_key_values.layers[1].keys[0]  # [kv heads, L, d], after the rotary embedding
    key_norm = keys.transpose(0, 1).reshape(keys.shape[1], -1).abs().sum(-1)[visual]

    probe = SignalProbe(keep=10, site="llm(2)")
    calls = []
    counter = model.model.language_model.layers[1].self_attn.k_proj.register_forward_hook(
        lambda module, args, output: calls.append(output.shape))
    with vtoken.wrapped(model, vtoken.Pipeline([probe])), torch.no_grad():
        model(**batch)
    counter.remove()
    assert len(calls) == 1, f"layer 1's k_proj ran {len(calls)} times in one prefill"
    torch.testing.assert_close(probe.seen[0]["last_query_attn"][0], row, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probe.seen[0]["key_norm"][0], key_norm, atol=1e-5, rtol=1e-5)
