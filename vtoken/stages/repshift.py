"""Representation shift: how much a block changes each token.

Paper: "Representation Shift: Unifying Token Compression with FlashAttention" (Choi et al., ICCV 2025).
Inputs: the output of the MLP sublayer of encoder layer L for every token, i.e. the residual update
the block's MLP adds. Score: its L2 norm (no attention map needed, so FlashAttention stays on).
Selection: keep the tokens with the largest shift, drop the rest, in original order. Several layers:
put one RepShift at each ``vision(L)`` site in a Pipeline.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..registry import register_stage
from ..tokens import Keep, TokenSet, sorted_topk
from .base import EncoderStage


@register_stage("repshift")
class RepShift(EncoderStage):
    site_kinds: ClassVar[tuple[str, ...]] = ("vision",)

    def signals(self) -> dict[str, Any]:
        return {"mlp_shift": {}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        return Keep(indices=sorted_topk(tokens.signals["mlp_shift"], k))
