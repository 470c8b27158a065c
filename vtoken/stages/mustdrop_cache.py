"""MustDrop's decode stage: the KV cache cut to the visual tokens the prefill's last site kept.

Paper: "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model" (Liu et al.,
2024; authors' code github.com/liuting20/MustDrop). Their output-aware cache policy: the prefill prunes
progressively (layers 2, 6, 10, 14), so the layers between the first and the last pruning layer cached
visual tokens that the final layers no longer have; once the prefill is done, those layers' caches are cut
to the final kept set, since the output is formed from it.

Site ``decode``: at each choice the decode site hands this stage the visual entries of the last group of
layers (what the last ``llm(K)`` site kept), and it keeps all of them (the default ``keep=1.0``); the
site removes every other visual entry from every layer's cache (freed, not masked). Compose it with the
prefill filter: ``Pipeline([MustDropFilter(site="llm(3)", keep=...), ..., MustDropCache()])``. A budget
below those entries (vtoken's addition, so the stage also runs alone) keeps the ones the new token
attends to most, as ``decode_topk`` (whose ``layer`` option it shares); the site computes that attention
at every choice.

Where vtoken differs, and why: the cut happens after the first decoding step (the decode site chooses
after a step's token is cached; the first generated token still sees the layers' own prefill entries),
and it also cuts the layers before the first pruning layer, which the authors leave whole: the decode site
keeps one set of visual entries for all layers.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..registry import register_stage
from ..tokens import Keep, TokenSet
from .decode_topk import DecodeTopK


@register_stage("mustdrop_cache")
class MustDropCache(DecodeTopK):
    """``decode_topk`` that keeps the whole final set at its default budget."""

    default_keep: ClassVar[float] = 1.0

    def select(self, tokens: TokenSet, k: int) -> Keep:
        n = tokens.num_tokens
        if k >= n:  # the authors' policy: the final kept set, whole
            return Keep(indices=torch.arange(n, device=tokens.features.device).expand(tokens.batch_size, n))
        return super().select(tokens, k)
