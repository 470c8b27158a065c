"""Triton kernel: the attention each token receives, mean over query heads and query rows, ``[B, N]``.

The importance score of towers without a [CLS] token (SigLIP, InternViT): the column means of the
head-averaged attention map, computed without the N x N map. Pass 1 is ``attention_rows``' statistics
pass (each query row's softmax max and sum, online over key tiles). Pass 2 runs one program per
(batch, query head, key tile): it walks the query rows tile by tile, turns each tile's scores into
probabilities with the pass-1 statistics and adds their column sums into a ``[BLOCK_N]`` accumulator,
so each program writes its key tile once and no two programs write the same place (no atomics: the
result is the same from run to run). The per-head sums ``[B, H, N]`` are averaged on the host.
Semantics: ``reference.attention_received``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attention import _allowed_keys, _attention_stats_kernel, _probabilities, _tile_scores, launch_setup


@triton.jit
def _received_kernel(
        q_ptr, k_ptr, mask_ptr, max_ptr, sum_ptr, out_ptr,
        heads, rows, n, dim, group, qk_scale,
        stride_qb, stride_qh, stride_qq, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_mb, stride_mn, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2, one program per (batch, query head, key tile): column sums of the head's probabilities.
    Every query row is a question here, so there is no causal limit."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % heads
    b = pid // heads
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    column = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_start in range(0, rows, BLOCK_Q):
        offs_q = row_start + tl.arange(0, BLOCK_Q)
        s = _tile_scores(q_ptr, k_ptr, b, h, h // group, offs_q, offs_n, rows, n, dim, qk_scale,
                         stride_qb, stride_qh, stride_qq, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         UPCAST, DOT_PRECISION, BLOCK_D)
        # padding rows (offs_q >= rows) are disallowed here, so they add nothing to the column sums
        allowed = _allowed_keys(b, offs_q, offs_n, rows, n, mask_ptr, stride_mb, stride_mn,
                                mask_ptr, 0, 0, HAS_MASK, False)
        allowed = allowed & (offs_q[:, None] < rows)
        probs = _probabilities(s, allowed, max_ptr, sum_ptr, (b * heads + h) * rows + offs_q, offs_q < rows)
        column += tl.sum(probs, axis=0)
    out = out_ptr + (b * heads + h) * n + offs_n
    tl.store(out, column, mask=offs_n < n)


def attention_received_triton(q: Tensor, k: Tensor, *, scale: float | None = None,
                              key_mask: Tensor | None = None, block_n: int | None = None) -> Tensor:
    """Launch both passes. Same contract as ``reference.attention_received``; ``block_n`` (a power of
    two >= 16) overrides the key tile size, for tests."""
    q, k, mask, _, common = launch_setup(q, k, scale, key_mask, None, block_n)
    batch, heads, rows = q.shape[:3]
    n = k.shape[2]
    if batch * n == 0 or rows == 0:
        return torch.zeros(batch, n, dtype=torch.float32, device=q.device)
    per_head = torch.empty(batch, heads, n, dtype=torch.float32, device=q.device)
    row_max = torch.empty(batch * heads * rows, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    block_q, block_n = common["BLOCK_Q"], common["BLOCK_N"]
    _attention_stats_kernel[(batch * heads, math.ceil(rows / block_q))](
        q, k, mask, mask, row_max, row_sum, **common)
    unlimited = {key: value for key, value in common.items() if key not in ("stride_lb", "stride_lq", "HAS_LIMIT")}
    _received_kernel[(batch * heads, math.ceil(n / block_n))](q, k, mask, row_max, row_sum, per_head, **unlimited)
    return per_head.sum(dim=1) / (heads * rows)
