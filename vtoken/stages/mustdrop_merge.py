"""MustDrop's vision stage: spatially adjacent, similar tokens merged window by window.

Paper: "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model" (Liu et al.,
2024; authors' code github.com/liuting20/MustDrop). Followed: the grid is cut into ``window`` x ``window``
windows (the code: 3 x 3 on CLIP's 24 x 24 grid); a window's similarity is the mean cosine similarity of
its tokens' pairs (self-pairs left out); the most similar windows are merged, each into one token, the
mean of its tokens (weighted by the patches each token already stands for, as the code's size-weighted
average), which takes the sequence position of the window's last token (the code's merge destination).

Where vtoken differs, and why:
- Where: at the projector, on the projected features; the code merges after the first CLIP layer, inside
  the tower (vtoken's ``vision(L)`` sites do not run merging stages here).
- Count: the code merges every window whose similarity is >= 0.8, an input-dependent count; vtoken meets
  the budget exactly: windows merge most similar first while whole windows fit the reduction still
  needed, and the next window merges only as many of its tokens as the remainder asks (those most similar
  to the rest of the window). Fewer tokens than windows cannot be reached and are refused.
- Grids not divisible by ``window`` keep their smaller edge windows (the code asserts divisibility).

Key-token set (the code: after the last CLIP layer, the ``ceil(0.08 * n)`` of the n merged tokens with the
most [CLS] attention in that layer, mean over heads; the prefill filter never drops them): this stage pins
the ``ceil(key_share * k)`` of its k output tokens with the most ``cls_attn`` of encoder layer
``key_layer`` (default -1, the last, as the code), a merged token scoring the patch-weighted mean of its
members' attention (the code's merged token is one key in that layer, attended about as much as each of
the similar keys it replaces). The pins ride with the tokens into the decoder (``Keep.pinned``, the
``pinned`` signal); ``mustdrop_filter`` keeps them first. vtoken's [CLS] row is computed on the unmerged
patches (the merge runs after the tower here), which the code computes on the merged sequence.
``key_share=0`` pins nothing and asks for no signal.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..registry import register_stage
from ..tokens import NO_GRID, Keep, TokenSet, sorted_topk
from .base import Stage, check_encoder_layers, option


def windows_of(h: int, w: int, size: int) -> list[list[int]]:
    """Row-major positions of each ``size`` x ``size`` window of an h x w grid, windows in row-major order."""
    return [[r * w + c for r in range(top, min(top + size, h)) for c in range(left, min(left + size, w))]
            for top in range(0, h, size) for left in range(0, w, size)]


def merge_groups(x: Tensor, windows: list[list[int]], reduce: int) -> list[list[int]]:
    """Groups of token positions (each a merged token, singletons kept) that remove exactly ``reduce``."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    sims = []
    for members in windows:
        m = len(members)
        pair = unit[members] @ unit[members].T
        sims.append(float((pair.sum() - pair.diagonal().sum()) / (m * (m - 1))) if m > 1 else float("-inf"))
    order = sorted(range(len(windows)), key=lambda i: (-sims[i], i))
    merged: dict[int, list[int]] = {}
    for i in order:
        if reduce == 0:
            break
        members = windows[i]
        if len(members) < 2:
            continue
        if len(members) - 1 > reduce:  # a partial window: the tokens most similar to the rest of it
            pair = unit[members] @ unit[members].T
            closeness = (pair.sum(-1) - pair.diagonal()) / (len(members) - 1)
            ranked = torch.sort(closeness, descending=True, stable=True).indices[: reduce + 1]
            members = sorted(members[j] for j in ranked.tolist())
        merged[members[-1]] = members
        reduce -= len(members) - 1
    taken = {p for members in merged.values() for p in members}
    groups = [[p] for p in range(x.shape[0]) if p not in taken] + list(merged.values())
    return sorted(groups, key=lambda members: members[-1])


@register_stage("mustdrop_merge")
class MustDropMerge(Stage):
    window: int = option(3, "side of the square windows whose tokens merge (authors' 3)")
    key_share: float = option(0.08, "share of the output tokens pinned as the key set, by [CLS] attention (authors' "
                                    "0.08; 0: none)")
    key_layer: int = option(-1, "encoder layer (from 1, negative from the end) whose [CLS] attention ranks the key set "
                                "(authors': the last)")

    site_kinds: ClassVar[tuple[str, ...]] = ("projector",)
    merging: ClassVar[bool] = True
    needs_grid: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 2:
            raise ValueError(f"mustdrop_merge.window must be >= 2; got {self.window!r}")
        if isinstance(self.key_share, bool) or not isinstance(self.key_share, (int, float)) \
                or not 0.0 <= self.key_share <= 1.0:
            raise ValueError(f"mustdrop_merge.key_share={self.key_share!r}; accepted: a float in [0, 1] "
                             "(0: no key set)")
        check_encoder_layers(self, ("key_layer",))

    def signals(self) -> dict[str, Any]:
        return {"cls_attn": {"layers": (self.key_layer,)}} if self.key_share > 0 else {}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        if tokens.grid is None:
            raise ValueError(NO_GRID.format(stage="mustdrop_merge"))
        h, w = tokens.grid
        windows = windows_of(h, w, self.window)
        if k < len(windows):
            raise ValueError(f"mustdrop_merge merges within {self.window}x{self.window} windows, so a {h}x{w} grid "
                             f"keeps at least {len(windows)} tokens; got a budget of {k}")
        batch, n, dim = tokens.features.shape
        weights = tokens.token_weights().to(tokens.features.dtype)
        indices = torch.empty(batch, k, dtype=torch.long, device=tokens.features.device)
        assign = torch.empty(batch, n, dtype=torch.long, device=tokens.features.device)
        for row in range(batch):
            for slot, members in enumerate(merge_groups(tokens.features[row], windows, n - k)):
                indices[row, slot] = members[-1]
                assign[row, members] = slot
        summed = torch.zeros(batch, k, dim, dtype=tokens.features.dtype, device=tokens.features.device)
        summed.scatter_add_(1, assign[..., None].expand(-1, -1, dim), tokens.features * weights[..., None])
        mass = torch.zeros(batch, k, dtype=weights.dtype, device=weights.device).scatter_add_(1, assign, weights)
        return Keep(indices=indices, features=summed / mass[..., None], assign=assign,
                    pinned=self._key_set(tokens, assign, k))

    def _key_set(self, tokens: TokenSet, assign: Tensor, k: int) -> Tensor | None:
        """``[B, k]`` the output tokens with the most [CLS] attention (a merged one: its members' weighted mean)."""
        if self.key_share == 0:
            return None
        weights = tokens.token_weights().float()
        attention = tokens.signals["cls_attn"].float() * weights
        score = torch.zeros(tokens.batch_size, k, device=assign.device).scatter_add_(1, assign, attention)
        score /= torch.zeros_like(score).scatter_add_(1, assign, weights)
        top = sorted_topk(score, math.ceil(self.key_share * k))
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
