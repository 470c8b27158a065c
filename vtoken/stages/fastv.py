"""FastV: attention of the last prompt token.

Paper: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024). Inputs: the attention of
the last prompt token to every visual token in decoder layer K-1, mean over heads. Selection: keep the
top-k visual tokens for layers K onward. Defaults as the paper: K=2 (site ``llm(2)``), keep 50%.

The integration recomputes that one attention row from layer K-1's own q/k projections and rotary
embedding through ``vtoken.kernels.attention_rows``: the model stays on SDPA/FlashAttention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..registry import register_stage
from ..tokens import Keep, TokenSet, sorted_topk
from .base import Stage


@register_stage("fastv")
@dataclass
class FastV(Stage):
    site_kinds: ClassVar[tuple[str, ...]] = ("llm",)
    default_site: ClassVar[str] = "llm(2)"
    default_keep: ClassVar[float] = 0.5

    def signals(self) -> dict[str, Any]:
        return {"last_query_attn": {}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        return Keep(indices=sorted_topk(tokens.signals["last_query_attn"], k))
