"""Decode-time KV selection: keep the visual cache entries the newest token attends to most.

Site ``decode`` / ``decode(n)``: after every n-th cached decoding step, the integration hands this stage
the visual entries still in the KV cache with the attention the step's new token paid to each
(``decode_attn``: softmax of its query against every cached key, mean over heads; over all decoder
layers by default, or at one ``layer``). The stage keeps the top-k; the integration removes the others
from every layer's cache, so later steps neither attend to nor store them.

The score follows the observation behind attention-based KV eviction (H2O, Zhang et al., NeurIPS 2023;
MustDrop's decode stage, Liu et al., 2024): entries a decoding query ignores contribute little to later
steps. Where vtoken differs: only visual entries are candidates (text and generated tokens always stay),
the score is the current step's row (no accumulation over steps), and one choice serves every layer, so
all layers keep the same visual entries.

Budget: an int keeps that many entries per image at each choice (a cap reached at the first choice); a
fraction keeps that share of the entries present at each choice, so it compounds over choices
(0.5 every 8 steps leaves 1/4 after 16 steps, never fewer than one entry per image).
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..registry import register_stage
from .base import TopKBySignal, option


@register_stage("decode_topk")
class DecodeTopK(TopKBySignal):
    layer: int | None = option(None, "decoder layer whose attention row scores the entries (negative counts from the "
                                     "end); None: the mean of every layer's row")

    site_kinds: ClassVar[tuple[str, ...]] = ("decode",)
    default_site: ClassVar[str] = "decode"
    score_signal: ClassVar[str] = "decode_attn"

    def signal_options(self) -> dict[str, Any]:
        return {"layer": self.layer}
