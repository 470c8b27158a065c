"""CLS-attention importance.

Paper: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (FasterVLM, Zhang et al.,
2024). Inputs: the vision encoder's [CLS] attention row over the patch tokens, mean over heads, taken in
the encoder layer that produces LLaVA's feature layer (``vision_feature_layer``, -2 for LLaVA-1.5).
Score: that attention. Selection: the top-k patches, in original order.

At ``vision(L)`` (inside the encoder) the row comes from block L itself and ``layers`` does not apply.
The integration computes the row from the layer's own q/k projections (one query row, all keys), so
the vision tower keeps running on SDPA/FlashAttention; no attention map is ever requested.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..registry import register_stage
from ..tokens import Keep, TokenSet, sorted_topk
from .base import Stage, option


@register_stage("cls_attn")
class ClsAttn(Stage):
    layers: tuple[int, ...] | None = option(None, "vision hidden-state indices (as LLaVA's vision_feature_layer counts "
                                                  "them) whose [CLS] attention is averaged; None: the model's feature "
                                                  "layer, as the paper does. Several: an ensemble")

    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "vision")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layers, int):
            self.layers = (self.layers,)
        if self.layers is not None:
            self.layers = tuple(int(layer) for layer in self.layers)
            if not self.layers:
                raise ValueError("cls_attn layers must name at least one layer, or be None for the feature layer")
            if self.site.kind == "vision":
                raise ValueError("cls_attn at vision(L) scores with block L's own [CLS] row; drop layers=")

    def signals(self) -> dict[str, dict[str, Any]]:
        return {"cls_attn": {"layers": self.layers}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        return Keep(indices=sorted_topk(tokens.signals["cls_attn"], k))
