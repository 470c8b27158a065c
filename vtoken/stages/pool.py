"""Spatial average pooling of the token grid: the simplest merging baseline (LLaVA-NeXT/Video-style 2-D
pooling). Published comparisons find it a strong baseline at moderate budgets.

Inputs: the tokens on their (h, w) grid. Merge: the grid is partitioned into an (a, b) grid of
non-overlapping cells with a * b == k (rows i -> cell floor(i * a / h), columns likewise), and each cell
is replaced by the weighted mean of its tokens (weights: patches each token already stands for). The
merged token takes the sequence position of the cell's central token. The cell grid is the factor pair
of k closest to the image's aspect ratio; k with no factor pair that fits the grid is refused.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..registry import register_stage
from ..tokens import Keep, TokenSet, require_grid
from .base import Stage


@register_stage("pool")
class Pool(Stage):
    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "vision")
    merging: ClassVar[bool] = True
    needs_grid: ClassVar[bool] = True

    def select(self, tokens: TokenSet, k: int) -> Keep:
        h, w = require_grid(tokens, "pool")
        return merge_cells(tokens, *pool_grid(k, h, w))


def merge_cells(tokens: TokenSet, a: int, b: int) -> Keep:
    """Replace the tokens of each cell of an (a, b) partition of the grid by their weighted mean."""
    h, w = tokens.grid
    k = a * b
    cell = pool_assignment(h, w, a, b, tokens.features.device)  # [N] cell of each token
    batch, n, dim = tokens.features.shape
    weights = tokens.token_weights().to(tokens.features.dtype)
    assign = cell.expand(batch, n)
    summed = torch.zeros(batch, k, dim, dtype=tokens.features.dtype, device=tokens.features.device)
    summed.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, dim), tokens.features * weights.unsqueeze(-1))
    mass = torch.zeros(batch, k, dtype=weights.dtype, device=weights.device).scatter_add_(1, assign, weights)
    merged = summed / mass.unsqueeze(-1)
    centre = cell_centres(h, w, a, b, tokens.features.device)
    return Keep(indices=centre.expand(batch, k), features=merged, assign=assign, grid=(a, b))


def pool_grid(k: int, h: int, w: int) -> tuple[int, int]:
    """The (a, b) with a * b == k, a <= h, b <= w, whose aspect ratio is closest to h / w."""
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= h and k // a <= w]
    if not pairs:
        raise ValueError(
            f"pool cannot merge a {h}x{w} grid into exactly {k} tokens: k must be a*b with a <= {h} and b <= {w} "
            f"(e.g. {min(h, w) ** 2 // 4}, {(h // 2) * (w // 2)}, {(h // 3) * (w // 3)})"
        )
    target = math.log(h / w)
    # rounding keeps mirror-image pairs (3x4, 4x3) tied, so the tie goes to fewer rows
    return min(pairs, key=lambda ab: (round(abs(math.log(ab[0] / ab[1]) - target), 9), ab[0]))


def pool_assignment(h: int, w: int, a: int, b: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(h, device=device) * a // h
    cols = torch.arange(w, device=device) * b // w
    return (rows[:, None] * b + cols[None, :]).reshape(-1)


def cell_centres(h: int, w: int, a: int, b: int, device: torch.device) -> torch.Tensor:
    """Position (row-major in the h x w grid) of the central token of each cell, in cell order."""
    rows = torch.arange(h, device=device) * a // h
    cols = torch.arange(w, device=device) * b // w
    row_of = torch.stack([torch.nonzero(rows == r)[:, 0].median() for r in range(a)])
    col_of = torch.stack([torch.nonzero(cols == c)[:, 0].median() for c in range(b)])
    return (row_of[:, None] * w + col_of[None, :]).reshape(-1)
