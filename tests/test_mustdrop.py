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
    visual = [token == IMAGE_TOKEN for token in prompt]
    return slow_filter(model, decoder_inputs(model, batch), visual, [False] * len(visual), plan)


def slow_filter(model, hidden: torch.Tensor, visual: list[bool], pinned: list[bool], plan: dict[int, int]):
    """The decoder by hand on ``hidden`` (its input), the filter at each site K of ``plan`` (kept count)
    ranking pinned tokens first, then by the dual-attention score. Returns the logits and the kept positions
    into each site's visual tokens."""
    lm = model.model.language_model
    positions = torch.arange(hidden.shape[1])
    pins = [p and v for p, v in zip(pinned, visual)]
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
                order = sorted(range(len(candidates)),
                               key=lambda j: (not pins[candidates[j]], -float(score[j]), j))[: plan[index]]
                kept[index] = sorted(order)
                stay = torch.tensor([not v for v in visual])
                stay[[candidates[j] for j in order]] = True
                hidden, positions = hidden[:, stay], positions[stay]
                visual = [v for v, s in zip(visual, stay) if s]
                pins = [p for p, s in zip(pins, stay) if s]
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


# --- the vision stage: window merge at the projector ------------------------------------------------------

def slow_window_merge(x, h, w, size, k):
    """Loops over the windows: mean pairwise cosine, most similar first, whole windows while they fit, then
    the next window's tokens most similar to the rest of it. Returns groups (sorted by their last token)."""
    def cos(a, b):
        return float(torch.dot(x[a].double(), x[b].double()) / (x[a].double().norm() * x[b].double().norm()))

    windows = []
    for top in range(0, h, size):
        for left in range(0, w, size):
            rows, cols = range(top, min(top + size, h)), range(left, min(left + size, w))
            windows.append([r * w + c for r in rows for c in cols])

    def similarity(members):
        pairs = [(a, b) for a in members for b in members if a != b]
        return sum(cos(a, b) for a, b in pairs) / len(pairs) if pairs else float("-inf")

    order = sorted(range(len(windows)), key=lambda i: (-similarity(windows[i]), i))
    reduce, groups, used = h * w - k, [], set()
    for i in order:
        members = windows[i]
        if reduce == 0 or len(members) < 2:
            continue
        if len(members) - 1 > reduce:
            close = {p: sum(cos(p, q) for q in members if q != p) / (len(members) - 1) for p in members}
            members = sorted(sorted(members, key=lambda p: (-close[p], members.index(p)))[: reduce + 1])
        groups.append(members)
        used.update(members)
        reduce -= len(members) - 1
    groups += [[p] for p in range(h * w) if p not in used]
    return sorted(groups, key=lambda g: g[-1])


@pytest.mark.parametrize("grid,k", [((6, 6), 20), ((6, 6), 31), ((7, 5), 12), ((6, 6), 36)])
def test_window_merge_equals_the_slow_reference(grid, k):
    from vtoken.stages import MustDropMerge
    from vtoken.tokens import TokenSet

    h, w = grid
    generator = torch.Generator().manual_seed(h * 10 + k)
    base = torch.randn(2, h * w, 8, generator=generator)
    base[:, : w * 3] += 3 * torch.randn(2, 1, 8, generator=generator)  # similar rows on top: windows to merge
    tokens = TokenSet.from_features(base, grid=grid)
    keep = MustDropMerge(keep=k, key_share=0).select(tokens, k)  # the key set: test_mustdrop_keys.py
    for row in range(2):
        groups = slow_window_merge(base[row], h, w, 3, k)
        assert keep.indices[row].tolist() == [g[-1] for g in groups]
        assert keep.assign[row].tolist() == [next(s for s, g in enumerate(groups) if p in g) for p in range(h * w)]
        expected = torch.stack([base[row, g].mean(0) for g in groups])
        torch.testing.assert_close(keep.features[row], expected, atol=1e-6, rtol=0)


def test_window_merge_refuses_fewer_tokens_than_windows():
    from vtoken.stages import MustDropMerge
    from vtoken.tokens import TokenSet

    tokens = TokenSet.from_features(torch.randn(1, 36, 4), grid=(6, 6))
    with pytest.raises(ValueError, match="keeps at least 4 tokens"):
        MustDropMerge(keep=3, key_share=0).select(tokens, 3)


def test_merge_then_filter_run_as_the_named_stages_together():
    """The two built stages of MustDrop in one pipeline on LLaVA: cached generate equals recomputation."""
    model = tiny_llava("sdpa", seed=8)
    batch = llava_batch(PROMPTS[:2], seed=4)
    pipeline = vtoken.Pipeline([vtoken.stages.MustDropMerge(keep=80), MustDropFilter(site="llm(2)", keep=30)])
    with vtoken.wrapped(model, pipeline):
        cached = model.generate(**batch, max_new_tokens=5, do_sample=False)
        recomputed = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
        assert [r.tokens_out for r in model.vtoken.stats.records] == [80, 30]
    assert torch.equal(cached, recomputed)


