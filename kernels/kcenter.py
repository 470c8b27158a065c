"""Triton kernels: greedy k-center (max-min) selection on cosine distance, without an N x N matrix.

The tokens are normalised once, in float32, with ``reference.normalize`` (so both backends start from
the same unit vectors and differ only in summation order). Then:

* ``_nearest_neighbour_kernel``: each token's distance to its nearest other valid token, tiled over the
  other tokens (an N x N block is only ever one tile in registers). Its maximum is the first pick.
* ``_kcenter_step_kernel``, launched once per pick: resolves the pick from the previous launch's
  per-tile maxima, lowers every token's distance-to-the-selected-set with its distance to that pick, and
  writes the new per-tile maxima.

Why a launch per pick rather than one persistent loop per batch row: a step reads all of the N x D
tokens (576 x 4096 float32 is 9 MB), and one program per row would stream that through a single SM,
a small share of the GPU's bandwidth, with B = 1 the common case; spread over a grid, the steps can
only be ordered by kernel boundaries (Triton has no grid-wide barrier).
The per-tile (max, index) pairs make the argmax a two-level reduction that every program of the next
launch finishes for itself (a few dozen numbers), so no extra launch and no host synchronisation is
needed; they alternate between two buffers because a launch reads one while it writes the other.

Selected tokens get min distance -inf, as do invalid ones, so neither is ever picked again (exact
duplicates have distance ~0, not reliably below anything). Ties go to the lowest index, as torch.argmax.
Semantics: ``reference.kcenter_select``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import check_kcenter_k, normalize


@triton.jit
def _nearest_neighbour_kernel(
        x_ptr, valid_ptr, nearest_ptr, tile_max_ptr, tile_arg_ptr, n, dim, tiles,
        HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (batch, token tile): nearest-neighbour distance of each token of the tile."""
    b = tl.program_id(0).to(tl.int64)  # int64 offsets: B x N x D may pass 2**31
    tile = tl.program_id(1)
    offs_i = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    x_row = x_ptr + b * n * dim  # x is contiguous [B, N, D] float32
    nearest = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    for start_j in range(0, n, BLOCK_J):
        offs_j = start_j + tl.arange(0, BLOCK_J)
        dot = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
        for start_d in range(0, dim, BLOCK_D):
            offs_d = start_d + tl.arange(0, BLOCK_D)
            xi = tl.load(x_row + offs_i[:, None] * dim + offs_d[None, :],
                         mask=(offs_i[:, None] < n) & (offs_d[None, :] < dim), other=0.0)
            xj = tl.load(x_row + offs_j[:, None] * dim + offs_d[None, :],
                         mask=(offs_j[:, None] < n) & (offs_d[None, :] < dim), other=0.0)
            # "ieee": TF32 would blur distances by ~1e-3 and change which token wins an argmax.
            dot += tl.dot(xi, tl.trans(xj), input_precision="ieee")
        neighbour = (offs_j[None, :] < n) & (offs_i[:, None] != offs_j[None, :])
        if HAS_VALID:
            valid_j = tl.load(valid_ptr + b * n + offs_j, mask=offs_j < n, other=0)
            neighbour = neighbour & (valid_j[None, :] != 0)
        distance = tl.where(neighbour, 1.0 - dot, float("inf"))
        nearest = tl.minimum(nearest, tl.min(distance, axis=1))
    nearest = tl.where(nearest == float("inf"), 0.0, nearest)  # a lone valid token has no neighbour
    candidate = offs_i < n
    if HAS_VALID:
        candidate = candidate & (tl.load(valid_ptr + b * n + offs_i, mask=offs_i < n, other=0) != 0)
    nearest = tl.where(candidate, nearest, -float("inf"))
    tl.store(nearest_ptr + b * n + offs_i, nearest, mask=offs_i < n)
    tl.store(tile_max_ptr + b * tiles + tile, tl.max(nearest, axis=0))
    best = tile * BLOCK_N + tl.argmax(nearest, axis=0, tie_break_left=True)
    tl.store(tile_arg_ptr + b * tiles + tile, best)


