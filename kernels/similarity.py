"""Triton kernel: cosine similarity of every token to every pivot, ``[B, P, N]`` float32.

One program per (batch, pivot tile, token tile) walks the feature dimension once, accumulating the dot
products and both sets of squared norms together, so no normalised copy of the tokens is written.
Semantics (each norm clamped below at ``reference.COSINE_EPS``): ``reference.cosine_to_pivots``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import COSINE_EPS


@triton.jit
def _cosine_to_pivots_kernel(
        x_ptr, p_ptr, out_ptr, n, pivots, dim, eps,
        stride_xb, stride_xn, stride_xd, stride_pb, stride_pp, stride_pd, stride_ob, stride_op, stride_on,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # int64 offsets: B x N x D may pass 2**31
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    dot = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    x_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    p_sq = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + b * stride_xb + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                    mask=(offs_n[:, None] < n) & (offs_d[None, :] < dim), other=0.0).to(tl.float32)
        p = tl.load(p_ptr + b * stride_pb + offs_p[:, None] * stride_pp + offs_d[None, :] * stride_pd,
                    mask=(offs_p[:, None] < pivots) & (offs_d[None, :] < dim), other=0.0).to(tl.float32)
        # "ieee": full fp32 products; TF32 (Triton's default for fp32 dots) would cost ~3 decimal digits.
        dot += tl.dot(p, tl.trans(x), input_precision="ieee")
        x_sq += tl.sum(x * x, axis=1)
        p_sq += tl.sum(p * p, axis=1)
    x_norm = tl.maximum(tl.sqrt(x_sq), eps)
    p_norm = tl.maximum(tl.sqrt(p_sq), eps)
    cosine = dot / p_norm[:, None] / x_norm[None, :]
    tl.store(out_ptr + b * stride_ob + offs_p[:, None] * stride_op + offs_n[None, :] * stride_on, cosine,
             mask=(offs_p[:, None] < pivots) & (offs_n[None, :] < n))


def cosine_to_pivots_triton(x: Tensor, pivots: Tensor, *, block_n: int = 64, block_d: int = 32) -> Tensor:
    """Launch the kernel. Same contract as ``reference.cosine_to_pivots``; ``block_n`` / ``block_d``
    (powers of two >= 16) override the tile sizes, for tests."""
    batch, n, dim = x.shape
    count = pivots.shape[1]
    out = torch.empty(batch, count, n, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    # tl.dot needs every tile side >= 16; DART-style callers have a handful of pivots, so one tile.
    # Up to 32 pivots x 64 tokens a tile compiles without register spills on sm_90 at 4 warps.
    block_p = max(16, min(32, triton.next_power_of_2(count)))
    grid = (batch, math.ceil(count / block_p), math.ceil(n / block_n))
    _cosine_to_pivots_kernel[grid](
        x, pivots, out, n, count, dim, COSINE_EPS,
        x.stride(0), x.stride(1), x.stride(2), pivots.stride(0), pivots.stride(1), pivots.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_D=block_d)
    return out
