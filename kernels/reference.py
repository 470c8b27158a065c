"""Torch reference implementations of the scoring ops: plain, obviously correct, any device.

They define the semantics the Triton kernels must reproduce (within dtype tolerance; k-center
indices exactly on inputs without near-ties).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: norms below this are treated as this (cosine of a zero vector is 0, never NaN)
COSINE_EPS = 1e-6
#: distances per block of ``nearest_neighbour_distance``: 4 Mi float32, 16 MiB
NEAREST_BLOCK_ELEMENTS = 1 << 22
#: block rows of ``nearest_neighbour_distance`` come in multiples of this, whatever N
MIN_BLOCK_ROWS = 64


def attention_rows(q: Tensor, k: Tensor, *, scale: float | None = None, key_mask: Tensor | None = None,
                   causal_limit: Tensor | None = None) -> Tensor:
    """Mean over query heads of softmax(q k^T * scale), for a few query rows: ``[B, Q, N]`` float32.

    q ``[B, Hq, Q, d]``; k ``[B, Hk, N, d]`` with Hq a multiple of Hk (grouped-query heads);
    key_mask ``[B, N]`` bool, True = may be attended; causal_limit ``[B, Q]``: row q attends key j only
    if j <= causal_limit[b, q]. Disallowed keys get exactly 0; a row with no allowed key is all 0.
    """
    batch, heads, rows, dim = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    scale = dim ** -0.5 if scale is None else scale
    keys = k.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("bhqd,bhnd->bhqn", q.float(), keys) * scale
    allowed = torch.ones(batch, rows, n, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        allowed &= key_mask.bool()[:, None, :]
    if causal_limit is not None:
        allowed &= torch.arange(n, device=q.device)[None, None, :] <= causal_limit[:, :, None]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row gives NaN: make it 0
    return probs.mean(dim=1)


#: query rows per block of ``attention_received``: the reference holds [B, H, rows, N] at a time
RECEIVED_QUERY_BLOCK = 256


def attention_received(q: Tensor, k: Tensor, *, scale: float | None = None,
                       key_mask: Tensor | None = None) -> Tensor:
    """The attention each key receives, mean over query heads and query rows: ``[B, N]`` float32,
    i.e. the column means of the head-averaged map softmax(q k^T * scale) of ``[B, Q, N]``.

    q ``[B, Hq, Q, d]``; k ``[B, Hk, N, d]`` (Hq a multiple of Hk); key_mask ``[B, N]`` as in
    ``attention_rows``. Every query row counts in the mean (a row with no allowed key adds 0). The map
    is never built: ``RECEIVED_QUERY_BLOCK`` query rows at a time, so memory grows as N, not N x N.
    """
    batch, rows = q.shape[0], q.shape[2]
    total = torch.zeros(batch, k.shape[2], dtype=torch.float32, device=q.device)
    for start in range(0, rows, RECEIVED_QUERY_BLOCK):
        block = q[:, :, start:start + RECEIVED_QUERY_BLOCK]
        total += attention_rows(block, k, scale=scale, key_mask=key_mask).sum(dim=1)
    return total / max(rows, 1)


def cosine_to_pivots(x: Tensor, pivots: Tensor) -> Tensor:
    """Cosine similarity of every token to every pivot: x ``[B, N, D]``, pivots ``[B, P, D]`` ->
    ``[B, P, N]`` float32: x.p / (max(||x||, COSINE_EPS) * max(||p||, COSINE_EPS)), i.e.
    ``torch.nn.functional.cosine_similarity`` with eps=COSINE_EPS (each norm clamped on its own, so a
    zero vector has cosine 0 with everything)."""
    xn = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    pn = pivots.float() / pivots.float().norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    return pn @ xn.transpose(1, 2)


def normalize(x: Tensor) -> Tensor:
    """Unit-norm rows in float32 (the k-center distance is 1 - cosine)."""
    return x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def nearest_neighbour_distance(xn: Tensor, valid: Tensor | None = None, *,
                               block_rows: int | None = None) -> Tensor:
    """For unit rows ``[B, N, D]``: each token's distance (1 - cosine) to its nearest other valid token.
    Invalid tokens get -inf (never picked first).

    Memory grows as N, never as N x N: the distances are computed ``block_rows`` tokens at a time against
    all N, keeping only each row's minimum. Every block has the same number of rows (the last one ends at
    row N and overlaps its predecessor), so each is the same matrix product: no small remainder product,
    which BLAS may sum in another order. Default: the multiple of ``MIN_BLOCK_ROWS`` rows that keeps a
    block within ``NEAREST_BLOCK_ELEMENTS`` distances, at least ``MIN_BLOCK_ROWS``; a batch of one image
    of up to 2,048 tokens is one block, the full N x N product, as a 576-token image always is."""
    batch, n, _ = xn.shape
    if block_rows is None:
        fit = NEAREST_BLOCK_ELEMENTS // max(1, batch * n)
        block_rows = max(MIN_BLOCK_ROWS, fit // MIN_BLOCK_ROWS * MIN_BLOCK_ROWS)
    if block_rows < 16:  # products of a few rows take BLAS's matrix-vector paths, summed in another order
        raise ValueError(f"block_rows must be >= 16; got {block_rows}")
    nearest = xn.new_empty(batch, n)
    for start, rows, distance in _distance_blocks(xn, valid, max(1, min(block_rows, n))):
        nearest[:, start:start + rows] = distance.min(dim=-1).values
    return _nearest_as_scores(nearest, valid)


def _distance_blocks(xn: Tensor, valid: Tensor | None, rows: int):
    """Yield ``(start, rows, distances [B, rows, N])`` over the row blocks of the N x N distances, a token's
    distance to itself and to invalid tokens +inf. Every block reuses one buffer (no allocator churn)."""
    batch, n, _ = xn.shape
    xn = xn.detach()  # distances only rank tokens; out= products need tensors without autograd history
    keys = xn.transpose(1, 2)
    others = None if valid is None else ~valid.bool()[:, None, :]  # [B, 1, N]: True = not a neighbour
    distance = xn.new_empty(batch, rows, n)
    for block in range(0, n, rows):
        start = min(block, n - rows)  # the last block ends at row N
        torch.matmul(xn[:, start:start + rows], keys, out=distance)
        distance.neg_().add_(1.0)  # 1 - cosine, the same rounding as 1.0 - product
        distance.diagonal(offset=start, dim1=1, dim2=2).fill_(float("inf"))  # a token is not its own neighbour
        if others is not None:
            distance.masked_fill_(others, float("inf"))
        yield start, rows, distance


def _nearest_as_scores(nearest: Tensor, valid: Tensor | None) -> Tensor:
    nearest = nearest.masked_fill(torch.isinf(nearest), 0.0)  # a lone valid token has no neighbour
    if valid is not None:
        nearest = nearest.masked_fill(~valid, float("-inf"))
    return nearest


def kcenter_step(xn: Tensor, min_dist: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
    """One greedy k-center step: lower each token's min distance with the distance to the token just
    selected (``last`` ``[B]``), then return it and the next pick (argmax; -inf entries never win)."""
    chosen = xn.gather(1, last.view(-1, 1, 1).expand(-1, 1, xn.shape[-1]))  # [B, 1, D]
    distance = 1.0 - (xn @ chosen.transpose(1, 2))[..., 0]
    min_dist = torch.minimum(min_dist, distance)
    return min_dist, min_dist.argmax(dim=-1)


def check_kcenter_k(k: int, n: int, valid: Tensor | None) -> None:
    """Raise ValueError unless 0 <= k <= the valid token count of every batch row."""
    available = n if valid is None or valid.shape[0] == 0 else int(valid.sum(1).min())
    if not 0 <= k <= available:
        raise ValueError(f"kcenter cannot select {k} tokens from {available} valid ones")


def kcenter_select(x: Tensor, k: int, *, valid: Tensor | None = None) -> Tensor:
    """Greedy max-min (k-center) selection on cosine distance, DivPrune's procedure: ``[B, k]`` indices
    in selection order. First the token whose nearest neighbour is farthest, then repeatedly the token
    farthest from the selected set. Selected and invalid tokens are never picked (exact duplicates
    exist); ties go to the lower index."""
    batch, n, _ = x.shape
    check_kcenter_k(k, n, valid)
    if k == 0:
        return torch.empty(batch, 0, dtype=torch.long, device=x.device)
    xn = normalize(x)
    rows = torch.arange(batch, device=x.device)
    if n <= xn.shape[-1]:
        # The N x N distances take no more memory than the features: compute them once, in one product,
        # and each step reads one row of N instead of streaming all N x D features again (for 2,304
        # units of 5,120 features and 575 steps, 27 GB of reads).
        _, _, matrix = next(_distance_blocks(xn, valid, n))
        first = _nearest_as_scores(matrix.min(dim=-1).values, valid).argmax(dim=-1)

        def lowered(min_dist: Tensor, last: Tensor) -> Tensor:
            # +inf at the pick itself and at invalid tokens: both are blocked from then on anyway
            return torch.minimum(min_dist, matrix[rows, last])
    else:
        first = nearest_neighbour_distance(xn, valid).argmax(dim=-1)

        def lowered(min_dist: Tensor, last: Tensor) -> Tensor:
            return kcenter_step(xn, min_dist, last)[0]
    picks = [first]
    blocked = torch.zeros(batch, n, dtype=torch.bool, device=x.device) if valid is None else ~valid
    blocked[rows, first] = True
    min_dist = torch.full((batch, n), float("inf"), device=x.device)
    last = first
    for _ in range(k - 1):
        min_dist = lowered(min_dist, last)
        last = min_dist.masked_fill(blocked, float("-inf")).argmax(dim=-1)
        blocked[rows, last] = True
        picks.append(last)
    return torch.stack(picks, dim=1)
