"""Dominant tokens by [CLS] attention plus contextual tokens merged from the rest (VisionZip).

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al., CVPR 2025);
the authors' code (dvlab-research/VisionZip) is the reference for the procedure.
Inputs: the [CLS] attention row over the patch tokens (``cls_attn``; on Qwen's tower, which has no [CLS],
the mean attention each patch receives) and the token features. Selection, per image, for a budget k:
1. Dominant: the ``k - c`` tokens with the largest [CLS] attention are kept as they are.
2. Contextual: the rest, in original order, are split into ``c`` targets, every ``step``-th token
   with ``step = max(1, rest // c)`` (the first c of them), and the others. Each other token joins
   the target it is most similar to (cosine); each target becomes the mean of itself and its joiners.
The merged token takes its target's place in the sequence, so the kept tokens stay in original order.
Default ``contextual = 10/64`` of the budget: the paper's 54 + 10 (64), 108 + 20 (128), 162 + 30 (192).

Where vtoken differs, and why:
- Similarity uses the token features at the site (after the projector at ``projector``, the block's
  output at ``vision(L)``); VisionZip uses the feature layer's attention keys (mean over heads), which
  vtoken does not capture at the projector. The procedure is the same, only the vectors compared differ.
- VisionZip keeps [CLS] as one of the dominant tokens and appends the contextual tokens after the
  dominant ones; vtoken's units are the patch tokens the language model reads (LLaVA drops [CLS]), and
  merged tokens keep their target's position.
- Means are weighted by how many original patches each token already stands for (1 unless an earlier
  stage merged), which equals the plain mean of the reference on unmerged tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..registry import register_stage
from ..tokens import Keep, TokenSet, gather_tokens, sorted_topk
from .base import Stage, option


@register_stage("visionzip")
class VisionZip(Stage):
    contextual: int | float = option(10 / 64, "contextual (merged) tokens per image: an int count, or a float in [0, "
                                              "1), a fraction of the budget (default 10/64, the paper's 10 of 64)")

    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "vision")
    merging: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        valid = (isinstance(self.contextual, int) and not isinstance(self.contextual, bool) and self.contextual >= 0) \
            or (isinstance(self.contextual, float) and 0.0 <= self.contextual < 1.0)
        if not valid:
            raise ValueError(f"visionzip contextual={self.contextual!r}; accepted: an int >= 0 (tokens per image) or a "
                             "float in [0, 1) (a fraction of the budget)")

    def signals(self) -> dict[str, dict[str, Any]]:
        return {"cls_attn": {"layers": None}}

    def contextual_count(self, k: int) -> int:
        """How many of the ``k`` kept tokens are contextual (merged) ones."""
        if isinstance(self.contextual, float):
            return min(round(k * self.contextual), k)
        return min(self.contextual, k)

    def select(self, tokens: TokenSet, k: int) -> Keep:
        x = tokens.features
        batch, n, _ = x.shape
        c = self.contextual_count(k)
        dominant = sorted_topk(tokens.signals["cls_attn"].float(), k - c)
        if c == 0:
            return Keep(indices=dominant)
        is_dominant = torch.zeros(batch, n, dtype=torch.bool, device=x.device).scatter_(1, dominant, True)
        rest = (~is_dominant).nonzero()[:, 1].view(batch, n - (k - c))  # ascending positions
        step = max(1, rest.shape[1] // c)
        is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=x.device)
        is_target[torch.arange(0, rest.shape[1], step, device=x.device)[:c]] = True
        targets, others = rest[:, is_target], rest[:, ~is_target]

        unit = torch.nn.functional.normalize(x.float(), dim=-1)
        similarity = gather_tokens(unit, others) @ gather_tokens(unit, targets).transpose(1, 2)  # [B, O, C]
        joins = similarity.argmax(dim=-1)  # first maximum on ties

        indices, order = torch.cat([dominant, targets], dim=1).sort(dim=1)
        slot_of = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=x.device).expand(batch, k))
        assign = torch.full((batch, n), -1, dtype=torch.long, device=x.device)
        assign.scatter_(1, indices, torch.arange(k, device=x.device).expand(batch, k))
        target_slots = slot_of[:, k - c:]  # the slot of each target, in target order
        assign.scatter_(1, others, target_slots.gather(1, joins))

        weights = tokens.token_weights().float()
        sums = torch.zeros(batch, k, x.shape[-1], dtype=torch.float32, device=x.device)
        sums.scatter_add_(1, assign[..., None].expand(-1, -1, x.shape[-1]), x.float() * weights[..., None])
        mass = torch.zeros(batch, k, dtype=torch.float32, device=x.device).scatter_add_(1, assign, weights)
        merged = (sums / mass[..., None]).to(x.dtype)
        # dominant tokens and unmerged targets keep their exact features (no rounding through the mean)
        alone = torch.zeros(batch, k, dtype=torch.long, device=x.device)
        alone.scatter_add_(1, assign, torch.ones_like(assign))
        features = torch.where((alone == 1)[..., None], gather_tokens(x, indices), merged)
        return Keep(indices=indices, features=features, assign=assign)
