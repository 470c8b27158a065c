"""SparseVLM at llm(K): raters chosen from the decoder input, their attention at layer K-1, top tokens
kept and the best-rated pruned ones recycled into a few merged tokens (density peaks over nearest
neighbours, plain means). The wrapped model's selections, merged hidden states and logits equal a slow
reference written here: the unwrapped tiny LLaVA's decoder run layer by layer by hand, in float64 where
the method computes, with the raters, scores, counts and clusters computed from their definitions. Also
as the authors' three-site pyramid, in padded batches (each row as alone), keep-all and cached generate."""

from __future__ import annotations

import pytest
import torch

import vtoken
from test_llm_pyramid import decoder_inputs
from test_transprune import instruction_attention
from tiny_models import IMAGE_TOKEN, TOKENS_PER_IMAGE, llava_batch, prompt_ids, tiny_llava
from vtoken.stages import SparseVLM

PROMPTS = [prompt_ids([20, 21], 1, [30, 31, 32, 33, 34, 35]), prompt_ids([22], 1, [36, 37, 38]),
           prompt_ids([23, 24, 25], 1, [39, 40, 41, 42, 43])]


def raters_of(embeds, visual):
    """Text after the image whose mean (over visual tokens) softmax-over-text similarity beats the mean."""
    last = max(i for i, v in enumerate(visual) if v)
    text = list(range(last + 1, len(visual)))
    v = embeds[0, [i for i, flag in enumerate(visual) if flag]].double()
    t = embeds[0, text].double()
    relevance = torch.softmax(v @ t.T, dim=-1).mean(0)
    return [p for p, r in zip(text, relevance) if r > relevance.mean()]


def split(n, k):
    """Kept m and clusters c with m + c == k (the authors' 30 % candidates, one cluster per 10 + 1)."""
    if k >= n:
        return k, 0, 0
    for m in range(k - 1, -1, -1):
        candidates = int((n - m) * 0.3) + 1
        clusters = candidates // 10 + 1
        if m + clusters == k:
            return m, candidates, clusters
    return k, 0, 0


def dpc_knn(x, clusters):
    """Density peaks over ``clusters`` nearest neighbours, written out with loops: centres, assignment."""
    n, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / d ** 0.5 for j in range(n)] for i in range(n)]
    density = [torch.tensor(sorted(row)[:clusters]).pow(2).mean().neg().exp().item() for row in dist]
    top = max(max(row) for row in dist)
    parent = [min([dist[i][j] for j in range(n) if density[j] > density[i]], default=top) for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-parent[i] * density[i], i))[:clusters]
    assign = [min(range(clusters), key=lambda c: (dist[centres[c]][i], c)) for i in range(n)]
    for c, centre in enumerate(centres):
        assign[centre] = c
    return centres, assign


def slow_sparsevlm(model, batch, prompt, plan: dict[int, int]):
    """plan: site K -> visual tokens leaving it. Returns logits, the kept slots per site (indices into the
    site's visual tokens) and the merged hidden states per site (original position -> vector)."""
    lm = model.model.language_model
    hidden = decoder_inputs(model, batch)
    positions = torch.arange(hidden.shape[1])
    visual = [token == IMAGE_TOKEN for token in prompt]
    raters = raters_of(hidden, visual)
    kept, merged, previous = {}, {}, None
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            if index in plan:
                x, at = previous
                rows = [i for i, p in enumerate(at.tolist()) if p in raters]
                attention = instruction_attention(lm.layers[index - 1], x, at, lm.rotary_emb, rows)
                candidates = [i for i in range(len(positions)) if visual[i]]
                m, n_pool, clusters = split(len(candidates), plan[index])
                order = sorted(range(len(candidates)), key=lambda j: (-float(attention[candidates[j]]), j))
                slots = set(order[:m])
                new = hidden.clone()
                if clusters:
                    pool = order[m: m + n_pool]
                    x_pool = torch.stack([hidden[0, candidates[j]].double() for j in pool])
                    centres, assign = dpc_knn(x_pool, clusters)
                    for c, centre in enumerate(centres):
                        members = [hidden[0, candidates[pool[i]]] for i in range(len(pool)) if assign[i] == c]
                        at_centre = candidates[pool[centre]]
                        new[0, at_centre] = torch.stack(members).mean(0)
                        merged.setdefault(index, {})[int(positions[at_centre])] = new[0, at_centre]
                        slots.add(pool[centre])
                kept[index] = sorted(slots)
                stay = torch.tensor([not visual[i] for i in range(len(positions))])
                stay[[candidates[j] for j in slots]] = True
                hidden, positions = new[:, stay], positions[stay]
                visual = [v for v, s in zip(visual, stay) if s]
            previous = (hidden, positions)
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            cos, sin = lm.rotary_emb(hidden, positions[None])
            hidden = layer(hidden, attention_mask=mask, position_ids=positions[None], position_embeddings=(cos, sin))
        logits = model.lm_head(lm.norm(hidden))
    return logits, kept, merged


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager", seed=11)


