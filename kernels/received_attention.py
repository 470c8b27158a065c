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

from .attention import LOG2E, _allowed_keys, _attention_stats_kernel, _tile_scores


@triton.jit
def _received_kernel(
        q_ptr, k_ptr, mask_ptr, max_ptr, sum_ptr, out_ptr,
        heads, rows, n, dim, group, qk_scale,
        stride_qb, stride_qh, stride_qq, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_mb, stride_mn, stride_lb, stride_lq,
        HAS_MASK: tl.constexpr, HAS_LIMIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2, one program per (batch, query head, key tile): column sums of the head's probabilities."""
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
                                mask_ptr, stride_lb, stride_lq, HAS_MASK, HAS_LIMIT)
        allowed = allowed & (offs_q[:, None] < rows)
        stat = (b * heads + h) * rows + offs_q
        row_max = tl.load(max_ptr + stat, mask=offs_q < rows, other=0.0)
        row_sum = tl.load(sum_ptr + stat, mask=offs_q < rows, other=0.0)
        # a row without any allowed key (sum 0, max -inf) gets neutral statistics: its terms stay 0, not NaN
        has_keys = row_sum > 0
        row_max = tl.where(has_keys, row_max, 0.0)
        inv_sum = 1.0 / tl.where(has_keys, row_sum, 1.0)
        probs = tl.exp2(tl.where(allowed, s - row_max[:, None], -float("inf"))) * inv_sum[:, None]
        column += tl.sum(probs, axis=0)
    out = out_ptr + (b * heads + h) * n + offs_n
    tl.store(out, column, mask=offs_n < n)


def attention_received_triton(q: Tensor, k: Tensor, *, scale: float | None = None,
                              key_mask: Tensor | None = None, block_n: int | None = None) -> Tensor:
    """Launch both passes. Same contract as ``reference.attention_received``; ``block_n`` (a power of
    two >= 16) overrides the key tile size, for tests."""
    batch, heads, rows, dim = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    if q.dtype != k.dtype:  # one operand type for the dot
        q, k = q.float(), k.float()
    # as in attention_rows_triton: the interpreter needs float32 operands for bf16 dots
    upcast = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)
    scale = dim ** -0.5 if scale is None else scale
    if batch * n == 0 or rows == 0:
        return torch.zeros(batch, n, dtype=torch.float32, device=q.device)
    per_head = torch.empty(batch, heads, n, dtype=torch.float32, device=q.device)
    row_max = torch.empty(batch * heads * rows, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    mask = key_mask.to(device=q.device, dtype=torch.int8) if key_mask is not None else per_head
    block_q = min(32, max(16, triton.next_power_of_2(rows)))  # attention_rows' tiles: no register spills
    block_n = block_n or 64
    common = {
        "heads": heads, "rows": rows, "n": n, "dim": dim, "group": heads // kv_heads,
        "qk_scale": float(scale) * LOG2E,
        **{f"stride_q{axis}": q.stride(i) for i, axis in enumerate("bhqd")},
        **{f"stride_k{axis}": k.stride(i) for i, axis in enumerate("bhnd")},
        "stride_mb": mask.stride(0) if key_mask is not None else 0,
        "stride_mn": mask.stride(1) if key_mask is not None else 0,
        "stride_lb": 0, "stride_lq": 0,
        "HAS_MASK": key_mask is not None, "HAS_LIMIT": False,
        "UPCAST": upcast, "DOT_PRECISION": "ieee" if upcast else "tf32",
        "BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_D": max(16, triton.next_power_of_2(dim)),
        "num_warps": 8,
    }
    _attention_stats_kernel[(batch * heads, math.ceil(rows / block_q))](
        q, k, mask, mask, row_max, row_sum, **common)
    _received_kernel[(batch * heads, math.ceil(n / block_n))](q, k, mask, row_max, row_sum, per_head, **common)
    return per_head.sum(dim=1) / (heads * rows)
