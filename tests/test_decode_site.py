"""The decode site: while generate() decodes, a stage chooses which visual KV entries later steps keep.

Cached generation with ``decode_topk`` equals a slow recomputation written here: the unwrapped tiny
LLaVA's decoder run by hand over the whole sequence at every step (no cache), where each query may not
attend to the visual positions removed by the choices made before its step, and every n-th step chooses
the visual positions to keep from the last query's attention row (recomputed here from each layer's
q/k, mean over heads and layers). Greedy search, beam search and several returned sequences; a padded
batch equals its rows alone; the removed entries' memory is released (the cache tensors shrink).
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from test_llm_pyramid import decoder_inputs
from tiny_models import IMAGE_TOKEN, llava_batch, prompt_ids, tiny_llava
from vtoken.integrations.decode_cache import cache_bytes, generated_cache_bytes
from vtoken.stages import DecodeTopK

PROMPTS = [prompt_ids([20, 21], 1, [30, 31, 32, 33]), prompt_ids([22], 1, [34, 35])]
KEEP, EVERY, STEPS = 20, 2, 7


def rotate(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin


def slow_step(model, embeds: torch.Tensor, hidden_from: dict[int, set[int]], prompt_length: int):
    """One no-cache pass over ``embeds`` ``[1, L, D]``: the query at position q may not see the positions
    ``hidden_from[q]`` (beyond causality). Returns the last position's logits and its attention row over
    all L positions, mean over heads, per layer."""
    lm = model.model.language_model
    hidden = embeds
    length = embeds.shape[1]
    positions = torch.arange(length)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    for query, gone in hidden_from.items():
        allowed[query, sorted(gone)] = False
    mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    rows = []
    for layer in lm.layers:
        cos, sin = lm.rotary_emb(hidden, positions[None])
        attention = layer.self_attn
        d = attention.head_dim
        h = layer.input_layernorm(hidden)[0]
        q = rotate(attention.q_proj(h[-1:]).view(1, -1, d), cos[0, -1:, None], sin[0, -1:, None])[0]  # [Hq, d]
        k = rotate(attention.k_proj(h).view(length, -1, d), cos[0][:, None], sin[0][:, None])  # [L, Hk, d]
        k = k.repeat_interleave(q.shape[0] // k.shape[1], dim=1)
        scores = torch.einsum("hd,lhd->hl", q.double(), k.double()) * attention.scaling
        scores = scores.masked_fill(~allowed[-1][None], float("-inf"))
        rows.append(torch.softmax(scores, dim=-1).mean(0))
        hidden = layer(hidden, attention_mask=mask, position_ids=positions[None], position_embeddings=(cos, sin))
    logits = model.lm_head(lm.norm(hidden))[0, -1]
    return logits, torch.stack(rows).mean(0)


class Sequence:
    """One sequence of the slow reference: its tokens, embeddings and the visual positions removed so far."""

    def __init__(self, model, batch: dict, prompt: list[int]):
        self.model, self.ids, self.embeds = model, list(prompt), decoder_inputs(model, batch)
        self.visual = [p for p, token in enumerate(prompt) if token == IMAGE_TOKEN]
        self.prompt_length, self.removed, self.hidden_from = len(prompt), set(), {}
        self.score, self.history = 0.0, []  # history: (step, kept visual indices) per choice

    def forward(self, step: int):
        """The pass of decoding step ``step`` (0: the prefill). After a step that chooses, the top-KEEP
        visual positions by its last query's attention stay; later queries cannot see the others."""
        with torch.no_grad():
            logits, row = slow_step(self.model, self.embeds, self.hidden_from, self.prompt_length)
        if step > 0 and step % EVERY == 0:
            alive = [p for p in self.visual if p not in self.removed]
            ranked = sorted(alive, key=lambda p: (-float(row[p]), p))
            self.removed |= set(ranked[KEEP:])
            self.history = self.history + [(step, sorted(self.visual.index(p) for p in ranked[:KEEP]))]
        return logits

    def child(self, token: int, score: float) -> "Sequence":
        new = object.__new__(Sequence)
        new.__dict__ = dict(self.__dict__, ids=self.ids + [token], removed=set(self.removed),
                            hidden_from=dict(self.hidden_from), score=score)
        with torch.no_grad():
            embedding = self.model.get_input_embeddings()(torch.tensor([[token]]))
        new.embeds = torch.cat([self.embeds, embedding], dim=1)
        new.hidden_from[len(self.ids)] = set(self.removed)  # the new token's query sees what is left now
        return new


