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
- The key-token set of MustDrop's vision stage (the top 8 % by [CLS] attention in the last encoder layer,
  never dropped later) is not built: no state passes from the projector to the llm(K) sites. Its spatial
  merge is ``mustdrop_merge`` (projector) and its decode-stage cache policy ``mustdrop_cache`` (decode);
  ``Pipeline([MustDropMerge(keep=...), MustDropFilter(site="llm(3)", keep=...), ..., MustDropCache()])``
  composes the three.
- The attention is recomputed from layer K-1's q/k (no attention map asked of the model), over each row's
  own positions, so a padded batch equals its rows alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..registry import register_stage
from ..tokens import Keep, TokenSet, sorted_topk
from .base import Stage


@register_stage("mustdrop_filter")
@dataclass
class MustDropFilter(Stage):
    global_thr: float = field(default=0.011, metadata={
        "help": "share of the text's summed attention a token needs to pass the global test (authors' 0.011)"})
    individual_thr: float = field(default=0.01, metadata={
        "help": "attention from at least one text token needed to pass the individual test (authors' 0.01)"})

    site_kinds: ClassVar[tuple[str, ...]] = ("llm",)
    default_site: ClassVar[str] = "llm(3)"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("global_thr", "individual_thr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"mustdrop_filter.{name} must be > 0; got {getattr(self, name)!r}")

    def signals(self) -> dict[str, Any]:
        return {"text_attn_dual": {}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        dual = tokens.signals["text_attn_dual"].float()
        total, peak = dual[..., 0], dual[..., 1]
        passing = total / (self.global_thr * total.sum(-1, keepdim=True)).clamp_min(1e-12)
        score = passing.maximum(peak / self.individual_thr)
        return Keep(indices=sorted_topk(score, k))
