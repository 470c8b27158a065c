"""TransPrune at llm(K): token transition variation (TTV) summed over layers before K plus the
instruction's attention (IGA) at layer K. The selection through the wrapped model equals a slow
reference written here: the unwrapped tiny LLaVA's decoder run by hand, block by block (attention, then
MLP), recording each block's normalised input and output, scoring at each site from those records and
from layer K's own q/k, and dropping the unchosen positions before layer K. Also as a two-site pyramid,
TTV alone, and in padded batches (each row as alone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtoken
from test_llm_pyramid import decoder_inputs
from tiny_models import IMAGE_TOKEN, llava_batch, prompt_ids, tiny_llava
from vtoken.stages import TransPrune

PROMPTS = [prompt_ids([20, 21], 1, [30, 31, 32, 33]), prompt_ids([22], 1, [34, 35, 36]),
           prompt_ids([23, 24, 25], 1, [37])]


def rotate(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin


def block_transition(x, y):
    """The authors' per-block TTV over one sequence: |y|/|x| times softmax over positions of 1 - cos(x, y)."""
    x, y = x.double(), y.double()
    turn = 1 - F.cosine_similarity(x, y, dim=-1)
    return y.norm(dim=-1) / x.norm(dim=-1) * torch.exp(turn) / torch.exp(turn).sum()


