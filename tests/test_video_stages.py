"""Temporal stages on video clips: the (t, h, w) clip layout, DyCoke's token temporal merging and HoliTom's
merging before the LLM, each against a slow reference written here, and through tiny Qwen2-VL and
Qwen2.5-VL models on clips (budget, keep-all, padded batch, cached generation: the contract clauses)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

import test_contract as contract
import vtoken
from contract_models import QWEN2_VIDEO_CASES
from integrations_helpers import lm_inputs
from tiny_models import Q_VIDEO, qwen3_batch, qwen_batch, tiny_qwen, tiny_qwen3_vl
from vtoken.stages import DyCoke, HoliTom
from vtoken.tokens import Keep, TokenSet

VERSIONS = ["2", "2.5"]


# --- the clip layout ---------------------------------------------------------------------------------
def test_clip_layout_survives_take_and_apply():
    features = torch.randn(2, 3 * 2 * 4, 5)
    clip = TokenSet.from_features(features, grid=(3, 2, 4))
    assert clip.layout == (3, 2, 4) and clip.grid is None, "a multi-frame clip has a layout and no single grid"
    frame, row, col = clip.clip_positions()
    assert frame[0].tolist() == [i // 8 for i in range(24)]
    assert row[0].tolist() == [i % 8 // 4 for i in range(24)] and col[0].tolist() == [i % 4 for i in range(24)]
    picked = torch.tensor([[1, 9, 23], [0, 8, 16]])
    taken = clip.take(picked)
    assert taken.layout == (3, 2, 4) and taken.index.tolist() == picked.tolist()
    assert [p[1].tolist() for p in taken.clip_positions()] == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]
    applied = clip.apply(Keep(indices=picked))
    assert applied.layout == (3, 2, 4)
    one_frame = TokenSet.from_features(torch.randn(1, 8, 5), grid=(1, 2, 4))
    assert one_frame.layout == (1, 2, 4) and one_frame.grid == (2, 4), "a one-frame clip is still a full grid"
    assert TokenSet.from_features(torch.randn(1, 8, 5), grid=(2, 4)).layout is None


@pytest.mark.parametrize("stage", [DyCoke(), HoliTom()], ids=["dycoke", "holitom"])
def test_refused_on_tokens_that_are_not_a_full_clip(stage):
    image = TokenSet.from_features(torch.randn(1, 8, 4), grid=(2, 4))
    with pytest.raises(ValueError, match=f"{stage.name} compares each token .* an image's"):
        stage.select(image, 4)
    subset = TokenSet.from_features(torch.randn(1, 16, 4), grid=(2, 2, 4)).take(torch.arange(12)[None])
    with pytest.raises(ValueError, match="12 of the 16 tokens"):
        stage.select(subset, 4)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="window"):
        DyCoke(window=1)
    with pytest.raises(ValueError, match="tau"):
        HoliTom(tau=2.0)
    with pytest.raises(ValueError, match="beta"):
        HoliTom(beta=1.5)


# --- DyCoke: slow reference --------------------------------------------------------------------------
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-8))


def dycoke_reference(x: torch.Tensor, t: int, h: int, w: int, k: int) -> list[int]:
    """DyCoke's TTM for one clip ``[N, D]`` with windows of 4, as the paper describes it: in a window
    (f0..f3) frame 1 and frame 2 are compared with f0 and frame 3 with frame 2; references after the first
    are compared with the previous reference. Tokens go to the first frame, then references, then the other
    frames, handed out one at a time round-robin; each frame keeps its least similar places."""
    p = h * w
    def compare(f):
        start = f - f % 4
        return {0: start - 4, 1: start, 2: start, 3: start + 2}[f % 4]
    count = {0: p}
    left = k - p
    for tier in ([f for f in range(4, t, 4)], [f for f in range(t) if f % 4]):
        count.update({f: 0 for f in tier})
        while left and tier and any(count[f] < p for f in tier):
            for f in tier:
                if left and count[f] < p:
                    count[f] += 1
                    left -= 1
    kept = []
    for f in range(t):
        if f == 0:
            kept += list(range(p))
            continue
        scores = [(cosine(x[f * p + q], x[compare(f) * p + q]), q) for q in range(p)]
        kept += sorted(f * p + q for _, q in sorted(scores)[:count[f]])
    return sorted(kept)


def synthetic_clip(t: int, p: int, dim: int, seed: int, changed: dict[int, list[int]]) -> torch.Tensor:
    """A clip whose frames repeat the frame before with a little noise, except at the places
    ``changed[frame]`` (new content there); a frame absent from ``changed`` is new everywhere."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(p, dim, generator=g)]
    for f in range(1, t):
        frame = frames[-1] + 0.05 * torch.randn(p, dim, generator=g)
        for q in changed.get(f, range(p)):
            frame[q] = torch.randn(dim, generator=g)
        frames.append(frame)
    return torch.cat(frames)