def slow_greedy(model, batch: dict, prompt: list[int]) -> list[int]:
    sequence = Sequence(model, batch, prompt)
    for step in range(STEPS):
        token = int(sequence.forward(step).argmax())
        sequence = sequence.child(token, 0.0)
    return sequence.ids[-STEPS:]


def slow_beams(model, batch: dict, prompt: list[int], beams: int, returned: int) -> list[Sequence]:
    running = [Sequence(model, batch, prompt)]
    for step in range(STEPS):
        candidates = []
        for sequence in running:
            logp = torch.log_softmax(sequence.forward(step).double(), dim=-1)
            candidates += [(sequence.score + float(logp[v]), sequence, v) for v in range(logp.shape[0])]
        candidates.sort(key=lambda c: -c[0])
        running = [sequence.child(token, score) for score, sequence, token in candidates[:beams]]
    return sorted(running, key=lambda s: -s.score)[:returned]


def alone(batch: dict, row: int) -> dict:
    single = llava_batch([PROMPTS[row]])
    single["pixel_values"] = batch["pixel_values"][row : row + 1]
    return single


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager", seed=8)


def wrapped(model, **options):
    return vtoken.wrapped(model, "decode_topk", keep=KEEP, site=f"decode({EVERY})", **options)


def test_cached_greedy_equals_the_slow_recomputation_and_a_padded_batch_its_rows(model):
    batch = llava_batch(PROMPTS, seed=3)
    plain = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
    with wrapped(model):
        together = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
        kept_together = model.vtoken.stats.kept[f"decode({EVERY})"]
        singles, kept_alone = [], []
        for row in range(len(PROMPTS)):
            singles.append(model.generate(**alone(batch, row), max_new_tokens=STEPS, do_sample=False))
            kept_alone += model.vtoken.stats.kept[f"decode({EVERY})"]
    for row, prompt in enumerate(PROMPTS):
        expected = slow_greedy(model, alone(batch, row), prompt)
        assert together[row, -STEPS:].tolist() == expected, f"row {row} in the batch differs from the reference"
        assert singles[row][0, -STEPS:].tolist() == expected, f"row {row} alone differs from the reference"
        steps = [step for step, _ in kept_together[row]]
        assert steps == list(range(EVERY, STEPS, EVERY)), f"choices after steps {steps}"
        for (_, a), (_, b) in zip(kept_together[row], kept_alone[row]):
            assert torch.equal(a, b), f"row {row} kept other entries in the batch than alone"
            assert a.numel() == KEEP
    assert not torch.equal(together, plain), "the choices changed nothing: this test could not see them"


@pytest.mark.parametrize("beams,returned", [(2, 1), (2, 2), (3, 2)])
def test_cached_beam_search_equals_the_slow_reference(model, beams, returned):
    """Beams diverge, so each beam makes its own choices; each beam's record of them follows the beam
    reordering of the cache (the cache's rows end in the order of the best beams)."""
    batch = llava_batch(PROMPTS[:1], seed=3)
    with wrapped(model):
        got = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, num_beams=beams,
                             num_return_sequences=returned)
        kept = model.vtoken.stats.kept[f"decode({EVERY})"]
    expected = slow_beams(model, batch, PROMPTS[0], beams, returned)
    assert got[:, -STEPS:].tolist() == [sequence.ids[-STEPS:] for sequence in expected]
    assert len(kept) == beams
    for row, sequence in enumerate(expected):
        assert [(step, k.tolist()) for step, k in kept[row]] == sequence.history, f"beam {row}'s choices"


