"""Stages at several llm(K) sites in one pass (a pyramid such as ``fastv@llm(1)+fastv@llm(3)``).

Each site chooses among the visual tokens the previous one kept; layers between two sites see and cache
only the earlier site's survivors. The wrapped model's selections and logits equal a slow reference
written here: the unwrapped tiny LLaVA's decoder run layer by layer by hand (eager maths, an explicit
causal mask over the positions still present), scoring FastV's last-query attention row from layer
K-1's input and dropping the unchosen positions before layer K. Cached generation equals the same
reference run without a cache, token by token, with the prefill's choices applied again.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tiny_models import IMAGE_TOKEN, TOKENS_PER_IMAGE, llava_batch, prompt_ids, tiny_llava

PROMPT = prompt_ids([20, 21], 1, [30, 31, 32, 33])
PLAN = {1: 48, 3: 16}  # site K -> visual tokens kept there


def decoder_inputs(model, batch: dict) -> torch.Tensor:
    """The embeddings the unwrapped model feeds its language model (image features spliced in)."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["embeds"]


def last_query_attention(layer, x: torch.Tensor, positions: torch.Tensor, rotary) -> torch.Tensor:
    """FastV's score, the slow way: softmax over every position of the last position's query against all
    keys of ``layer`` (input ``x`` ``[1, n, D]``), averaged over the query heads: ``[n]``."""
    attention = layer.self_attn
    d = attention.head_dim
    h = layer.input_layernorm(x)[0]
    q = attention.q_proj(h).view(h.shape[0], -1, d)  # [n, Hq, d]
    k = attention.k_proj(h).view(h.shape[0], -1, d)  # [n, Hk, d]
    cos, sin = rotary(x, positions[None])
    cos, sin = cos[0][:, None], sin[0][:, None]

    def rotate(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    q, k = rotate(q), rotate(k)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.einsum("hd,nhd->hn", q[-1].double(), k.double()) * attention.scaling
    return torch.softmax(scores, dim=-1).mean(0)


def slow_decoder(model, embeds: torch.Tensor, ids: list[int], choose) -> tuple[torch.Tensor, list[int], dict]:
    """Run the decoder layer by layer on one sample. Before layer K (a key of the plan), ``choose(K, x,
    positions, visual)`` returns the original positions of the visual tokens to keep, given layer K-1's
    input ``x``; the others are dropped. Returns the logits at the positions left, those positions, and
    the kept visual positions per site."""
    lm = model.model.language_model
    hidden = embeds
    positions = torch.arange(embeds.shape[1])
    visual = torch.tensor([token == IMAGE_TOKEN for token in ids])
    kept, previous = {}, None
    for index, layer in enumerate(lm.layers):
        chosen = choose(index, previous, positions, visual)
        if chosen is not None:
            kept[index] = chosen
            stay = ~visual | torch.isin(positions, torch.tensor(chosen, dtype=torch.long))
            hidden, positions, visual = hidden[:, stay], positions[stay], visual[stay]
        previous = (hidden, positions)
        n = hidden.shape[1]
        mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        cos, sin = lm.rotary_emb(hidden, positions[None])
        hidden = layer(hidden, attention_mask=mask, position_ids=positions[None], position_embeddings=(cos, sin))
    with torch.no_grad():
        logits = model.lm_head(lm.norm(hidden))
    return logits, positions.tolist(), kept


def fastv_plan(model, plan: dict[int, int]):
    """``choose`` for slow_decoder: FastV's top-k (ties to the lower position) at each site of ``plan``."""
    lm = model.model.language_model

    def choose(index, previous, positions, visual):
        if index not in plan:
            return None
        x, at = previous
        scores = last_query_attention(lm.layers[index - 1], x, at, lm.rotary_emb)
        candidates = [(-float(scores[i]), int(at[i])) for i in range(len(at)) if visual[i]]
        return sorted(p for _, p in sorted(candidates)[: plan[index]])

    return choose


def fixed_plan(kept: dict[int, list[int]]):
    return lambda index, previous, positions, visual: kept.get(index)


def pyramid(plan: dict[int, int] = PLAN) -> vtoken.Pipeline:
    return vtoken.Pipeline([vtoken.FastV(keep=keep, site=f"llm({k})") for k, keep in plan.items()])


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager", seed=5)


def test_each_site_narrows_what_the_next_sees_as_the_slow_reference(model):
    batch = llava_batch([PROMPT], seed=2)
    embeds = decoder_inputs(model, batch)
    with torch.no_grad():
        expected, positions, kept = slow_decoder(model, embeds, PROMPT, fastv_plan(model, PLAN))
    with vtoken.wrapped(model, pyramid()), torch.no_grad():
        got = model(**batch).logits
        stats = model.vtoken.stats
    visual = [p for p, token in enumerate(PROMPT) if token == IMAGE_TOKEN]
    first = [visual.index(p) for p in kept[1]]
    second = [kept[1].index(p) for p in kept[3]]  # the second site indexes the first site's survivors
    assert stats.kept["llm(1)"][0].tolist() == first, "llm(1) kept other tokens than the reference"
    assert stats.kept["llm(3)"][0].tolist() == second, "llm(3) kept other tokens than the reference"
    assert [(r.site, r.tokens_in, r.tokens_out) for r in stats.records] == [
        ("llm(1)", TOKENS_PER_IMAGE, 48), ("llm(3)", 48, 16)]
    assert stats.llm_layer_tokens == [TOKENS_PER_IMAGE, 48, 48, 16]
    assert got.shape == expected.shape, f"logits {tuple(got.shape)}, reference {tuple(expected.shape)}"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=False, num_beams=2),
                                     dict(do_sample=False, num_beams=2, num_return_sequences=2)])
