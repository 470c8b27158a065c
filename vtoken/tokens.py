"""TokenSet (the visual tokens at a site) and Keep (what a stage decided to keep)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

#: why a grid-merging stage cannot run on these tokens (``wrap`` refuses the pipeline shapes that cause it
#: where it can; what is left is input-dependent)
NO_GRID = ("{stage} needs the tokens on one full (h, w) grid, and these form none: a video clip's tokens "
           "span several frames (on Qwen2-VL pass video_budget='frame' to merge frame by frame), or the "
           "integration gives no grid here (e.g. a vision_feature_select_strategy that keeps [CLS])")


@dataclass
class TokenSet:
    """The visual tokens of a batch of units (images, or samples at an ``llm`` site) at one site.

    features: ``[B, N, D]`` token features at the site.
    index:    ``[B, N]`` original index of each token within its unit (0..N0-1 before any pruning).
    grid:     ``(h, w)`` while the tokens still form the full row-major grid, else None.
    weights:  ``[B, N]`` how many original patches each token stands for (1 unless merged).
    signals:  per-token signals a stage asked for, each ``[B, N, ...]`` (e.g. ``"cls_attn"``); they are
              gathered together with the tokens.
    context:  per-unit data that is not per token (e.g. text-token hidden states ``[B, T, D]``).
    units:    how many budget units (images) each row holds; a per-image budget is multiplied by it.
    """

    features: Tensor
    index: Tensor
    grid: tuple[int, int] | None = None
    weights: Tensor | None = None
    signals: dict[str, Tensor] = field(default_factory=dict)
    context: dict[str, Tensor] = field(default_factory=dict)
    units: int = 1

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise ValueError(f"TokenSet.features must be [B, N, D]; got shape {tuple(self.features.shape)}")
        if self.index.shape != self.features.shape[:2]:
            raise ValueError(
                f"TokenSet.index must be [B, N] = {tuple(self.features.shape[:2])}; got {tuple(self.index.shape)}"
            )
        if self.grid is not None and self.grid[0] * self.grid[1] != self.num_tokens:
            raise ValueError(f"grid {self.grid} does not hold {self.num_tokens} tokens")

    @classmethod
    def from_features(cls, features: Tensor, grid: tuple[int, int] | None = None, **kwargs) -> "TokenSet":
        """A fresh TokenSet whose tokens are in their original order."""
        b, n = features.shape[:2]
        index = torch.arange(n, device=features.device).expand(b, n)
        return cls(features=features, index=index, grid=grid, **kwargs)

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    def token_weights(self) -> Tensor:
        if self.weights is not None:
            return self.weights
        return torch.ones(self.features.shape[:2], device=self.features.device, dtype=self.features.dtype)

    def take(self, positions: Tensor) -> "TokenSet":
        """The tokens at ``positions`` ``[B, K]`` (positions into this set), signals included; no grid."""
        return replace(
            self,
            features=gather_tokens(self.features, positions),
            index=self.index.gather(1, positions),
            grid=None,
            weights=None if self.weights is None else self.weights.gather(1, positions),
            signals={name: gather_tokens(value, positions) for name, value in self.signals.items()},
        )

    def apply(self, keep: "Keep") -> "TokenSet":
        """The TokenSet after ``keep``: kept tokens, or merged tokens for a merging stage."""
        kept = self.take(keep.indices)
        if keep.features is None:
            return kept
        weights = kept.weights
        if keep.assign is not None:
            weights = torch.zeros_like(keep.features[..., 0]).scatter_add_(
                1, keep.assign.clamp(min=0), self.token_weights() * (keep.assign >= 0)
            )
        return replace(kept, features=keep.features, grid=keep.grid, weights=weights)


@dataclass
class Keep:
    """A stage's decision for every row of a TokenSet.

    indices:  ``[B, K]`` positions (into the TokenSet) of the kept tokens, ascending. For a merging
              stage, the representative of each merged group (whose original position the merged
              token takes in the sequence).
    features: ``[B, K, D]`` replacement features for merging stages; None for pure selection.
    assign:   ``[B, N]`` for merging stages, the slot 0..K-1 each input token was merged into
              (-1 = dropped); None for pure selection.
    grid:     the grid the kept tokens form, when they still form one (spatial pooling).
    """

    indices: Tensor
    features: Tensor | None = None
    assign: Tensor | None = None
    grid: tuple[int, int] | None = None

    @property
    def num_kept(self) -> int:
        return self.indices.shape[1]


def gather_tokens(values: Tensor, positions: Tensor) -> Tensor:
    """``values[b, positions[b]]`` for a ``[B, N, ...]`` tensor and ``[B, K]`` positions."""
    index = positions.reshape(*positions.shape, *([1] * (values.dim() - 2)))
    return values.gather(1, index.expand(*positions.shape, *values.shape[2:]))


def sorted_topk(scores: Tensor, k: int) -> Tensor:
    """Positions of the k largest scores per row, in ascending position order (ties: lower index)."""
    # A stable descending sort breaks ties towards the lower index, which keeps selections deterministic
    # across devices where topk's tie order is unspecified.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values