def instruction_attention(layer, hidden, positions, rotary, instruction):
    """Mean over heads and instruction positions of their causal softmax attention at ``layer``: ``[n]``."""
    attention = layer.self_attn
    d = attention.head_dim
    h = layer.input_layernorm(hidden)[0]
    cos, sin = rotary(hidden, positions[None])
    cos, sin = cos[0][:, None], sin[0][:, None]
    q = rotate(attention.q_proj(h).view(h.shape[0], -1, d), cos, sin)
    k = rotate(attention.k_proj(h).view(h.shape[0], -1, d), cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    rows = []
    for i in instruction:
        scores = torch.einsum("hd,nhd->hn", q[i].double(), k[: i + 1].double()) * attention.scaling
        row = torch.zeros(h.shape[0], dtype=torch.float64)
        row[: i + 1] = torch.softmax(scores, dim=-1).mean(0)
        rows.append(row)
    return torch.stack(rows).mean(0)


def slow_transprune(model, batch, prompt, plan: dict[int, tuple[int, int]], attention=True):
    """plan: site K -> (from_layer, kept count). Returns the kept visual positions per site."""
    lm = model.model.language_model
    hidden = decoder_inputs(model, batch)
    positions = torch.arange(hidden.shape[1])
    visual = torch.tensor([token == IMAGE_TOKEN for token in prompt])
    ttv: dict[int, dict[int, float]] = {}  # layer -> original position -> TTV
    kept = {}
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            if index in plan:
                first, count = plan[index]
                candidates = [i for i in range(len(positions)) if visual[i]]
                t = torch.tensor([sum(ttv[layer_][int(positions[i])] for layer_ in range(first, index))
                                  for i in candidates], dtype=torch.float64)
                score = t / (t.sum() + 1e-8)
                if attention:
                    last_visual = max(candidates)
                    instruction = list(range(last_visual + 1, len(positions)))
                    iga = instruction_attention(layer, hidden, positions, lm.rotary_emb, instruction)[candidates]
                    score = score + iga / (iga.sum() + 1e-8)
                order = sorted(range(len(candidates)), key=lambda j: (-float(score[j]), j))[:count]
                kept[index] = sorted(int(positions[candidates[j]]) for j in order)
                stay = ~visual | torch.isin(positions, torch.tensor(kept[index]))
                hidden, positions, visual = hidden[:, stay], positions[stay], visual[stay]
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            cos, sin = lm.rotary_emb(hidden, positions[None])
            x = layer.input_layernorm(hidden)
            y = layer.self_attn(hidden_states=x, attention_mask=mask, position_ids=positions[None],
                                position_embeddings=(cos, sin))[0]
            hidden = hidden + y
            x2 = layer.post_attention_layernorm(hidden)
            y2 = layer.mlp(x2)
            hidden = hidden + y2
            values = block_transition(x[0], y[0]) + block_transition(x2[0], y2[0])
            ttv[index] = {int(p): float(v) for p, v in zip(positions, values)}
    return kept


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager", seed=9)


def visual_indices(prompt, positions):
    visual = [p for p, token in enumerate(prompt) if token == IMAGE_TOKEN]
    return [visual.index(p) for p in positions]


@pytest.mark.parametrize("attention", [True, False])
def test_selection_equals_the_slow_reference_alone_and_in_a_padded_batch(model, attention):
    batch = llava_batch(PROMPTS, seed=4)
    with vtoken.wrapped(model, TransPrune(site="llm(2)", from_layer=0, keep=24, attention=attention)):
        with torch.no_grad():
            model(**batch)
        together = model.vtoken.stats.kept["llm(2)"]
    for row, prompt in enumerate(PROMPTS):
        single = llava_batch([prompt])
        single["pixel_values"] = batch["pixel_values"][row : row + 1]
        expected = slow_transprune(model, single, prompt, {2: (0, 24)}, attention)
        assert together[row].tolist() == visual_indices(prompt, expected[2]), f"row {row} differs from the reference"


def test_two_sites_equal_the_slow_reference(model):
    """The paper prunes progressively; the second site sums transitions of a layer that saw every token and
    of one that saw only the first site's survivors."""
    prompt = PROMPTS[0]
    batch = llava_batch([prompt], seed=4)
    pipeline = vtoken.Pipeline([TransPrune(site="llm(1)", from_layer=0, keep=60),
                                TransPrune(site="llm(3)", from_layer=0, keep=20)])
    with vtoken.wrapped(model, pipeline), torch.no_grad():
        model(**batch)
        stats = model.vtoken.stats
    expected = slow_transprune(model, batch, prompt, {1: (0, 60), 3: (0, 20)})
    assert stats.kept["llm(1)"][0].tolist() == visual_indices(prompt, expected[1])
    assert stats.kept["llm(3)"][0].tolist() == [expected[1].index(p) for p in expected[3]]


def test_wrap_refuses_a_transition_window_outside_the_layers_before_k(model):
    with pytest.raises(ValueError, match=r"from_layer=2 must be in \[0, 1\]"):
        vtoken.wrap(model, "transprune@llm(2)", keep=8, from_layer=2)
    assert not hasattr(model, "vtoken")


def test_instruction_attention_changes_the_selection(model):
    """IGA is not dominated away: with it some row keeps other tokens than with TTV alone."""
    batch = llava_batch(PROMPTS, seed=4)
    kept = {}
    for attention in (True, False):
        with vtoken.wrapped(model, TransPrune(site="llm(2)", from_layer=0, keep=24, attention=attention)):
            with torch.no_grad():
                model(**batch)
            kept[attention] = [k.tolist() for k in model.vtoken.stats.kept["llm(2)"]]
    assert kept[True] != kept[False]


def test_the_authors_schedule_runs_as_a_pyramid():
    """Their LLaVA-1.5 schedule (defaults: transitions from layer 6; sites 7, 9, 12 keeping 87.5, 62.5 and
    12.5 % of the visual tokens) on a 13-layer decoder; cached generation equals recomputation."""
    model = tiny_llava("sdpa", seed=2, text_layers=13)
    batch = llava_batch(PROMPTS[:2], seed=4)
    pipeline = vtoken.Pipeline([TransPrune(keep=0.875), TransPrune(site="llm(9)", keep=0.714),
                                TransPrune(site="llm(12)", keep=0.2)])
    with vtoken.wrapped(model, pipeline):
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        counts = model.vtoken.stats.llm_layer_tokens
        recomputed = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert counts == [144] * 7 + [126] * 2 + [90] * 3 + [18], counts
    assert torch.equal(cached, recomputed)


def test_the_default_window_starts_at_layer_6_or_k_minus_1():
    assert TransPrune(site="llm(12)").from_layer == 6
    assert TransPrune(site="llm(7)").from_layer == 6
    assert TransPrune(site="llm(3)").from_layer == 2