# --- the decode stage: caches cut to the final kept set -----------------------------------------------------

def slow_generate(model, batch, prompt, plan: dict[int, int], steps: int):
    """Greedy decoding without a cache, by hand: the prefill's choices (from slow_mustdrop) applied to the
    longer sequence; from the second generated query on (after the first cached step's cut), every layer's
    generated queries see only the visual tokens the last site kept."""
    lm = model.model.language_model
    _, kept = slow_mustdrop(model, batch, prompt, plan)
    visual_at = [p for p, token in enumerate(prompt) if token == IMAGE_TOKEN]
    chosen, survivors = {}, visual_at
    for site in sorted(plan):
        survivors = [survivors[j] for j in kept[site]]
        chosen[site] = set(survivors)
    final = set(survivors)
    embeds = decoder_inputs(model, batch)
    table = model.get_input_embeddings()
    length, tokens = len(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            hidden = embeds
            positions = torch.arange(hidden.shape[1])
            for index, layer in enumerate(lm.layers):
                if index in chosen:
                    stay = torch.tensor([p not in visual_at or p in chosen[index] for p in positions.tolist()])
                    hidden, positions = hidden[:, stay], positions[stay]
                n = hidden.shape[1]
                mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)
                for q, p in enumerate(positions.tolist()):
                    if p >= length + 1:  # generated after the first decoding step's cut
                        for c, key in enumerate(positions.tolist()):
                            if key in visual_at and key not in final:
                                mask[q, c] = torch.finfo(hidden.dtype).min
                cos, sin = lm.rotary_emb(hidden, positions[None])
                hidden = layer(hidden, attention_mask=mask[None, None], position_ids=positions[None],
                               position_embeddings=(cos, sin))
            token = int(model.lm_head(lm.norm(hidden))[0, -1].argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, table(torch.tensor([[token]]))], dim=1)
    return tokens, len(final)


def test_cache_cut_equals_the_slow_reference_and_frees_the_entries():
    from vtoken.stages import MustDropCache

    model = tiny_llava("eager", seed=21, text_layers=5)
    prompt = PROMPTS[0]
    batch = llava_batch([prompt], seed=4)
    plan = {1: 60, 3: 20}
    expected, final = slow_generate(model, batch, prompt, plan, steps=5)
    pipeline = vtoken.Pipeline([MustDropFilter(site=f"llm({k})", keep=keep) for k, keep in plan.items()]
                               + [MustDropCache()])
    with vtoken.wrapped(model, pipeline):
        out = model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        recomputed = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False)
    assert out.sequences[0, -5:].tolist() == expected
    assert torch.equal(out.sequences, recomputed)
    # every layer holds the text, the final visual set and the generated tokens: the others are freed
    text = len(prompt) - sum(token == IMAGE_TOKEN for token in prompt)
    lengths = {layer.keys.shape[-2] for layer in out.past_key_values.layers}
    assert lengths == {text + final + 4}, lengths


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)])
def test_cache_cut_with_beams_equals_recomputation(options):
    from vtoken.stages import MustDropCache

    model = tiny_llava("sdpa", seed=22)
    batch = llava_batch(PROMPTS[:2], seed=4)
    pipeline = vtoken.Pipeline([MustDropFilter(site="llm(1)", keep=50), MustDropFilter(site="llm(3)", keep=12),
                                MustDropCache()])
    with vtoken.wrapped(model, pipeline):
        cached = model.generate(**batch, max_new_tokens=5, do_sample=False, **options)
        recomputed = model.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=False, **options)
    assert torch.equal(cached, recomputed)


def test_cache_stage_with_a_budget_keeps_what_decode_topk_keeps():
    """vtoken's addition: below the final set, the entries the new token attends to most (decode_topk's rule)."""
    from vtoken.stages import DecodeTopK, MustDropCache

    model = tiny_llava("sdpa", seed=23)
    batch = llava_batch(PROMPTS[:2], seed=4)
    runs = []
    for stage in (MustDropCache(keep=6), DecodeTopK(keep=6)):
        with vtoken.wrapped(model, vtoken.Pipeline([MustDropFilter(site="llm(2)", keep=30), stage])):
            out = model.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
            runs.append((out.sequences, model.vtoken.stats.kept["decode"]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert [[(s, k.tolist()) for s, k in row] for row in runs[0][1]] == \
        [[(s, k.tolist()) for s, k in row] for row in runs[1][1]]