def layer_inputs(model, layers):
    """Record the hidden states each decoder layer of ``layers`` receives (after vtoken's own hooks)."""
    seen, handles = {}, []
    for index in layers:
        def hook(module, args, kwargs, index=index):
            seen[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        handles.append(model.model.language_model.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def test_selection_and_recycled_tokens_equal_the_slow_reference(model):
    prompt = PROMPTS[0]
    batch = llava_batch([prompt], seed=4)
    plan = {2: 40}
    expected, kept, merged = slow_sparsevlm(model, batch, prompt, plan)
    assert len(merged[2]) == 4, "the budget of 40 out of 144 keeps 36 and recycles into 4"
    with vtoken.wrapped(model, SparseVLM(site="llm(2)", keep=40)):
        seen, handles = layer_inputs(model, [2])
        with torch.no_grad():
            got = model(**batch).logits
        for handle in handles:
            handle.remove()
        stats = model.vtoken.stats
    assert stats.kept["llm(2)"][0].tolist() == kept[2]
    visual = [p for p, token in enumerate(prompt) if token == IMAGE_TOKEN]
    present = [p for p, token in enumerate(prompt) if token != IMAGE_TOKEN or visual.index(p) in kept[2]]
    for position, vector in merged[2].items():
        torch.testing.assert_close(seen[2][0, present.index(position)], vector, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_padded_batch_equals_each_row_alone(model):
    batch = llava_batch(PROMPTS, seed=4)
    with vtoken.wrapped(model, SparseVLM(site="llm(2)", keep=40)), torch.no_grad():
        logits = model(**batch).logits
        together = model.vtoken.stats.kept["llm(2)"]
    for row, prompt in enumerate(PROMPTS):
        single = llava_batch([prompt])
        single["pixel_values"] = batch["pixel_values"][row: row + 1]
        expected, kept, _ = slow_sparsevlm(model, single, prompt, {2: 40})
        assert together[row].tolist() == kept[2], f"row {row} differs from the reference"
        torch.testing.assert_close(logits[row, -1], expected[0, -1], atol=1e-4, rtol=0)


def test_the_authors_three_sites_equal_the_slow_reference():
    """Their schedule's shape (prune after layers 2, 6, 15 = llm(3), llm(7), llm(16)) on a 17-layer decoder:
    later sites rate and may merge the earlier sites' recycled tokens."""
    model = tiny_llava("eager", seed=3, text_layers=17)
    prompt = PROMPTS[0]
    batch = llava_batch([prompt], seed=4)
    plan = {3: 80, 7: 40, 16: 12}
    expected, kept, _ = slow_sparsevlm(model, batch, prompt, plan)
    pipeline = vtoken.Pipeline([SparseVLM(site=f"llm({k})", keep=keep) for k, keep in plan.items()])
    with vtoken.wrapped(model, pipeline), torch.no_grad():
        got = model(**batch).logits
        stats = model.vtoken.stats
    for site in plan:
        assert stats.kept[f"llm({site})"][0].tolist() == kept[site], f"llm({site}) differs from the reference"
    assert stats.llm_layer_tokens == [TOKENS_PER_IMAGE] * 3 + [80] * 4 + [40] * 9 + [12]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_keep_all_equals_the_unwrapped_logits(model):
    batch = llava_batch(PROMPTS, seed=4)
    with torch.no_grad():
        plain = model(**batch).logits
    with vtoken.wrapped(model, SparseVLM(site="llm(2)", keep=1.0)), torch.no_grad():
        kept_all = model(**batch).logits
    attended = batch["attention_mask"].bool()  # padding is dropped at an llm(K) site: its logits are not kept
    torch.testing.assert_close(kept_all[attended], plain[attended], atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=False, num_beams=2)])
def test_cached_generate_equals_recomputation(options):
    """A pyramid with recycling: the no-cache passes merge the same positions again."""
    model = tiny_llava("sdpa", seed=7)
    batch = llava_batch(PROMPTS[:2], seed=4)
    pipeline = vtoken.Pipeline([SparseVLM(site="llm(1)", keep=60), SparseVLM(site="llm(3)", keep=20)])
    with vtoken.wrapped(model, pipeline):
        cached = model.generate(**batch, max_new_tokens=5, output_logits=True, return_dict_in_generate=True, **options)
        recomputed = model.generate(**batch, max_new_tokens=5, use_cache=False, output_logits=True,
                                    return_dict_in_generate=True, **options)
    assert torch.equal(cached.sequences, recomputed.sequences), (
        f"{cached.sequences[:, -5:].tolist()} != {recomputed.sequences[:, -5:].tolist()}")
    # the logits of every step, not only the argmax: a recycled token merged differently would show here
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=1e-5, rtol=0)


def test_the_budget_is_met_exactly_with_or_without_recycling():
    from vtoken.stages.sparsevlm import recycled_counts, split_budget
    for n in (144, 576):
        for k in range(1, n + 1):
            m = split_budget(n, k, True)
            assert m == k or m + recycled_counts(n - m)[1] == k
            assert split_budget(n, k, False) == k
    assert split_budget(576, 309, True) == 300  # the authors' first layer: 300 kept + 9 recycled
