"""Each stage's selection against a slow, obviously correct reference, plus properties of every
selection (exact count, unique, sorted, in range, deterministic)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtoken
from vtoken import ClsAttn, Dart, FastV, KCenter, Pool, RandomKeep, TokenSet


def tokens(batch=2, n=36, dim=8, grid=(6, 6), seed=0, **signals) -> TokenSet:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=generator)
    extra = {name: torch.rand(batch, n, generator=generator) for name in signals}
    return TokenSet.from_features(x, grid=grid if grid and grid[0] * grid[1] == n else None, signals=extra)


# --- slow references ---------------------------------------------------------------------------

def topk_reference(scores: list[float], k: int) -> list[int]:
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:k])


def kcenter_reference(x: torch.Tensor, k: int) -> list[int]:
    n = x.shape[0]
    unit = [v / max(v.norm().item(), 1e-12) for v in x.double()]
    dist = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < k:
        best = max((i for i in range(n) if i not in chosen), key=lambda i: (min(dist[i][c] for c in chosen), -i))
        chosen.append(best)
    return sorted(chosen)


def dart_reference(x: torch.Tensor, k: int, pivots: int) -> list[int]:
    n = x.shape[0]
    norms = [float(v.abs().sum()) for v in x]
    order = sorted(range(n), key=lambda i: (-norms[i], i))
    pivot_ids = order[: min(pivots, k)]
    kept = list(pivot_ids)
    rest = k - len(pivot_ids)
    for p_rank, p in enumerate(pivot_ids):
        share = rest // len(pivot_ids) + (1 if p_rank < rest % len(pivot_ids) else 0)
        cos = {i: float(torch.nn.functional.cosine_similarity(x[i], x[p], dim=0, eps=1e-6)) for i in range(n)}
        candidates = sorted((i for i in range(n) if i not in kept), key=lambda i: (cos[i], i))
        kept += candidates[:share]
    return sorted(kept)


def pool_reference(x: torch.Tensor, h: int, w: int, a: int, b: int) -> torch.Tensor:
    out = torch.zeros(a * b, x.shape[-1], dtype=torch.float64)
    counts = torch.zeros(a * b, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            cell = (i * a // h) * b + (j * b // w)
            out[cell] += x[i * w + j].double()
            counts[cell] += 1
    return out / counts[:, None]


# --- selections equal their references ---------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 18, 36])
def test_cls_attn_keeps_top_scores(k):
    t = tokens(cls_attn=True)
    keep = ClsAttn().select(t, k)
    for row in range(t.batch_size):
        assert keep.indices[row].tolist() == topk_reference(t.signals["cls_attn"][row].tolist(), k)


@pytest.mark.parametrize("k", [1, 4, 9, 20])
def test_kcenter_equals_slow_greedy_reference(k):
    t = tokens(n=30, dim=6, grid=None)
    keep = KCenter().select(t, k)
    for row in range(t.batch_size):
        assert keep.indices[row].tolist() == kcenter_reference(t.features[row], k)


@pytest.mark.parametrize("k", [8, 13, 20])
def test_dart_projector_form_equals_reference(k):
    t = tokens(n=40, grid=None)
    stage = Dart(image_pivots=2, text_pivots=1)
    keep = stage.select(t, k)
    for row in range(t.batch_size):
        assert keep.indices[row].tolist() == dart_reference(t.features[row], k, pivots=3)


def test_dart_llm_form_uses_key_norm_and_text_pivots():
    t = tokens(n=20, grid=None, key_norm=True)
    generator = torch.Generator().manual_seed(3)
    t.context["text_features"] = torch.randn(2, 5, 8, generator=generator)
    t.context["text_key_norm"] = torch.rand(2, 5, generator=generator)
    keep = Dart(image_pivots=2, text_pivots=2, site="llm(2)").select(t, 8)
    for row in range(2):
        image_pivots = sorted(range(20), key=lambda i: (-float(t.signals["key_norm"][row, i]), i))[:2]
        assert set(image_pivots) <= set(keep.indices[row].tolist()), "image pivots must be kept"
        text_ids = sorted(range(5), key=lambda i: (-float(t.context["text_key_norm"][row, i]), i))[:2]
        pivots = [t.features[row, i] for i in image_pivots] + [t.context["text_features"][row, i] for i in text_ids]
        kept = list(image_pivots)
        for p_rank, p in enumerate(pivots):
            share = 6 // 4 + (1 if p_rank < 6 % 4 else 0)
            cos = [float(torch.nn.functional.cosine_similarity(t.features[row, i], p, dim=0, eps=1e-6))
                   for i in range(20)]
            kept += sorted((i for i in range(20) if i not in kept), key=lambda i: (cos[i], i))[:share]
        assert keep.indices[row].tolist() == sorted(kept)


@pytest.mark.parametrize("k,shape", [(9, (3, 3)), (4, (2, 2)), (12, (3, 4)), (36, (6, 6)), (6, (2, 3))])
def test_pool_averages_each_cell(k, shape):
    t = tokens()
    keep = Pool().select(t, k)
    assert keep.grid == shape
    for row in range(t.batch_size):
        expected = pool_reference(t.features[row], 6, 6, *shape)
        torch.testing.assert_close(keep.features[row].double(), expected, atol=1e-6, rtol=1e-6)
    merged = t.apply(keep)
    assert merged.weights.sum(1).tolist() == [36.0, 36.0], "every patch is counted in exactly one merged token"


def test_pool_refuses_budgets_that_cannot_tile_the_grid():
    with pytest.raises(ValueError, match="cannot merge a 6x6 grid into exactly 7 tokens"):
        Pool().select(tokens(), 7)


def test_random_is_seeded_and_batch_independent():
    t = tokens(batch=3)
    first = RandomKeep(seed=4).select(t, 10).indices
    assert torch.equal(first, RandomKeep(seed=4).select(t, 10).indices)
    assert not torch.equal(first, RandomKeep(seed=5).select(t, 10).indices)
    assert torch.equal(first[0], RandomKeep(seed=4).select(tokens(batch=1), 10).indices[0])


def test_fastv_keeps_top_last_query_attention():
    t = tokens(last_query_attn=True)
    keep = FastV().select(t, 7)
    for row in range(2):
        assert keep.indices[row].tolist() == topk_reference(t.signals["last_query_attn"][row].tolist(), 7)


def test_pipeline_commits_then_fills_from_the_rest():
    t = tokens(cls_attn=True)
    pipeline = vtoken.Pipeline([ClsAttn(keep=5), KCenter()], keep=12)
    _, keep = pipeline.run(vtoken.Site("projector"), t)
    for row in range(2):
        top = topk_reference(t.signals["cls_attn"][row].tolist(), 5)
        rest = [i for i in range(36) if i not in top]
        diverse = [rest[i] for i in kcenter_reference(t.features[row, rest], 7)]
        assert keep.indices[row].tolist() == sorted(top + diverse)


# --- properties of every selection -------------------------------------------------------------

STAGES = {
    "cls_attn": lambda: ClsAttn(),
    "kcenter": lambda: KCenter(),
    "dart": lambda: Dart(),
    "random": lambda: RandomKeep(seed=1),
    "fastv": lambda: FastV(),
}


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(STAGES)),
    n=st.integers(2, 48),
    dim=st.integers(1, 12),
    batch=st.integers(1, 3),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
)
def test_selection_properties(name, n, dim, batch, fraction, seed):
    k = max(1, min(n, int(math.ceil(fraction * n))))
    t = tokens(batch=batch, n=n, dim=dim, grid=None, seed=seed, cls_attn=True, last_query_attn=True)
    stage = STAGES[name]()
    keep = stage.select(t, k)
    idx = keep.indices
    assert idx.shape == (batch, k), "exact count"
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "sorted and unique"
    assert int(idx.min()) >= 0 and int(idx.max()) < n, "in range"
    assert torch.equal(idx, STAGES[name]().select(t, k).indices), "deterministic"


@settings(max_examples=20, deadline=None)
@given(h=st.integers(1, 8), w=st.integers(1, 8), seed=st.integers(0, 1000), data=st.data())
def test_pool_properties(h, w, seed, data):
    a = data.draw(st.integers(1, h))
    b = data.draw(st.integers(1, w))
    t = tokens(batch=1, n=h * w, grid=(h, w), seed=seed)
    keep = Pool().select(t, a * b)
    assert keep.features.shape[1] == a * b
    assert bool((keep.indices[:, 1:] > keep.indices[:, :-1]).all())
    assert keep.assign.unique().numel() == a * b, "every cell holds at least one token"


@pytest.mark.parametrize("method,options,message", [
    ("hiprune", dict(alpha="0.5"), r"hiprune alpha='0.5'; accepted: a float in \[0, 1\]"),
    ("hiprune", dict(alpha=True), r"hiprune alpha=True; accepted: a float in \[0, 1\]"),
    ("vscan_scan", dict(global_share=-0.1), r"global_share=-0.1; accepted: a float in \[0, 1\]"),
    ("vscan_scan", dict(window=2.0), r"window=2.0; accepted: an int >= 1 \(patches per side\)"),
    ("holitom", dict(tau=1.5), r"tau=1.5; accepted: a cosine similarity in \[-1, 1\]"),
    ("holitom", dict(knn=0), r"knn=0; accepted: an int >= 1"),
    ("holitom", dict(max_segment=1), r"max_segment=1; accepted: None or an int >= 2 \(frames\)"),
    ("dycoke", dict(window=True), r"window=True; accepted: an int >= 2 \(frames per window\)"),
])
def test_numeric_options_are_refused_with_the_accepted_values(method, options, message):
    # strings and bools must get the same clear error as out-of-range numbers, not a TypeError from a comparison
    with pytest.raises(ValueError, match=message):
        vtoken.registry.STAGES[method](**options)
    vtoken.registry.STAGES[method](**{name: None for name in options if name == "max_segment"})
