"""Duplication-aware selection (DART).

Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., 2025). Inputs: token features; pivot scores (the L1 norm of each token's key at the layer
before pruning, DART's choice; the L1 norm of the features where no keys exist). Pivots: the
``image_pivots`` visual tokens and ``text_pivots`` text tokens with the largest scores (paper: 4 + 4).
Duplication: cosine similarity of every visual token to each pivot. Selection: the image pivots are
kept; the rest of the budget is split evenly over all pivots (earlier pivots take the remainder), and
each pivot in turn keeps its share of the not-yet-kept tokens least similar to it.

Two forms, chosen by the site:
- ``llm(K)`` (the paper's form, K=2): features are the normalised hidden states entering layer K, the
  pivot scores come from layer K-1's keys, and text pivots come from the text after the image (the
  question: each row's text tokens after its last visual token).
- ``projector`` (pre-LLM form): there is no text yet, so all ``image_pivots + text_pivots`` pivots are
  visual tokens, scored by the L1 norm of the projected features.
Unlike the reference code, the kept count is exact: the per-pivot shares add up to the budget.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import kernels
from ..registry import register_stage
from ..tokens import Keep, TokenSet, gather_tokens
from .base import Stage, option


@register_stage("dart")
class Dart(Stage):
    image_pivots: int = option(4, "visual pivot tokens (paper: 4)")
    text_pivots: int = option(4, "text pivot tokens at llm(K) (paper: 4); at the projector they become extra visual "
                                 "pivots")

    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "llm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_pivots < 1 or self.text_pivots < 0:
            raise ValueError(f"dart needs image_pivots >= 1 and text_pivots >= 0; got {self.image_pivots}, "
                             f"{self.text_pivots}")

    def signals(self) -> dict[str, dict[str, Any]]:
        if self.site.kind == "llm":
            return {"key_norm": {}, "text_tokens": {}}
        return {}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        x = tokens.features
        batch, n, _ = x.shape
        in_llm = "key_norm" in tokens.signals
        scores = tokens.signals["key_norm"] if in_llm else x.float().abs().sum(-1)
        n_image = min(self.image_pivots if in_llm else self.image_pivots + self.text_pivots, k)
        image_pivots = _top_positions(scores, n_image)
        pivot_vectors = [gather_tokens(x, image_pivots)]
        if in_llm and self.text_pivots > 0 and tokens.context["text_features"].shape[1] > 0:
            text_x, text_scores = tokens.context["text_features"], tokens.context["text_key_norm"]
            text_pivots = _top_positions(text_scores, min(self.text_pivots, text_x.shape[1]))
            pivot_vectors.append(gather_tokens(text_x, text_pivots))
        pivots = torch.cat(pivot_vectors, dim=1)
        similarity = kernels.cosine_to_pivots(x, pivots)  # [B, P, N]

        kept = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
        kept.scatter_(1, image_pivots, True)
        share, extra = divmod(k - n_image, pivots.shape[1])
        for p in range(pivots.shape[1]):
            take = share + (1 if p < extra else 0)
            if take == 0:
                continue
            # least similar first; kept tokens are pushed to the end of the order
            candidates = similarity[:, p].masked_fill(kept, float("inf"))
            order = torch.sort(candidates, dim=-1, stable=True).indices[:, :take]
            kept.scatter_(1, order, True)
        return Keep(indices=kept.nonzero()[:, 1].view(batch, k))


def _top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` largest scores per row, largest first (ties: lower position)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :count]
