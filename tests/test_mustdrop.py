"""MustDrop's prefill dual-attention filter at llm(K): the text after the image attends to the visual tokens
at layer K-1; tokens rank by how far their summed (global) or maximum (individual) attention clears the
authors' thresholds. The wrapped model's selections and logits equal a slow reference written here: the
unwrapped tiny LLaVA's decoder run layer by layer by hand, each text query's softmax row computed in
float64; alone, as the authors' multi-site pyramid, in a padded batch; keep-all and cached generate."""

from __future__ import annotations

import pytest
import torch

import vtoken
from test_llm_pyramid import decoder_inputs
from test_transprune import rotate
from tiny_models import IMAGE_TOKEN, llava_batch, prompt_ids, tiny_llava
from vtoken.stages import MustDropFilter

PROMPTS = [prompt_ids([20, 21], 1, [30, 31, 32, 33, 34]), prompt_ids([22], 1, [35, 36]),
           prompt_ids([23, 24, 25], 1, [37, 38, 39, 40])]
GLOBAL, INDIVIDUAL = 0.011, 0.01


def text_rows(layer, hidden, positions, rotary, text):
    """Each text query's causal softmax row at ``layer``, mean over heads: ``[len(text), n]`` float64."""
    attention = layer.self_attn
    d = attention.head_dim
    h = layer.input_layernorm(hidden)[0]
    cos, sin = rotary(hidden, positions[None])
    cos, sin = cos[0][:, None], sin[0][:, None]
    q = rotate(attention.q_proj(h).view(h.shape[0], -1, d), cos, sin)
    k = rotate(attention.k_proj(h).view(h.shape[0], -1, d), cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    rows = torch.zeros(len(text), h.shape[0], dtype=torch.float64)
    for r, i in enumerate(text):
        scores = torch.einsum("hd,nhd->hn", q[i].double(), k[: i + 1].double()) * attention.scaling
        rows[r, : i + 1] = torch.softmax(scores, dim=-1).mean(0)
    return rows


def slow_mustdrop(model, batch, prompt, plan: dict[int, int]):
    """plan: site K -> kept count. Returns logits and the kept indices (into the site's visual tokens)."""
    lm = model.model.language_model
    hidden = decoder_inputs(model, batch)
    positions = torch.arange(hidden.shape[1])
    visual = [token == IMAGE_TOKEN for token in prompt]
    kept, previous = {}, None
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            if index in plan:
                x, at = previous
                candidates = [i for i, v in enumerate(visual) if v]
                text = list(range(max(candidates) + 1, len(visual)))
                rows = text_rows(lm.layers[index - 1], x, at, lm.rotary_emb, text)[:, candidates]
                g, peak = rows.sum(0), rows.max(0).values
                score = torch.maximum(g / (GLOBAL * g.sum()), peak / INDIVIDUAL)
                order = sorted(range(len(candidates)), key=lambda j: (-float(score[j]), j))[: plan[index]]
                kept[index] = sorted(order)
                stay = torch.tensor([not v for v in visual])
                stay[[candidates[j] for j in order]] = True
                hidden, positions = hidden[:, stay], positions[stay]
                visual = [v for v, s in zip(visual, stay) if s]
            previous = (hidden, positions)
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            cos, sin = lm.rotary_emb(hidden, positions[None])
            hidden = layer(hidden, attention_mask=mask, position_ids=positions[None], position_embeddings=(cos, sin))
        logits = model.lm_head(lm.norm(hidden))
    return logits, kept


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager", seed=13)


def test_selection_equals_the_slow_reference(model):
    prompt = PROMPTS[0]
    batch = llava_batch([prompt], seed=4)
    expected, kept = slow_mustdrop(model, batch, prompt, {2: 30})
    with vtoken.wrapped(model, MustDropFilter(site="llm(2)", keep=30)), torch.no_grad():
        got = model(**batch).logits
        assert model.vtoken.stats.kept["llm(2)"][0].tolist() == kept[2]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_authors_pyramid_equals_the_slow_reference():
    """Their layers 2, 6, 10, 14 are llm(3), llm(7), llm(11), llm(15) on a 16-layer decoder."""
    model = tiny_llava("eager", seed=3, text_layers=16)
    prompt = PROMPTS[2]
    batch = llava_batch([prompt], seed=4)
    plan = {3: 100, 7: 60, 11: 30, 15: 10}
    expected, kept = slow_mustdrop(model, batch, prompt, plan)
    pipeline = vtoken.Pipeline([MustDropFilter(site=f"llm({k})", keep=keep) for k, keep in plan.items()])
    with vtoken.wrapped(model, pipeline), torch.no_grad():
        got = model(**batch).logits
        for site in plan:
            assert model.vtoken.stats.kept[f"llm({site})"][0].tolist() == kept[site], f"llm({site})"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_padded_batch_equals_each_row_alone(model):
    batch = llava_batch(PROMPTS, seed=4)
    with vtoken.wrapped(model, MustDropFilter(site="llm(2)", keep=30)), torch.no_grad():
        logits = model(**batch).logits
        together = model.vtoken.stats.kept["llm(2)"]
    for row, prompt in enumerate(PROMPTS):
        single = llava_batch([prompt])
        single["pixel_values"] = batch["pixel_values"][row: row + 1]
        expected, kept = slow_mustdrop(model, single, prompt, {2: 30})
        assert together[row].tolist() == kept[2], f"row {row} differs from the reference"
        torch.testing.assert_close(logits[row, -1], expected[0, -1], atol=1e-4, rtol=0)


def test_keep_all_equals_the_unwrapped_logits(model):
    batch = llava_batch(PROMPTS, seed=4)
    with torch.no_grad():
        plain = model(**batch).logits
    with vtoken.wrapped(model, MustDropFilter(site="llm(2)", keep=1.0)), torch.no_grad():
        kept_all = model(**batch).logits
    attended = batch["attention_mask"].bool()  # padding is dropped at an llm(K) site
    torch.testing.assert_close(kept_all[attended], plain[attended], atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=False, num_beams=2)])
def test_cached_generate_equals_recomputation(options):
    model = tiny_llava("sdpa", seed=7)
    batch = llava_batch(PROMPTS[:2], seed=4)
    pipeline = vtoken.Pipeline([MustDropFilter(site="llm(1)", keep=60), MustDropFilter(site="llm(3)", keep=20)])
    with vtoken.wrapped(model, pipeline):
        cached = model.generate(**batch, max_new_tokens=5, **options)
        recomputed = model.generate(**batch, max_new_tokens=5, use_cache=False, **options)
    assert torch.equal(cached, recomputed)


def test_wrap_refuses_a_threshold_that_is_not_positive(model):
    with pytest.raises(ValueError, match="individual_thr must be > 0"):
        vtoken.wrap(model, "mustdrop_filter@llm(2)", keep=8, individual_thr=0)
    assert not hasattr(model, "vtoken")