def test_removed_entries_are_freed_from_the_cache(model):
    """Every layer's key and value tensors shrink to the text, the kept visual entries and the generated
    tokens: measured as the cache's tensor bytes after generate."""
    batch = llava_batch(PROMPTS[:1], seed=3)
    plain = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
    with wrapped(model):
        pruned = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
    config = model.config.text_config
    per_entry = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size //
                                                                           config.num_attention_heads) * 4
    prompt = len(PROMPTS[0])
    visual = PROMPTS[0].count(IMAGE_TOKEN)
    assert cache_bytes(plain.past_key_values) == per_entry * (prompt + STEPS - 1)
    assert cache_bytes(pruned.past_key_values) == per_entry * (prompt - visual + KEEP + STEPS - 1)
    assert generated_cache_bytes(model, batch, STEPS) == cache_bytes(plain.past_key_values)
    with wrapped(model):
        assert generated_cache_bytes(model, batch, STEPS) == cache_bytes(pruned.past_key_values)
    for layer in pruned.past_key_values.layers:
        assert layer.keys.shape[2] == prompt - visual + KEEP + STEPS - 1


def test_one_scoring_layer_and_a_stage_after_llm_sites(model):
    """``layer=`` scores with one layer's row; after a pyramid the candidates are the last site's survivors,
    and the stats hold one record per site."""
    batch = llava_batch(PROMPTS[:1], seed=3)
    pipeline = vtoken.Pipeline([vtoken.FastV(keep=60, site="llm(2)"), DecodeTopK(keep=10, site="decode(3)", layer=-1)])
    with vtoken.wrapped(model, pipeline):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
        stats = model.vtoken.stats
    records = [(r.site, r.tokens_in, r.tokens_out) for r in stats.records]
    assert records[0] == ("llm(2)", 144, 60) and ("decode(3)", 60, 10) in records
    survivors = set(stats.kept["llm(2)"][0].tolist())
    for _, kept in stats.kept["decode(3)"][0]:
        assert set(kept.tolist()) <= survivors
    text = len(PROMPTS[0]) - 144
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [text + 10 + STEPS - 1] * 4


def test_wrap_refuses_what_the_decode_site_cannot_do(model):
    with pytest.raises(ValueError, match=r"decode_topk. cannot run at llm\(2\); accepted sites: .decode., .decode\(n"):
        vtoken.wrap(model, "decode_topk@llm(2)", keep=8)
    with pytest.raises(ValueError, match="'fastv' cannot run at decode"):
        vtoken.wrap(model, "fastv@decode", keep=8)
    with pytest.raises(ValueError, match=r"decode\(n\) needs n >= 1"):
        vtoken.wrap(model, "decode_topk@decode(0)", keep=8)
    with pytest.raises(ValueError, match="layer=7 does not exist"):
        vtoken.wrap(model, "decode_topk", keep=8, layer=7)
    with pytest.raises(ValueError, match="one decode site per pipeline"):
        vtoken.wrap(model, vtoken.Pipeline([DecodeTopK(keep=8), DecodeTopK(keep=8, site="decode(2)")]))
    assert not hasattr(model, "vtoken")


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=False, num_beams=3, num_return_sequences=2),
                                     dict(do_sample=True, num_return_sequences=2)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generation_without_cache_makes_the_same_choices(options, attn):
    """use_cache=False runs the whole sequence at every step: each generated query is hidden from what the
    choices before its step removed, and the same choices are made (each beam keeps its own, found by
    its tokens whichever row beam search moves it to)."""
    model = tiny_llava(attn, seed=8)
    batch = llava_batch(PROMPTS, seed=3)
    runs = {}
    with wrapped(model):
        for use_cache in (True, False):
            torch.manual_seed(0)
            out = model.generate(**batch, max_new_tokens=STEPS, use_cache=use_cache, **options)
            runs[use_cache] = (out, model.vtoken.stats.kept[f"decode({EVERY})"])
    (cached, kept_cached), (recomputed, kept_recomputed) = runs[True], runs[False]
    assert torch.equal(cached, recomputed), f"{cached[:, -STEPS:].tolist()} vs {recomputed[:, -STEPS:].tolist()}"
    assert len(kept_cached) == len(kept_recomputed)
    for row, (a, b) in enumerate(zip(kept_cached, kept_recomputed)):
        assert [(step, k.tolist()) for step, k in a] == [(step, k.tolist()) for step, k in b], f"row {row}'s choices"
