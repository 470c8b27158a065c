"""Random selection: the baseline every pruning paper should beat (and published benchmarks find hard to
beat at moderate budgets). Seeded, so a given seed and input always give the same tokens; each row of a
batch draws from the same stream, so a sample's choice does not depend on its batch neighbours."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..registry import register_stage
from ..tokens import Keep, TokenSet, sorted_topk
from .base import Stage, option


@register_stage("random")
class RandomKeep(Stage):
    seed: int = option(0, "random seed; the same seed keeps the same positions")

    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "vision", "llm")

    def select(self, tokens: TokenSet, k: int) -> Keep:
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(tokens.num_tokens, generator=generator).to(tokens.features.device)
        return Keep(indices=sorted_topk(scores.expand(tokens.batch_size, -1), k))