@triton.jit(do_not_specialize=["step"])
def _kcenter_step_kernel(
        x_ptr, min_dist_ptr, tile_max_ptr, tile_arg_ptr, picks_ptr, n, dim, tiles, batch, step, k,
        UPDATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program per (batch, token tile): record pick ``step``; if UPDATE, fold it into min_dist and
    write this tile's (max, argmax) for the next launch."""
    b = tl.program_id(0).to(tl.int64)  # int64 offsets: B x N x D may pass 2**31
    tile = tl.program_id(1)
    # Finish the argmax of the previous launch: best value, then the lowest index holding it.
    read = (step % 2) * batch * tiles + b * tiles
    offs_t = tl.arange(0, BLOCK_T)
    tile_max = tl.load(tile_max_ptr + read + offs_t, mask=offs_t < tiles, other=-float("inf"))
    tile_arg = tl.load(tile_arg_ptr + read + offs_t, mask=offs_t < tiles, other=n)
    best = tl.max(tile_max, axis=0)
    last = tl.min(tl.where((tile_max == best) & (offs_t < tiles), tile_arg, n), axis=0)
    tl.store(picks_ptr + b * k + step, last, mask=tile == 0)
    if UPDATE:
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        x_row = x_ptr + b * n * dim  # x is contiguous [B, N, D] float32
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, dim, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            x = tl.load(x_row + offs_n[:, None] * dim + offs_d[None, :],
                        mask=(offs_n[:, None] < n) & (offs_d[None, :] < dim), other=0.0)
            chosen = tl.load(x_row + last * dim + offs_d, mask=offs_d < dim, other=0.0)
            dot += tl.sum(x * chosen[None, :], axis=1)
        min_dist = tl.load(min_dist_ptr + b * n + offs_n, mask=offs_n < n, other=-float("inf"))
        min_dist = tl.minimum(min_dist, 1.0 - dot)
        min_dist = tl.where(offs_n == last, -float("inf"), min_dist)  # selected: never again
        tl.store(min_dist_ptr + b * n + offs_n, min_dist, mask=offs_n < n)
        write = ((step + 1) % 2) * batch * tiles + b * tiles + tile
        tl.store(tile_max_ptr + write, tl.max(min_dist, axis=0))
        tl.store(tile_arg_ptr + write, tile * BLOCK_N + tl.argmax(min_dist, axis=0, tie_break_left=True))


def _as_int8(valid: Tensor | None, x: Tensor) -> Tensor | None:
    """The validity mask as contiguous int8 on x's device (bool pointers are awkward in Triton)."""
    return None if valid is None else valid.to(device=x.device, dtype=torch.int8).contiguous()


def _launch_nearest(xn: Tensor, mask: Tensor | None, tiles: int,
                    block_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Run the nearest-neighbour kernel: (distances [B, N], per-tile maxima, their indices)."""
    batch, n, dim = xn.shape
    nearest = torch.empty(batch, n, dtype=torch.float32, device=xn.device)
    # Two buffers of per-tile maxima; the nearest-neighbour pass fills buffer 0 for the first step.
    tile_max = torch.empty(2, batch, tiles, dtype=torch.float32, device=xn.device)
    tile_arg = torch.empty(2, batch, tiles, dtype=torch.int64, device=xn.device)
    _nearest_neighbour_kernel[(batch, tiles)](
        xn, mask if mask is not None else xn, nearest, tile_max, tile_arg, n, dim, tiles,
        HAS_VALID=mask is not None, BLOCK_N=block_n, BLOCK_J=32, BLOCK_D=32, num_warps=8)
    return nearest, tile_max, tile_arg


def nearest_neighbour_distance_triton(x_normed: Tensor, valid: Tensor | None = None, *,
                                      block_n: int = 32) -> Tensor:
    """Each unit row's distance to its nearest other valid row, ``[B, N]``; invalid rows -inf. Same
    contract as ``reference.nearest_neighbour_distance``."""
    xn = x_normed.float().contiguous()
    return _launch_nearest(xn, _as_int8(valid, xn), math.ceil(xn.shape[1] / block_n), block_n)[0]


def kcenter_select_triton(x: Tensor, k: int, *, valid: Tensor | None = None, block_n: int = 32,
                          block_d: int = 128) -> Tensor:
    """Greedy k-center selection: ``[B, k]`` int64 indices in selection order. Same contract as
    ``reference.kcenter_select``. ``block_n`` (token tile of both kernels) and ``block_d`` (feature
    chunk of the step kernel), powers of two >= 16, override the tile sizes, for tests. The defaults
    compile without register spills on sm_90 and give a 576-token image 18 programs a step."""
    batch, n, dim = x.shape
    check_kcenter_k(k, n, valid)
    picks = torch.empty(batch, k, dtype=torch.int64, device=x.device)
    if k == 0 or batch == 0:
        return picks
    xn = normalize(x).contiguous()  # the kernels index x as a contiguous [B, N, D] float32 tensor
    mask = _as_int8(valid, xn)
    tiles = math.ceil(n / block_n)
    _, tile_max, tile_arg = _launch_nearest(xn, mask, tiles, block_n)
    # +inf = not yet near any selected token; -inf = padding, never picked.
    min_dist = torch.full((batch, n), float("inf"), device=x.device)
    if mask is not None:
        min_dist.masked_fill_(mask == 0, float("-inf"))
    block_t = max(16, triton.next_power_of_2(tiles))
    for step in range(k):
        update = step < k - 1  # the last launch only records the final pick
        _kcenter_step_kernel[(batch, tiles if update else 1)](
            xn, min_dist, tile_max, tile_arg, picks, n, dim, tiles, batch, step, k,
            UPDATE=update, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=8)
    return picks
