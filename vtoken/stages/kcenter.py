"""Diversity by greedy k-center (max-min) selection.

Papers: ToDRE ("Diversity-guided token reduction", 2025) and DivPrune (Alvar et al., CVPR 2025), whose
public code is the reference for the procedure. Inputs: the post-projector features. Distance: 1 -
cosine similarity. Selection: start with the token whose nearest neighbour is farthest, then repeatedly
add the token farthest from the selected set (each token's min distance to the set is updated
incrementally, O(K*N) after the start). Kept indices are returned in original order.

The work is done by ``vtoken.kernels.kcenter_select`` (Triton on CUDA, torch elsewhere). Memory grows as
N x D, never as N x N beyond it: the kernels tile the distances; the torch reference computes them in row
blocks, and holds the whole N x N matrix (one product, then one row read per pick) only when it is no
larger than the features, N <= D (``tests/test_memory.py`` checks 16,000 tokens).
"""

from __future__ import annotations

from typing import ClassVar

from .. import kernels
from ..registry import register_stage
from ..tokens import Keep, TokenSet
from .base import Stage


@register_stage("kcenter")
class KCenter(Stage):
    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "vision", "llm")

    def select(self, tokens: TokenSet, k: int) -> Keep:
        order = kernels.kcenter_select(tokens.features, k)
        return Keep(indices=order.sort(dim=-1).values)