def test_dycoke_keeps_the_places_that_changed():
    t, h, w = 4, 2, 3
    # frame 1 changes places 2 and 4, frame 2 repeats frame 1 (so differs from frame 0 at 2 and 4), frame 3
    # changes places 0 and 1 of frame 2
    x = synthetic_clip(t, h * w, 8, 0, {1: [2, 4], 2: [], 3: [0, 1]})
    keep = DyCoke().select(TokenSet.from_features(x[None], grid=(t, h, w)), 6 + 3 * 2)
    assert keep.indices[0].tolist() == [0, 1, 2, 3, 4, 5, 8, 10, 14, 16, 18, 19]


@pytest.mark.parametrize("t,k", [(4, 8), (4, 20), (8, 8), (8, 13), (8, 30), (9, 40), (9, 72), (6, 6)])
def test_dycoke_equals_slow_reference(t, k):
    h, w = 2, 3
    g = torch.Generator().manual_seed(t * 100 + k)
    x = torch.randn(3, t * h * w, 16, generator=g)
    x[1] = synthetic_clip(t, h * w, 16, k, {f: [f % 6] for f in range(1, t)})
    keep = DyCoke().select(TokenSet.from_features(x, grid=(t, h, w)), k)
    for b in range(3):
        assert keep.indices[b].tolist() == dycoke_reference(x[b], t, h, w, k), f"row {b} differs from the reference"


def test_dycoke_refuses_a_budget_below_one_frame():
    with pytest.raises(ValueError, match="first frame of a clip whole .6 tokens"):
        DyCoke().select(TokenSet.from_features(torch.randn(1, 24, 4), grid=(4, 2, 3)), 5)


