"""MustDrop's decode stage: the KV cache cut to the visual tokens the prefill's last site kept.

Paper: "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model" (Liu et al.,
2024; authors' code github.com/liuting20/MustDrop). Their output-aware cache policy: the prefill prunes
progressively (layers 2, 6, 10, 14), so the layers between the first and the last pruning layer cached
visual tokens that the final layers no longer have; once the prefill is done, those layers' caches are cut
to the final kept set, since the output is formed from it.

Site ``decode``: at each choice the decode site hands this stage the visual entries of the last group of
layers (what the last ``llm(K)`` site kept), and it keeps all of them; the site removes every other
visual entry from every layer's cache (freed, not masked). Compose it with the prefill filter:
``Pipeline([MustDropFilter(site="llm(3)", keep=...), ..., MustDropCache()])``.

Where vtoken differs, and why: the cut happens after the first decoding step (the decode site chooses
after a step's token is cached; the first generated token still sees the layers' own prefill entries),
and it also cuts the layers before the first pruning layer, which the authors leave whole: the decode site
keeps one set of visual entries for all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import register_stage
from ..tokens import Keep, TokenSet
from .base import Stage


@register_stage("mustdrop_cache")
@dataclass
class MustDropCache(Stage):
    site_kinds: ClassVar[tuple[str, ...]] = ("decode",)
    default_site: ClassVar[str] = "decode"
    budgeted: ClassVar[bool] = False

    def output_count(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        return num_tokens

    def select(self, tokens: TokenSet, k: int) -> Keep:
        n = tokens.num_tokens
        return Keep(indices=torch.arange(n, device=tokens.features.device).expand(tokens.batch_size, n))