def test_cached_generate_equals_the_slow_reference_without_cache(model, options):
    """Cached generation (greedy, beams, several sequences) equals generation without cache through the
    wrapped model; greedy also equals the slow reference decoding token by token with the prefill's
    choices applied again at every step."""
    batch = llava_batch([PROMPT], seed=2)
    steps = 6
    with vtoken.wrapped(model, pyramid()):
        cached = model.generate(**batch, max_new_tokens=steps, **options)
        recomputed = model.generate(**batch, max_new_tokens=steps, use_cache=False, **options)
    assert torch.equal(cached, recomputed), (
        f"cached {cached[:, -steps:].tolist()}, recomputed {recomputed[:, -steps:].tolist()}")
    if options.get("num_beams"):
        return
    embeds = decoder_inputs(model, batch)
    with torch.no_grad():
        _, _, kept = slow_decoder(model, embeds, PROMPT, fastv_plan(model, PLAN))
        ids = list(PROMPT)
        table = model.get_input_embeddings()
        for _ in range(steps):
            logits, _, _ = slow_decoder(model, embeds, ids, fixed_plan(kept))
            token = int(logits[0, -1].argmax())
            ids.append(token)
            embeds = torch.cat([embeds, table(torch.tensor([[token]]))], dim=1)
    assert cached[0, -steps:].tolist() == ids[-steps:], "cached generation differs from the slow reference"


def test_rows_with_different_image_counts_equal_their_runs_alone():
    """Dead slots (rows keeping different counts) are made at the first site and dropped and made again
    at the next; every row generates what it generates alone, left and right padding."""
    model = tiny_llava("sdpa", seed=6)
    prompts = [prompt_ids([20], 2, [30, 31]), prompt_ids([21, 22], 1, [32])]
    for side in ("left", "right"):
        batch = llava_batch(prompts, seed=1, side=side)
        with vtoken.wrapped(model, pyramid({1: 40, 2: 12})), torch.no_grad():
            together = model.generate(**batch, max_new_tokens=5, do_sample=False) if side == "left" else None
            logits = model(**batch).logits
            start = 0
            for row, prompt in enumerate(prompts):
                images = 2 if row == 0 else 1
                alone = llava_batch([prompt])
                alone["pixel_values"] = batch["pixel_values"][start : start + images]
                start += images
                single = model(**alone).logits
                last = logits[row, -1] if side == "left" else logits[row, single.shape[1] - 1]
                torch.testing.assert_close(last, single[0, -1], atol=1e-4, rtol=0)
                if together is not None:
                    generated = model.generate(**alone, max_new_tokens=5, do_sample=False)
                    assert torch.equal(together[row, -5:], generated[0, -5:]), f"row {row} differs from its run alone"


def test_manual_decode_loop_carries_every_site_on_the_cache(model):
    batch = llava_batch([PROMPT], seed=2)
    with vtoken.wrapped(model, pyramid()), torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=4, do_sample=False)
        out = model(**batch, use_cache=True)
        # the cache's first layers hold the whole prompt: positions and mask count every prompt token
        mask = torch.ones(1, len(PROMPT), dtype=torch.long)
        tokens, cache = [], out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        position = len(PROMPT)
        for _ in range(4):
            tokens.append(int(token))
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache,
                        position_ids=torch.tensor([[position]]), use_cache=True)
            cache, position = out.past_key_values, position + 1
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    assert tokens == expected[0, -4:].tolist()


def test_wrap_refuses_a_later_int_budget_above_an_earlier_one(model):
    with pytest.raises(ValueError, match=r"llm\(3\).*keeps 32.*llm\(1\).*16"):
        vtoken.wrap(model, pyramid({1: 16, 3: 32}))
    assert not hasattr(model, "vtoken")
    with pytest.raises(ValueError, match="64"):
        vtoken.wrap(model, "kcenter@projector+fastv@llm(2)", keep=64, kcenter={"keep": 32})
    assert not hasattr(model, "vtoken")
