"""MustDrop's prefill stage: the dual-attention filter inside the decoder.

Paper: "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model" (Liu et al.,
2024; authors' code github.com/liuting20/MustDrop). Inputs (``text_attn_dual``): the attention of the text
after the image to each visual token, mean over heads, summed over the text tokens (global attention, g)
and its maximum over them (individual attention, i). The authors drop a visual token when both are low:
``g < global_thr * sum(g)`` and ``i < individual_thr`` (their scripts: 0.011 and 0.01), after decoder
layers 2, 6, 10 and 14 (0-based) with that layer's attention, i.e. vtoken's ``llm(3)``, ``llm(7)``,
``llm(11)``, ``llm(15)`` with layer K-1's attention: a pyramid ``Pipeline([MustDropFilter(site="llm(3)",
keep=...), ...])``.

Where vtoken differs, and why:
- Count: the thresholds make the count input-dependent; vtoken's budget is met exactly instead. A token
  the authors keep passes at least one threshold, so tokens are ranked by
  ``max(g / (global_thr * sum(g)), i / individual_thr)`` (>= 1 exactly for the tokens their rule keeps) and
  the top ``k`` stay: with ``k`` equal to the count their rule keeps, the two agree.
- Key-token set: the code adds MustDrop's key set (``mustdrop_merge`` pins it at the projector: the top
  8 % by [CLS] attention in the last encoder layer) to whatever its filter keeps, at every pruning layer.
  Here the pinned tokens (the ``pinned`` signal) come first and the filter's ranking fills the rest of the
  budget; when more tokens are pinned than the budget holds, the site keeps the pinned ones it ranks
  highest and the others are dropped there (the code's union would exceed its count instead). Its spatial
  merge is ``mustdrop_merge`` (projector) and its decode-stage cache policy ``mustdrop_cache`` (decode); the
  named method ``mustdrop`` composes the three (registered at the end of this file).
- The attention is recomputed from layer K-1's q/k (no attention map asked of the model), over each row's
  own positions, so a padded batch equals its rows alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..registry import register_pipeline, register_stage
from ..tokens import Keep, TokenSet, sorted_topk
from .base import Stage, option


@register_stage("mustdrop_filter")
class MustDropFilter(Stage):
    global_thr: float = option(0.011, "share of the text's summed attention a token needs to pass the global test "
                                      "(authors' 0.011)")
    individual_thr: float = option(0.01, "attention from at least one text token needed to pass the individual test "
                                         "(authors' 0.01)")

    site_kinds: ClassVar[tuple[str, ...]] = ("llm",)
    default_site: ClassVar[str] = "llm(3)"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("global_thr", "individual_thr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"mustdrop_filter.{name} must be > 0; got {getattr(self, name)!r}")

    def signals(self) -> dict[str, Any]:
        return {"text_attn_dual": {}, "pinned": {}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        dual = tokens.signals["text_attn_dual"].float()
        total, peak = dual[..., 0], dual[..., 1]
        passing = total / (self.global_thr * total.sum(-1, keepdim=True)).clamp_min(1e-12)
        score = passing.maximum(peak / self.individual_thr)
        pinned = tokens.signals.get("pinned")
        if pinned is None or not bool(pinned.any()):
            return Keep(indices=sorted_topk(score, k))
        # pinned first, each part by score (ties: lower index): a stable sort of the score order by pin
        ranked = torch.sort(score, dim=-1, descending=True, stable=True).indices
        order = ranked.gather(1, torch.sort((~pinned.gather(1, ranked)).long(), dim=-1, stable=True).indices)
        return Keep(indices=order[:, :k].sort(dim=-1).values)


# MustDrop as its authors run LLaVA-1.5: the window merge (with its key set) before the language model, the
# dual-attention filter after decoder layers 2, 6, 10 and 14 (llm(3), llm(7), llm(11), llm(15) of 32 layers:
# shares of the wrapped model's depth), every layer's cache cut to the final set while decoding. Their
# scripts set thresholds (64: 0.011 / 0.01, 128: 0.0012 / 0.001, 192: 0.001 / 0.001), not counts: how many
# tokens each stage keeps depends on the input, and their 64 / 128 / 192 are visual tokens averaged over the
# 32 layers. vtoken's named methods count ``keep`` after the last stage and meet it exactly, so the counts are
# this module's: the merge keeps 2.5 x keep (192 -> 480 of 576, so the merge acts at every budget), the
# first filter cuts most (1.5 x), the later ones less (1.25 x, 1.125 x, then keep), as the authors' fixed
# thresholds do once the low-attention tokens are gone; the cache keeps the final set whole.
register_pipeline(
    "mustdrop",
    "mustdrop_merge@projector+mustdrop_filter@llm(3)+mustdrop_filter@llm(7)+mustdrop_filter@llm(11)"
    "+mustdrop_filter@llm(15)+mustdrop_cache@decode",
    factors=(2.5, 1.5, 1.25, 1.125, 1, 1), depths=(None, 3 / 32, 7 / 32, 11 / 32, 15 / 32, None))