# --- HoliTom: slow reference -------------------------------------------------------------------------
def holitom_reference(x: torch.Tensor, t: int, h: int, w: int, k: int, tau: float = 0.8, beta: float = 0.6,
                      knn: int = 7) -> tuple[list[int], torch.Tensor, list[int]]:
    """HoliTom before the LLM for one clip ``[N, D]``, token by token: kept positions, their features and
    each token's slot. The segmentation is searched over every way to cut the frames (the inputs here have
    one best way, or nothing to save, where the finest cut is what the recursion keeps)."""
    p, n, dim = h * w, t * h * w, x.shape[1]
    sim = [[cosine(x[f * p + q], x[(f + 1) * p + q]) for q in range(p)] for f in range(t - 1)]

    def static_places(s, e):
        return [q for q in range(p) if all(sim[f][q] > tau for f in range(s, e))]

    best = None
    for cuts in itertools.product([False, True], repeat=t - 1):
        starts = [0] + [f + 1 for f in range(t - 1) if cuts[f]]
        segs = [(s, e - 1) for s, e in zip(starts, starts[1:] + [t])]
        key = (sum(len(static_places(s, e)) * (e - s) for s, e in segs), len(segs))
        if best is None or key > best[0]:
            best = (key, segs)
    segments = best[1]
    # temporal: most redundant places first, as far as the budget asks
    candidates = sorted((-min(sim[f][q] for f in range(s, e)), s, q, e)
                        for s, e in segments if e > s for q in static_places(s, e))
    rep, feat, merged = list(range(n)), {i: x[i].clone() for i in range(n)}, {}
    need = n - k
    for _, s, q, e in candidates:
        if need == 0:
            break
        last, first = min(e, s + need), s * p + q
        for f in range(s + 1, last + 1):
            rep[f * p + q] = first
        feat[first] = torch.stack([x[f * p + q] for f in range(s, last + 1)]).mean(0)
        merged[first] = last
        need -= last - s
    alive = sorted(set(rep))
    groups = []
    for s, e in segments:
        groups.append([i for i in alive if i in merged and s * p <= i < (s + 1) * p])
        groups += [[i for i in alive if i not in merged and f * p <= i < (f + 1) * p] for f in range(s, e + 1)]
    groups = [g for g in groups if g]
    # spatial: Hamilton's largest remainders, then DPC-kNN per group
    quotas = [Fraction(len(g) * k, len(alive)) for g in groups]
    counts = [math.floor(q) for q in quotas]
    for g in sorted(range(len(groups)), key=lambda g: (-(quotas[g] - counts[g]), g))[:k - sum(counts)]:
        counts[g] += 1
    final = {i: i for i in alive}
    for group, count in zip(groups, counts):
        if count == len(group):
            continue
        if count == 0:
            final.update({i: None for i in group})
            continue
        size = len(group)
        d = [[float(((feat[a] - feat[b]) ** 2).sum().sqrt()) / math.sqrt(dim) for b in group] for a in group]
        neighbours = min(knn, count)
        density = [math.exp(-sum(v * v for v in sorted(row)[:neighbours]) / neighbours) for row in d]
        top = max(max(row) for row in d)
        to_denser = [min([d[i][j] for j in range(size) if density[j] > density[i]], default=top) for i in range(size)]
        centres = sorted(sorted(range(size), key=lambda i: (-to_denser[i] * density[i], i))[:count])
        members = {c: [] for c in centres}
        for i in range(size):
            if i not in members:
                members[min(centres, key=lambda c: (d[i][c], c))].append(i)
        for c, joined in members.items():
            final.update({group[i]: group[c] for i in joined + [c]})
            if joined:
                mean = torch.stack([feat[group[i]] for i in joined]).mean(0)
                feat[group[c]] = beta * feat[group[c]] + (1 - beta) * mean
    ends = [final[rep[i]] for i in range(n)]
    kept = sorted({e for e in ends if e is not None})
    return kept, torch.stack([feat[i] for i in kept]), [-1 if e is None else kept.index(e) for e in ends]


def scene_clip(seed: int) -> torch.Tensor:
    """6 frames of 2 x 3 places: scene A in frames 0-2 (place 5 new in frames 1 and 2), a cut, scene B
    static in frames 3-5."""
    return synthetic_clip(6, 6, 8, seed, {1: [5], 2: [5], 4: [], 5: []})


def test_holitom_merges_each_scene_over_its_frames():
    keep = HoliTom().select(TokenSet.from_features(scene_clip(0)[None], grid=(6, 2, 3)), 14)
    # scene A: places 0-4 once (at frame 0), place 5 in frames 0, 1, 2; scene B: every place once, at frame 3
    assert keep.indices[0].tolist() == [0, 1, 2, 3, 4, 5, 11, 17, 18, 19, 20, 21, 22, 23]
    x = scene_clip(0)
    torch.testing.assert_close(keep.features[0, 0], x[[0, 6, 12]].mean(0), atol=1e-6, rtol=0)
    assert keep.assign[0, 30].item() == 8 and keep.assign[0, 29].item() == 13  # frames 5 and 4 -> frame 3


