"""FastV: attention of the last prompt token.

Paper: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024). Inputs: the attention of
the last prompt token to every visual token in decoder layer K-1, mean over heads. Selection: keep the
top-k visual tokens for layers K onward. Defaults as the paper: K=2 (site ``llm(2)``), keep 50%.

The integration recomputes that one attention row from layer K-1's own q/k projections and rotary
embedding through ``vtoken.kernels.attention_rows``: the model stays on SDPA/FlashAttention.
"""

from __future__ import annotations

from typing import ClassVar

from ..registry import register_stage
from .base import TopKBySignal


@register_stage("fastv")
class FastV(TopKBySignal):
    site_kinds: ClassVar[tuple[str, ...]] = ("llm",)
    default_site: ClassVar[str] = "llm(2)"
    default_keep: ClassVar[float] = 0.5
    score_signal: ClassVar[str] = "last_query_attn"
