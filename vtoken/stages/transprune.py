"""TransPrune: token transition variation plus instruction-guided attention, inside the decoder.

Paper: "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model" (Li et al.,
CVPR 2026; authors' code github.com/liaolea/TransPrune). Inputs at an ``llm(K)`` site:
- TTV (``token_transition``): in each decoder layer from ``from_layer`` to K-1, for the attention block
  and the MLP, the ratio of the block output's norm to its normalised input's norm times the softmax,
  over the sequence, of 1 - cosine(input, output) (how far the block turns the token); blocks and
  layers summed.
- IGA (``instruction_attn``): the attention of the instruction (the text after the image) to each
  visual token at layer K, with layer K's own projections, mean over heads and instruction tokens.
Score: TTV and IGA, each divided by its sum over the row's visual tokens, added. Selection: top-k.

Defaults follow the authors' LLaVA-1.5-7B scripts: transitions accumulate from layer 7 (1-based; 0-based
``from_layer=6``; a site before it sums layer K-1 alone), and the method prunes progressively at layers
7, 9 and 12 to 87.5 %, 62.5 % and 12.5 % of the visual tokens, which vtoken writes as a pyramid:
``Pipeline([TransPrune(site="llm(7)", keep=0.875), TransPrune(site="llm(9)", keep=0.714),
TransPrune(site="llm(12)", keep=0.2)])`` (a fraction is of the tokens reaching each site).
Where vtoken differs: the softmax over positions runs over each row's attended positions (the code sums
over the whole batch, which it runs one sample at a time), and the attention rows are recomputed from
q/k without an attention map. The default site is ``llm(7)``; models with fewer layers need a site of
their own.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..registry import register_stage
from ..tokens import Keep, TokenSet, sorted_topk
from .base import Stage, option


@register_stage("transprune")
class TransPrune(Stage):
    from_layer: int | None = option(None, "first decoder layer (0-based) whose token transitions count; they are "
                                          "summed up to layer K-1. None: the authors' LLaVA-1.5 setting, 6, or K-1 for "
                                          "a site before layer 7")
    attention: bool = option(True, "add the instruction-guided attention (IGA) to TTV; False: TTV alone, which needs "
                                   "no attention")

    site_kinds: ClassVar[tuple[str, ...]] = ("llm",)
    default_site: ClassVar[str] = "llm(7)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.from_layer is None:
            self.from_layer = min(6, self.site.layer - 1)
        if not 0 <= self.from_layer < self.site.layer:
            last = self.site.layer - 1
            raise ValueError(f"transprune at {self.site} sums the transitions of layers from_layer..{last}; "
                             f"from_layer={self.from_layer} must be in [0, {last}]")

    def signals(self) -> dict[str, Any]:
        wanted: dict[str, Any] = {"token_transition": {"from_layer": self.from_layer}}
        if self.attention:
            wanted["instruction_attn"] = {}
        return wanted

    def select(self, tokens: TokenSet, k: int) -> Keep:
        ttv = tokens.signals["token_transition"].float()
        score = ttv / (ttv.sum(-1, keepdim=True) + 1e-8)
        if self.attention:
            iga = tokens.signals["instruction_attn"].float()
            score = score + iga / (iga.sum(-1, keepdim=True) + 1e-8)
        return Keep(indices=sorted_topk(score, k))
