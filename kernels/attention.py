"""Triton kernel: head-averaged softmax attention for a few query rows, ``[B, Q, N]`` float32.

Two passes over the keys, so neither an N x N map nor a ``[B, H, Q, N]`` probability tensor is ever
held: pass 1 keeps, per (batch, query head, row), a running max and a running sum of exponentials
(online softmax) and writes just those two numbers; pass 2 recomputes each key tile's scores, turns
them into probabilities with those statistics and sums them over the heads straight into the output.

Query rows are handled in tiles of 16 to 32 (16 is the smallest tl.dot), so the scores of a tile are one
tensor-core product whatever Q is: a single [CLS] row wastes idle MMA lanes, which are cheap, while a
chunk of hundreds of rows (every query of a vision tower) reads each key tile once per row tile rather
than once per row. fp16/bf16 operands go into the dot as they are (their products are exact in the fp32
accumulator); fp32 operands use the full-precision "ieee" dot, not TF32.
Semantics: ``reference.attention_rows``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the cheap instruction on GPUs


@triton.jit
def _tile_scores(q_ptr, k_ptr, b, h, kh, offs_q, offs_n, rows, n, dim, qk_scale,
                 stride_qb, stride_qh, stride_qq, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores ``[BLOCK_Q, BLOCK_N]`` of query head ``h`` against key head ``kh``, times scale * log2 e."""
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qq
    q = tl.load(q_rows + offs_d[None, :] * stride_qd,
                mask=(offs_q[:, None] < rows) & (offs_d[None, :] < dim), other=0.0)
    k_rows = k_ptr + b * stride_kb + kh * stride_kh + offs_n[:, None] * stride_kn
    k = tl.load(k_rows + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < n) & (offs_d[None, :] < dim), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale


@triton.jit
def _allowed_keys(b, offs_q, offs_n, rows, n, mask_ptr, stride_mb, stride_mn, limit_ptr, stride_lb, stride_lq,
                  HAS_MASK: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """``[BLOCK_Q, BLOCK_N]``: may query row offs_q attend key offs_n (out-of-range keys never)."""
    allowed = (offs_q[:, None] >= 0) & (offs_n[None, :] < n)  # `offs_q >= 0` only broadcasts to the tile
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * stride_mb + offs_n * stride_mn, mask=offs_n < n, other=0)
        allowed = allowed & (keep[None, :] != 0)
    if HAS_LIMIT:
        limit = tl.load(limit_ptr + b * stride_lb + offs_q * stride_lq, mask=offs_q < rows, other=-1)
        allowed = allowed & (offs_n[None, :] <= limit[:, None])
    return allowed