@pytest.mark.parametrize("k", [36, 30, 25, 14, 9, 5, 3, 1])
def test_holitom_equals_slow_reference(k):
    g = torch.Generator().manual_seed(k)
    x = torch.stack([scene_clip(k), torch.randn(36, 8, generator=g),
                     synthetic_clip(6, 6, 8, k + 50, {f: [f] for f in range(1, 6)})])
    keep = HoliTom().select(TokenSet.from_features(x, grid=(6, 2, 3)), k)
    for b in range(3):
        kept, features, assign = holitom_reference(x[b], 6, 2, 3, k)
        assert keep.indices[b].tolist() == kept, f"row {b}: kept positions differ from the reference"
        assert keep.assign[b].tolist() == assign, f"row {b}: assignment differs from the reference"
        torch.testing.assert_close(keep.features[b], features, atol=1e-5, rtol=0)


def test_holitom_keep_all_changes_nothing():
    x = scene_clip(3)[None]
    keep = HoliTom().select(TokenSet.from_features(x, grid=(6, 2, 3)), 36)
    assert keep.indices[0].tolist() == list(range(36)) and torch.equal(keep.features, x)


# --- through tiny Qwen2-VL and Qwen2.5-VL on clips -------------------------------------------------------
CLIP = [20, ("video", 4, 4, 8), 30, 31]  # 4 frames of 2 x 4 tokens: 32 tokens


@pytest.mark.parametrize("version", VERSIONS + ["3"])
@pytest.mark.parametrize("method", ["dycoke", "holitom"])
def test_language_model_receives_the_budget_and_the_reference_selection(version, method):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL (which writes each frame as its own run, after a timestamp)."""
    model = tiny_qwen3_vl() if version == "3" else tiny_qwen(version)
    batch = (qwen3_batch if version == "3" else qwen_batch)([CLIP], seed=5)
    with torch.no_grad():
        features = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"],
                                                  return_dict=True).pooler_output[0]
    with vtoken.wrapped(model, method, keep=12), torch.no_grad():
        seen, handle = lm_inputs(model)
        model(**batch)
        handle.remove()
        kept = model.vtoken.stats.kept["projector"][0].tolist()
    text = int(((batch["input_ids"] != Q_VIDEO) & batch["attention_mask"].bool()).sum())
    assert seen[0]["attention_mask"].sum().item() == text + 12, "the language model must see exactly 12 clip tokens"
    reference = (dycoke_reference(features.float(), 4, 2, 4, 12) if method == "dycoke"
                 else holitom_reference(features.float(), 4, 2, 4, 12)[0])
    assert kept == reference, f"{method} through the model kept {kept}, the reference {reference}"


@pytest.mark.parametrize("method", ["dycoke", "holitom"])
def test_refused_on_images_and_on_frame_units(method):
    model = tiny_qwen("2")
    with vtoken.wrapped(model, method, keep=4), pytest.raises(ValueError, match="an image's or a single frame's"):
        model(**qwen_batch([[20, ("image", 4, 8), 30]]))
    with vtoken.wrapped(model, method, keep=4, video_budget="frame"), pytest.raises(ValueError, match="no layout"):
        model(**qwen_batch([CLIP]))
    with pytest.raises(ValueError, match=f"{method} at projector needs the tokens on their full grid"):
        vtoken.wrap(model, vtoken.Pipeline([vtoken.stages.ClsAttn(site="vision(1)", keep=16),
                                            DyCoke() if method == "dycoke" else HoliTom()]), keep=8)
    assert not hasattr(model, "vtoken") or model.vtoken is None


# --- the contract clauses on clips (contract_models.QWEN2_VIDEO_CASES) -------------------------------------
VIDEO_STAGES = [pytest.param(case, stage, id=f"{case.name}-{stage.id}") for case in QWEN2_VIDEO_CASES
                for stage in case.stages]


@pytest.mark.parametrize("case,stage", VIDEO_STAGES)
def test_video_contract(case, stage):
    """Keep-all equals the unwrapped logits (eager and sdpa), unwrap restores, cached generation equals
    recomputation, a padded batch of clips equals each clip alone, threads, deepcopy and pickle."""
    contract.run_clauses_without_labels(case, stage)
