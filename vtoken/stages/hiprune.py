"""Anchor, buffer and register tokens from the vision encoder's hierarchical attention (HiPrune).

Paper: "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models"
(Liu et al., 2025); the authors' code (Danielement321/HiPrune) is the reference for the procedure.
Inputs (``encoder_attn``): the attention each patch receives in two encoder layers, mean over heads and
over every query token ([CLS] included where the tower has one), so no [CLS] is needed:
an object layer in the middle of the encoder and a deep layer. Selection, per image, for a budget k:
1. Anchors: the ``round(k * alpha / 5)`` patches with the most attention in the object layer.
2. Buffers: the 4-neighbours (up, down, left, right) of every anchor on the patch grid.
3. Registers: the rest of the budget, the patches with the most attention in the deep layer among those
   not chosen yet.
Defaults as the authors': ``alpha = 0.1``; object layer 9 of CLIP-L's 24 (LLaVA-1.5, LLaVA-NeXT) and 16 of
Qwen2.5-VL's 32 blocks, scaled to the tower's depth elsewhere (``round(depth * 9/24)``, ``round(depth / 2)``);
deep layer: the one producing the features the model reads (LLaVA's ``vision_feature_layer``, Qwen's last
block). ``object_layer`` and ``deep_layer`` count encoder layers from 1 (layer l is block l-1; negative:
from the end, -1 the last).

Where vtoken differs, and why:
- Neighbours are taken on the 2-D grid: the reference adds +-1 and +-width to flat indices and clamps,
  which wraps a row's first and last patch onto the neighbouring row; vtoken drops those wrapped
  neighbours (they are not adjacent in the image).
- When anchors and buffers alone exceed the budget (only possible with a large ``alpha``), all anchors are
  kept and buffers fill the rest by their object-layer attention; the reference would keep more than k.
- On Qwen2.5-VL the received attention is taken within the segments the block attends over and averaged
  over them (mean, the reference sums): the same order within a full-attention block, which both
  defaults are; it is averaged over each 2x2 merge group as the reference does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..registry import register_stage
from ..tokens import Keep, TokenSet, require_grid
from .base import Stage, check_encoder_layers, check_in_range, option


@register_stage("hiprune")
class HiPrune(Stage):
    alpha: float = option(0.1, "share of the budget for anchors and their buffers: round(k * alpha / 5) anchors "
                               "(paper: 0.1)")
    object_layer: int | None = option(None, "encoder layer (from 1) whose attention picks the anchors; None: the "
                                            "model's default")
    deep_layer: int | None = option(None, "encoder layer (from 1, negative from the end) whose attention picks the "
                                          "registers; None: the feature layer")

    needs_grid: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_range(self, "alpha", 0.0, 1.0)
        check_encoder_layers(self, ("object_layer", "deep_layer"))

    def signals(self) -> dict[str, dict[str, Any]]:
        return {"encoder_attn": {"layers": (self.object_layer, self.deep_layer)}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        grid = require_grid(tokens, "hiprune")
        attention = tokens.signals["encoder_attn"].float()
        object_attn, deep_attn = attention[..., 0], attention[..., 1]
        anchors = round(k * self.alpha / 5)
        anchor = torch.zeros_like(object_attn, dtype=torch.bool)
        if anchors:
            top = torch.sort(object_attn, dim=-1, descending=True, stable=True).indices[:, :anchors]
            anchor.scatter_(1, top, True)
        buffer = neighbours(anchor, grid) & ~anchor
        # one ranking: anchors, then buffers (by object-layer attention), then the rest by deep-layer attention
        tier = anchor.long() * 2 + buffer.long()
        score = torch.where(tier > 0, object_attn, deep_attn)
        by_score = torch.sort(score, dim=-1, descending=True, stable=True).indices
        by_tier = torch.sort(tier.gather(1, by_score), dim=-1, descending=True, stable=True).indices
        return Keep(indices=by_score.gather(1, by_tier)[:, :k].sort(dim=-1).values)


def neighbours(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, N]`` True where a token is the up/down/left/right neighbour of a True token on the (h, w) grid."""
    h, w = grid
    cells = mask.view(-1, h, w)
    near = torch.zeros_like(cells)
    near[:, 1:] |= cells[:, :-1]
    near[:, :-1] |= cells[:, 1:]
    near[:, :, 1:] |= cells[:, :, :-1]
    near[:, :, :-1] |= cells[:, :, 1:]
    return near.view_as(mask)
