"""HoliTom's merging before the LLM: segment the clip where frames change, merge what stays the same
within a segment into one token, then cluster each frame's (and segment's) tokens spatially.

Paper: Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (NeurIPS 2025);
the authors' public code (cokeshao/HoliTom, ``holitom/llava_arch.py``) is the reference for the procedure.

Inputs: a video clip's tokens at the projector with their (t, h, w) layout (``TokenSet.layout``).
1. Similarity: each token's cosine similarity with the token at the same (row, column) of the next frame;
   a place is static between two frames when it exceeds ``tau`` (0.8, the authors').
2. Global redundancy-aware segmentation: the frames are split into segments of consecutive frames by
   dynamic programming, maximising the tokens the temporal merge saves over the whole clip: a segment of
   frames s..e saves (e - s) tokens for every place static across all of it (the authors' objective and
   recursion, ties keep the shorter segment; ``max_segment`` bounds a segment's length, unbounded by
   default as the authors' 1024 is for their 32-64 frames).
3. Temporal merge: within a segment, the tokens of a place static across all its frames become one token,
   their mean, at the segment's first frame's position.
4. Spatial merge: what is left is grouped as the authors group it (per segment its merged static tokens,
   and per frame its other, dynamic tokens) and each group is clustered by DPC-kNN: density from the
   ``knn`` (7, the authors') nearest neighbours, distance to the nearest denser token, centres = the
   highest density x distance; every other token joins its nearest centre, whose token becomes
   ``beta * centre + (1 - beta) * mean(members)`` (``beta`` 0.6: the authors' code default).

Where vtoken differs, and why:
- Exact budget. The authors merge every static place, then keep a rounded ratio of each group. Here the
  budget ``k`` (per clip) is met exactly: static places are merged, most redundant first (highest minimum
  similarity), only as far as the budget asks (the last one over fewer frames if need be, so keep-all
  merges nothing), and the spatial merge shares the rest out over the groups in proportion to their sizes
  (largest remainders, earlier groups first on ties); a group whose share is 0 is dropped.
- No dominant tokens: the authors' code can keep a share ``D`` of each frame by [CLS] attention before
  clustering; its default is D = 0, which is what is built (no attention signal is needed).
- Deterministic: the authors add random noise of 1e-6 to the densities to break ties; here ties go to the
  lower position (centres) and the earlier centre (members).
- HoliTom's merging inside the LLM is not this stage.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from ..registry import register_stage
from ..tokens import Keep, TokenSet, require_clip, sorted_topk
from .base import Stage, check_count, check_in_range, option


@register_stage("holitom")
class HoliTom(Stage):
    tau: float = option(0.8, "cosine similarity above which a place is static between consecutive frames (0.8, the "
                             "authors')")
    beta: float = option(0.6, "weight of a cluster's centre in its merged token")
    knn: int = option(7, "neighbours of the DPC-kNN density estimate")
    max_segment: int | None = option(None, "most frames in a segment (None: any)")

    merging: ClassVar[bool] = True
    #: the whole clip, every frame on its (h, w) grid: wrap refuses it after a stage that selects a subset
    needs_grid: ClassVar[bool] = True
    #: video clips only (refused on images at call time): image-only callers such as the demo can skip it
    needs_clip: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_range(self, "tau", -1.0, 1.0, "a cosine similarity")
        check_in_range(self, "beta", 0.0, 1.0)
        check_count(self, "knn", 1)
        check_count(self, "max_segment", 2, "frames", allow_none=True)

    def select(self, tokens: TokenSet, k: int) -> Keep:
        t, h, w = require_clip(tokens, "holitom")
        rows = [self.merge_row(tokens.features[b].float(), t, h * w, k) for b in range(tokens.batch_size)]
        return Keep(indices=torch.stack([r[0] for r in rows]),
                    features=torch.stack([r[1] for r in rows]).to(tokens.features.dtype),
                    assign=torch.stack([r[2] for r in rows]))

    def merge_row(self, x: Tensor, t: int, per_frame: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """One clip ``[N, D]`` -> kept positions ``[k]``, their features ``[k, D]``, assignment ``[N]``."""
        n = x.shape[0]
        frames = x.reshape(t, per_frame, -1)
        similarity = torch.cosine_similarity(frames[:-1], frames[1:], dim=-1)  # [t - 1, P]
        static = similarity > self.tau
        segments = segment_frames(static, self.max_segment)
        owner, ends = temporal_merge(similarity, static, segments, per_frame, n - k)
        features = x.clone()
        for first, last in ends.items():  # a merged place: the mean of its frames, at the first one
            features[first] = x[first:last * per_frame + first % per_frame + 1:per_frame].mean(0)
        alive = owner == torch.arange(n, device=x.device)
        groups = spatial_groups(segments, ends, alive, per_frame)
        final = torch.arange(n, device=x.device)  # each survivor's final representative
        counts = shares([len(g) for g in groups], k)
        for group, count in zip(groups, counts):
            if count == len(group):
                continue
            members = torch.tensor(group, device=x.device)
            if count == 0:
                final[members] = -1
                continue
            centre_of, merged = dpc_knn_merge(features[members], count, min(self.knn, count), self.beta)
            centres = members[centre_of]
            final[members] = centres
            features[centres.unique()] = merged
        final = final[owner]  # a token merged over time goes where its first frame's token went
        kept = final[final >= 0].unique()
        slot = torch.full((n,), -1, dtype=torch.long, device=x.device)
        slot[kept] = torch.arange(kept.numel(), device=x.device)
        assign = torch.where(final >= 0, slot[final.clamp(min=0)], -1)
        return kept, features[kept], assign


def segment_frames(static: Tensor, max_segment: int | None) -> list[tuple[int, int]]:
    """HoliTom's segmentation: the split of frames 0..t-1 into runs (first, last) that maximises the
    tokens saved, a run of frames s..e saving (e - s) per place static across all of it."""
    t = static.shape[0] + 1
    longest = t if max_segment is None else max_segment
    saved = [[0] * t for _ in range(t)]
    for s in range(t - 1):
        runs = torch.cumprod(static[s:].int(), dim=0).sum(-1).tolist()  # places static from s through s+1+i
        for i, places in enumerate(runs):
            saved[s][s + 1 + i] = places * (i + 1)
    best = [0] * t
    start = [0] * t
    for i in range(t):
        best[i] = best[i - 1] if i else 0
        start[i] = i
        for length in range(2, min(i + 1, longest) + 1):
            j = i - length
            value = (best[j] if j >= 0 else 0) + saved[j + 1][i]
            if value > best[i]:
                best[i], start[i] = value, j + 1
    segments = []
    i = t - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    return segments[::-1]


def temporal_merge(similarity: Tensor, static: Tensor, segments: list[tuple[int, int]], per_frame: int,
                   budget: int) -> tuple[Tensor, dict[int, int]]:
    """Merge static places, most redundant first, saving at most ``budget`` tokens. Returns each token's
    representative (original index) and, per merged place, its first index -> last frame merged."""
    candidates = []
    for s, e in segments:
        if e == s:
            continue
        redundancy = similarity[s:e].min(0).values
        for place in static[s:e].all(0).nonzero()[:, 0].tolist():
            candidates.append((-float(redundancy[place]), s, place, e))
    candidates.sort()
    owner = torch.arange(similarity.shape[1] * (similarity.shape[0] + 1), device=similarity.device)
    ends: dict[int, int] = {}
    for _, s, place, e in candidates:
        if budget == 0:
            break
        last = min(e, s + budget)
        first = s * per_frame + place
        owner[first + per_frame:last * per_frame + place + 1:per_frame] = first
        ends[first] = last
        budget -= last - s
    return owner, ends


def spatial_groups(segments: list[tuple[int, int]], ends: dict[int, int], alive: Tensor,
                   per_frame: int) -> list[list[int]]:
    """The authors' groups of what the temporal merge left: per segment, its merged tokens, then each of
    its frames' other tokens; each group in position order."""
    left = [bool(a) for a in alive.tolist()]
    groups = []
    for s, e in segments:
        merged = sorted(first for first in ends if first // per_frame == s)
        if merged:
            groups.append(merged)
        for frame in range(s, e + 1):
            rest = [i for i in range(frame * per_frame, (frame + 1) * per_frame) if left[i] and i not in ends]
            if rest:
                groups.append(rest)
    return groups


def shares(sizes: list[int], k: int) -> list[int]:
    """``k`` shared out in proportion to ``sizes`` by largest remainders (earlier groups first on ties)."""
    total = sum(sizes)
    if k >= total:
        return list(sizes)
    base = [size * k // total for size in sizes]
    order = sorted(range(len(sizes)), key=lambda g: (-(sizes[g] * k % total), g))
    for g in order[:k - sum(base)]:
        base[g] += 1
    return base


def dpc_knn_merge(x: Tensor, count: int, neighbours: int, beta: float) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of ``x`` ``[n, D]`` into ``count`` clusters. Returns each token's centre
    (position into ``x``) and the merged token of each centre, in ascending centre order."""
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(x.shape[-1])
    nearest = dist.topk(neighbours, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    to_denser = torch.where(denser, dist, dist.max()).min(-1).values
    centres = sorted_topk(to_denser * density, count)
    cluster = dist[:, centres].argmin(-1)
    cluster[centres] = torch.arange(count, device=x.device)
    others = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    others[centres] = False  # a cluster's members, its centre left out
    target = cluster[others]
    joined = x.new_zeros(count).index_add_(0, target, x.new_ones(target.shape[0]))
    sums = x.new_zeros(count, x.shape[1]).index_add_(0, target, x[others])
    mean = sums / joined.clamp(min=1)[:, None]
    merged = torch.where(joined[:, None] > 0, beta * x[centres] + (1 - beta) * mean, x[centres])
    return centres[cluster], merged