@triton.jit
def _attention_stats_kernel(
        q_ptr, k_ptr, mask_ptr, limit_ptr, max_ptr, sum_ptr,
        heads, rows, n, dim, group, qk_scale,
        stride_qb, stride_qh, stride_qq, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_mb, stride_mn, stride_lb, stride_lq,
        HAS_MASK: tl.constexpr, HAS_LIMIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 1, one program per (batch, query head, row tile): each row's softmax max and sum (base 2)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: large batches of keys may pass 2**31
    h = pid % heads
    b = pid // heads
    kh = h // group  # grouped-query attention: `group` query heads share one key head
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    running_max = tl.full([BLOCK_Q], -float("inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = _tile_scores(q_ptr, k_ptr, b, h, kh, offs_q, offs_n, rows, n, dim, qk_scale,
                         stride_qb, stride_qh, stride_qq, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         UPCAST, DOT_PRECISION, BLOCK_D)
        allowed = _allowed_keys(b, offs_q, offs_n, rows, n, mask_ptr, stride_mb, stride_mn,
                                limit_ptr, stride_lb, stride_lq, HAS_MASK, HAS_LIMIT)
        s = tl.where(allowed, s, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        # While every key so far is disallowed the max is -inf; shift by 0 then so that
        # exp2(-inf - shift) is 0 instead of exp2(-inf + inf) = NaN.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(tl.exp2(s - shift[:, None]), axis=1)
        running_max = new_max
    stat = (b * heads + h) * rows + offs_q
    tl.store(max_ptr + stat, running_max, mask=offs_q < rows)
    tl.store(sum_ptr + stat, running_sum, mask=offs_q < rows)


@triton.jit
def _probabilities(s, allowed, max_ptr, sum_ptr, stat, valid_rows):
    """A tile's softmax probabilities from its scores (log2 units) and pass 1's per-row max and sum."""
    row_max = tl.load(max_ptr + stat, mask=valid_rows, other=0.0)
    row_sum = tl.load(sum_ptr + stat, mask=valid_rows, other=0.0)
    # A row without any allowed key has sum 0 and max -inf; neutral statistics keep its terms, all
    # exp2(-inf) = 0, at 0 instead of 0 * (1 / 0) = NaN.
    has_keys = row_sum > 0
    row_max = tl.where(has_keys, row_max, 0.0)
    inv_sum = 1.0 / tl.where(has_keys, row_sum, 1.0)
    # exp2(-inf) = 0 for disallowed keys (masking after exp2 could overflow on their scores first)
    return tl.exp2(tl.where(allowed, s - row_max[:, None], -float("inf"))) * inv_sum[:, None]


@triton.jit
def _attention_rows_kernel(
        q_ptr, k_ptr, mask_ptr, limit_ptr, max_ptr, sum_ptr, out_ptr,
        heads, rows, n, dim, group, qk_scale,
        stride_qb, stride_qh, stride_qq, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_mb, stride_mn, stride_lb, stride_lq, stride_ob, stride_oq, stride_on,
        HAS_MASK: tl.constexpr, HAS_LIMIT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 2, one program per (batch, row tile, key tile): probabilities summed over heads, / heads."""
    b = tl.program_id(0).to(tl.int64)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    allowed = _allowed_keys(b, offs_q, offs_n, rows, n, mask_ptr, stride_mb, stride_mn,
                            limit_ptr, stride_lb, stride_lq, HAS_MASK, HAS_LIMIT)
    total = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    for h in range(heads):
        s = _tile_scores(q_ptr, k_ptr, b, h, h // group, offs_q, offs_n, rows, n, dim, qk_scale,
                         stride_qb, stride_qh, stride_qq, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         UPCAST, DOT_PRECISION, BLOCK_D)
        total += _probabilities(s, allowed, max_ptr, sum_ptr, (b * heads + h) * rows + offs_q, offs_q < rows)
    out = out_ptr + b * stride_ob + offs_q[:, None] * stride_oq + offs_n[None, :] * stride_on
    tl.store(out, total / heads,
             mask=(offs_q[:, None] < rows) & (offs_n[None, :] < n))


def launch_setup(q: Tensor, k: Tensor, scale: float | None, key_mask: Tensor | None, causal_limit: Tensor | None,
                 block_n: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor, dict]:
    """What both attention kernels' launches check and choose: one operand dtype for the dot, the mask and
    limit tensors, and the keyword arguments every pass of either kernel takes."""
    batch, heads, rows, dim = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    if q.dtype != k.dtype:  # one operand type for the dot
        q, k = q.float(), k.float()
    # Triton's interpreter (CPU tensors) multiplies bf16 dot operands as their raw uint16 bits: give it
    # float32 operands instead. Compiled kernels keep the 16-bit operands.
    upcast = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)
    scale = dim ** -0.5 if scale is None else scale
    # Unused pointers still need a tensor argument; the constexpr flags keep them unread.
    mask = key_mask.to(device=q.device, dtype=torch.int8) if key_mask is not None else q
    limit = causal_limit.to(device=q.device, dtype=torch.int64) if causal_limit is not None else q
    # Tiles of up to 32 rows x 64 keys x 128 dims at 8 warps compile without register spills on sm_90
    # for 16-bit and fp32 operands alike (64-row tiles spill in pass 2).
    common = {
        "heads": heads, "rows": rows, "n": n, "dim": dim, "group": heads // kv_heads,
        "qk_scale": float(scale) * LOG2E,
        **{f"stride_q{axis}": q.stride(i) for i, axis in enumerate("bhqd")},
        **{f"stride_k{axis}": k.stride(i) for i, axis in enumerate("bhnd")},
        "stride_mb": mask.stride(0) if key_mask is not None else 0,
        "stride_mn": mask.stride(1) if key_mask is not None else 0,
        "stride_lb": limit.stride(0) if causal_limit is not None else 0,
        "stride_lq": limit.stride(1) if causal_limit is not None else 0,
        "HAS_MASK": key_mask is not None, "HAS_LIMIT": causal_limit is not None,
        # The dot precision only matters for fp32 operands; 16-bit dots ignore it.
        "UPCAST": upcast, "DOT_PRECISION": "ieee" if upcast else "tf32",
        "BLOCK_Q": min(32, max(16, triton.next_power_of_2(rows))), "BLOCK_N": block_n or 64,
        "BLOCK_D": max(16, triton.next_power_of_2(dim)), "num_warps": 8,
    }
    return q, k, mask, limit, common


def attention_rows_triton(q: Tensor, k: Tensor, *, scale: float | None = None, key_mask: Tensor | None = None,
                          causal_limit: Tensor | None = None, block_n: int | None = None) -> Tensor:
    """Launch both passes. Same contract as ``reference.attention_rows``; ``block_n`` (a power of two
    >= 16) overrides the key tile size, for tests."""
    q, k, mask, limit, common = launch_setup(q, k, scale, key_mask, causal_limit, block_n)
    batch, heads, rows = q.shape[:3]
    n = k.shape[2]
    out = torch.empty(batch, rows, n, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    row_max = torch.empty(batch * heads * rows, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    block_q, block_n = common["BLOCK_Q"], common["BLOCK_N"]
    row_tiles = math.ceil(rows / block_q)
    _attention_stats_kernel[(batch * heads, row_tiles)](q, k, mask, limit, row_max, row_sum, **common)
    _attention_rows_kernel[(batch, row_tiles, math.ceil(n / block_n))](
        q, k, mask, limit, row_max, row_sum, out,
        stride_ob=out.stride(0), stride_oq=out.stride(1), stride_on=out.stride(2), **common)
    return out
