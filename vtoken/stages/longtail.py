"""A budget per image at the inflection point of the long-tail [CLS]-similarity curve (long-tail dynamic budget).

Paper: "Sparsity Meets Similarity: Leveraging Long-Tail Distribution for Dynamic Optimized Token Representation
in Multimodal Large Language Models" (Yu, Chen, Xu, 2024, arXiv 2409.01162). The authors' code is not public
(the paper says it will be released on acceptance), so the paper's text is the reference.
Inputs: each patch token's similarity to the vision encoder's [CLS] token (``cls_attn``: the [CLS] row of
the feature layer's attention, mean over heads; on Qwen's tower, which has no [CLS], the mean attention each
patch receives, as ``visionzip`` and ``cls_attn`` use there). Selection, per image, for a budget k:
1. Sort the scores in descending order, s_0 >= s_1 >= ... >= s_{N-1}: the paper's observation is that this
   curve is long-tailed, a few tokens far more similar to [CLS] than the rest.
2. The inflection point: on the curve normalised to the unit square (x_i = i / (N - 1),
   y_i = (s_i - s_{N-1}) / (s_0 - s_{N-1})), the point farthest below the chord joining its two ends, i.e. the
   i maximising 1 - x_i - y_i (the first such i on ties; the "knee" of Kneedle, Satopaa et al. 2011).
3. The image keeps the tokens of the head, ``i + 1`` of them, capped by ``k`` (the budget is an upper bound):
   ``counts = clamp(i + 1, 1, k)``. A curve with no point below its chord (flat, or bending the other way)
   has no long tail and no knee: it keeps k.
With ``exact=True`` every image keeps exactly k, the top-k by the same score (then the selection equals
``cls_attn``'s), for consumers that need a fixed count (inside an encoder batch, ``vision(L)``).

Where vtoken differs, and why:
- The paper finds "the inflection point" of the curve without a formula in its abstract, and its body was not
  available to us; vtoken uses the maximum distance to the chord on the normalised curve, the usual definition
  of a curve's knee, so the budget does not depend on the scale of the scores.
- Similarity is the [CLS] attention (per head the softmax of [CLS]'s query against each patch's key, then the
  mean over heads), a query-key similarity, where the paper may compare [CLS] and patch features directly
  (the abstract does not say which): every family already computes this row without an attention map, and
  its sorted curve is long-tailed too (on the embedded scenes model the inflection point lies at 3 to 129
  of 576 tokens). On a model with no [CLS] the received attention stands in for it.
- The paper's second round of pruning inside the LLM (visual-text relevance) is not part of this stage:
  compose it, e.g. ``longtail+fastv@llm(2)``; a later site's budget is capped at what an image kept here.
- ``keep`` caps the count so the stage runs under the same budgets as every other method; the paper's budget
  is the inflection point alone (``keep=1.0`` gives that: the cap is then every token).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..registry import register_stage
from ..tokens import Keep, TokenSet, adaptive_keep, sorted_topk
from .base import Stage, option


@register_stage("longtail")
class LongTail(Stage):
    exact: bool = option(False, "keep exactly the budget in every image (the top-k by [CLS] similarity) instead of the "
                                "inflection point capped by it")

    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "vision")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.exact, bool):
            raise ValueError(f"longtail exact={self.exact!r}; accepted: True or False")

    @property
    def adaptive(self) -> bool:
        """A different count per image (the pipeline refuses this where rows must stay as long)."""
        return not self.exact

    def signals(self) -> dict[str, dict[str, Any]]:
        return {"cls_attn": {"layers": None}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        scores = tokens.signals["cls_attn"].float()
        if self.exact:
            return Keep(indices=sorted_topk(scores, k))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        counts = inflection_counts(scores.gather(1, order)).clamp(min=1, max=k)
        return adaptive_keep(order, counts, k)


def inflection_counts(ranked: Tensor) -> Tensor:
    """``[B]`` tokens up to and including the knee of each row of ``ranked`` ``[B, N]`` (descending): the
    point of the unit-square-normalised curve farthest below its chord, first on ties; N for a row with no
    point below the chord (flat, or concave: no long tail)."""
    n = ranked.shape[1]
    if n == 1:
        return torch.ones(ranked.shape[0], dtype=torch.long, device=ranked.device)
    x = torch.arange(n, device=ranked.device, dtype=ranked.dtype) / (n - 1)
    top, bottom = ranked[:, :1], ranked[:, -1:]
    span = top - bottom
    y = (ranked - bottom) / torch.where(span > 0, span, torch.ones_like(span))
    below = 1 - x - y  # the distance below the chord x + y = 1, times sqrt(2)
    distance, knee = below.max(dim=1)  # the first maximum
    return torch.where((span[:, 0] > 0) & (distance > 0), knee + 1, torch.full_like(knee, n))
