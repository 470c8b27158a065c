"""VScan's first stage: a global and a local scan over the encoder's attention, the rest merged in.

Paper: "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models" (Zhang et
al., TMLR 2026, arXiv 2505.22654; authors' code in Tencent/SelfEvolvingAgent, folder VScan). The paper
finds that shallow encoder layers attend to fine local detail and deep layers to a few global tokens, and
that pruning inside the language model works best at a middle layer. VScan therefore reduces twice:
this stage at the projector, then the last prompt token's attention at a middle decoder layer. vtoken
ships both as the named pipeline ``vscan`` (registered at the end of this file).

Inputs (``encoder_attn``): the attention each patch receives in two encoder layers, mean over heads and
queries: a shallow layer (local scan) and the layer producing the features the model reads (global
scan). Selection, per image, for a budget k:
1. Global scan: the ``round(k * global_share)`` patches with the most attention in the deep layer.
2. Local scan: the grid is cut into ``window`` x ``window`` windows (the last row/column of windows may
   be smaller); among the patches the global scan left, each window offers its patches in order of
   shallow-layer attention. The rest of the budget goes round by round: first every window's best,
   then every window's second best, ...; within a round the higher attention first (ties: lower index).
   An even spread over the image, with the remainder of an uneven split going to the strongest windows.
3. Merging: every patch not kept joins the kept patch whose features are most similar (cosine) and the
   kept token becomes the mean of itself and its joiners (weighted by how many original patches each
   already stands for); it keeps its place in the sequence.
Defaults: ``global_share = 0.5`` (as many global as local tokens), ``window = 4`` (36 windows on CLIP-L's
24 x 24 grid), ``local_layer`` None: the family's middle-depth default of ``encoder_attn`` (layer 9 of
CLIP-L's 24, 16 of Qwen2.5-VL's 32 blocks).

Where vtoken differs, and why:
- Scores are the attention each patch receives (mean over all queries, [CLS] included where the tower has
  one), the signal every supported family computes without attention maps; the paper ranks by [CLS]
  attention and uses exactly this mean on towers without [CLS] (Qwen2.5-VL).
- The share of global tokens, the shallow layer and the window size are this module's defaults; the
  authors' modelling files were not available to check their constants, so they are options.
- Similarity uses the token features at the site (after the projector), not the encoder's keys.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..registry import register_pipeline, register_stage
from ..tokens import Keep, TokenSet, gather_tokens, require_grid
from .base import Stage, check_count, check_encoder_layers, check_in_range, option


@register_stage("vscan_scan")
class VScanScan(Stage):
    global_share: float = option(0.5, "share of the budget chosen by the global scan (deep-layer attention); the rest "
                                      "by the local scan")
    window: int = option(4, "side of the local scan's square windows, in patches")
    local_layer: int | None = option(None, "encoder layer (from 1, negative from the end) of the local scan; None: the "
                                           "family's middle default")
    global_layer: int | None = option(None, "encoder layer (from 1, negative from the end) of the global scan; None: "
                                            "the feature layer")

    merging: ClassVar[bool] = True
    needs_grid: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_range(self, "global_share", 0.0, 1.0)
        check_count(self, "window", 1, "patches per side")
        check_encoder_layers(self, ("local_layer", "global_layer"))

    def signals(self) -> dict[str, dict[str, Any]]:
        return {"encoder_attn": {"layers": (self.local_layer, self.global_layer)}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        grid = require_grid(tokens, "vscan_scan")
        batch, n = tokens.batch_size, tokens.num_tokens
        device = tokens.features.device
        attention = tokens.signals["encoder_attn"].float()
        shallow, deep = attention[..., 0], attention[..., 1]
        kept = torch.zeros(batch, n, dtype=torch.bool, device=device)
        top_deep = torch.sort(deep, dim=-1, descending=True, stable=True).indices
        chosen = round(k * self.global_share)
        kept.scatter_(1, top_deep[:, :chosen], True)
        if k > chosen:
            kept.scatter_(1, self._local_scan(shallow, kept, grid)[:, :k - chosen], True)
        indices = kept.nonzero()[:, 1].view(batch, k)
        if k == n:
            return Keep(indices=indices)
        return merge_into(tokens, indices, kept)

    def _local_scan(self, shallow: Tensor, taken: Tensor, grid: tuple[int, int]) -> Tensor:
        """Positions ``[B, N]`` in the local scan's order: by round (each window's r-th best untaken
        patch), within a round by shallow attention; taken patches last."""
        h, w = grid
        rows = torch.arange(h * w, device=shallow.device) // w
        cols = torch.arange(h * w, device=shallow.device) % w
        per_row = -(-w // self.window)
        window_of = (rows // self.window) * per_row + cols // self.window  # [N]
        order = torch.sort(shallow.masked_fill(taken, float("-inf")), dim=-1, descending=True, stable=True).indices
        windows = window_of[order]  # [B, N], each position's window in attention order
        seen = torch.nn.functional.one_hot(windows, int(window_of.max()) + 1).cumsum(1)
        rank = seen.gather(2, windows[..., None])[..., 0] - 1  # how many of its window come before it
        rank = rank.masked_fill(taken.gather(1, order), shallow.shape[1])
        return order.gather(1, torch.sort(rank, dim=-1, stable=True).indices)


def merge_into(tokens: TokenSet, indices: Tensor, kept: Tensor) -> Keep:
    """Each token not ``kept`` joins the most similar kept one (cosine, first maximum); kept tokens become
    the weighted mean of their group, and keep their exact features when nobody joins them."""
    x = tokens.features
    batch, n, dim = x.shape
    k = indices.shape[1]
    others = (~kept).nonzero()[:, 1].view(batch, n - k)
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    joins = (gather_tokens(unit, others) @ gather_tokens(unit, indices).transpose(1, 2)).argmax(-1)  # [B, O]
    slots = torch.arange(k, device=x.device).expand(batch, k)
    assign = torch.empty(batch, n, dtype=torch.long, device=x.device)
    assign.scatter_(1, indices, slots).scatter_(1, others, joins)
    weights = tokens.token_weights().float()
    sums = torch.zeros(batch, k, dim, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, assign[..., None].expand(-1, -1, dim), x.float() * weights[..., None])
    mass = torch.zeros(batch, k, dtype=torch.float32, device=x.device).scatter_add_(1, assign, weights)
    alone = torch.zeros(batch, k, dtype=torch.long, device=x.device).scatter_add_(1, assign, torch.ones_like(assign))
    merged = (sums / mass[..., None]).to(x.dtype)
    features = torch.where((alone == 1)[..., None], gather_tokens(x, indices), merged)
    return Keep(indices=indices, features=features, assign=assign)


# VScan = the scan at the projector, then FastV's last-prompt-token attention at the middle decoder layer
# (the authors: layer 16 of LLaVA-7B's 32, 14 of Qwen2.5-VL-7B's 28; half the depth of the wrapped model).
# Their default keeps 96 tokens after the encoder and 32 from layer 16 on; with the user's keep as the
# count after the last stage, the scan keeps 3 x keep (a fraction: min(1, 3 x keep) of the tokens, FastV
# a share of what reaches it).
register_pipeline("vscan", "vscan_scan@projector+fastv@llm(16)", factors=(3, 1), depths=(None, 0.5))
