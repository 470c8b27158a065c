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
#: why a temporal stage cannot run on these tokens (raised at call time, as NO_GRID is)
NO_CLIP = ("{stage} compares each token with the same place in other frames, so it needs a video clip's tokens "
           "with their (frame, row, column) layout, all of them; these are {why}. Run it at the projector "
           "on video inputs of a model whose integration gives clip layouts (Qwen2-VL, Qwen2.5-VL, Qwen3-VL "
           "with video_budget='clip'), before any stage that selects a subset")


@dataclass
class TokenSet:
    """The visual tokens of a batch of units (images, or samples at an ``llm`` site) at one site.

    features: ``[B, N, D]`` token features at the site.
    index:    ``[B, N]`` original index of each token within its unit (0..N0-1 before any pruning).
    grid:     ``(h, w)`` while the tokens still form the full row-major grid, else None.
    layout:   ``(t, h, w)`` for a video clip: the frames and the per-frame grid of the clip that ``index``
              counts in (original index = frame * h * w + row * w + column), so a stage can find the same
              place in other frames. It describes the original clip, so it stays as it is through
              ``take`` and ``apply`` (only the tokens thin out); None for images. Integrations may pass a
              clip's ``(t, h, w)`` as ``grid``: it becomes the layout, and the grid is ``(h, w)`` when the
              clip is one full frame, else None.
    weights:  ``[B, N]`` how many original patches each token stands for (1 unless merged).
    signals:  per-token signals a stage asked for, each ``[B, N, ...]`` (e.g. ``"cls_attn"``); they are
              gathered together with the tokens.
    context:  per-unit data that is not per token (e.g. text-token hidden states ``[B, T, D]``).
    units:    how many budget units (images) each row holds; a per-image budget is multiplied by it.
    pinned:   ``[B, N]`` bool, tokens an earlier stage pinned (``Keep.pinned``): gathered with the tokens, a
              merged token pinned when any of its members was; sites hand them to the stages that ask for
              the ``pinned`` signal (None: nothing pinned).
    """

    features: Tensor
    index: Tensor
    grid: tuple[int, int] | None = None
    weights: Tensor | None = None
    signals: dict[str, Tensor] = field(default_factory=dict)
    context: dict[str, Tensor] = field(default_factory=dict)
    units: int = 1
    layout: tuple[int, int, int] | None = None
    pinned: Tensor | None = None

    def __post_init__(self) -> None:
        if self.grid is not None and len(self.grid) == 3:  # a clip's (t, h, w): see the docstring
            t, h, w = self.layout = tuple(int(v) for v in self.grid)
            self.grid = (h, w) if t == 1 and h * w == self.features.shape[1] else None
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

    def clip_positions(self) -> tuple[Tensor, Tensor, Tensor]:
        """(frame, row, column) of every token ``[B, N]`` each, from ``index`` and ``layout``."""
        if self.layout is None:
            raise ValueError("these tokens have no clip layout (they are not a video clip's)")
        _, h, w = self.layout
        return self.index // (h * w), self.index % (h * w) // w, self.index % w

    def take(self, positions: Tensor) -> "TokenSet":
        """The tokens at ``positions`` ``[B, K]`` (positions into this set), signals included; no grid."""
        return replace(
            self,
            features=gather_tokens(self.features, positions),
            index=self.index.gather(1, positions),
            grid=None,
            weights=None if self.weights is None else self.weights.gather(1, positions),
            signals={name: gather_tokens(value, positions) for name, value in self.signals.items()},
            pinned=None if self.pinned is None else self.pinned.gather(1, positions),
        )

    def apply(self, keep: "Keep") -> "TokenSet":
        """The TokenSet after ``keep``: kept tokens, or merged tokens for a merging stage."""
        kept = self.take(keep.indices)
        kept.pinned = carried_pins(self.pinned, kept.pinned, keep)
        if keep.features is None:
            return kept
        weights = kept.weights
        if keep.assign is not None:
            weights = torch.zeros_like(keep.features[..., 0]).scatter_add_(
                1, keep.assign.clamp(min=0), self.token_weights() * (keep.assign >= 0)
            )
        return replace(kept, features=keep.features, grid=keep.grid, weights=weights)


def require_grid(tokens: TokenSet, stage: str) -> tuple[int, int]:
    """The ``(h, w)`` grid of tokens that still form one, or the NO_GRID error naming ``stage``."""
    if tokens.grid is None:
        raise ValueError(NO_GRID.format(stage=stage))
    return tokens.grid


def require_clip(tokens: TokenSet, stage: str) -> tuple[int, int, int]:
    """The ``(t, h, w)`` layout of a full clip's tokens, or the NO_CLIP error naming ``stage``."""
    if tokens.layout is None:
        raise ValueError(NO_CLIP.format(stage=stage, why="an image's or a single frame's tokens, with no layout"))
    t, h, w = tokens.layout
    if tokens.num_tokens != t * h * w:
        raise ValueError(NO_CLIP.format(stage=stage, why=f"{tokens.num_tokens} of the {t * h * w} tokens of a "
                                        f"{t}x{h}x{w} clip (an earlier stage selected a subset)"))
    return t, h, w


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
    counts:   ``[B]`` (long) for an adaptive stage, which keeps a different number per row: row b keeps
              only its first ``counts[b]`` entries of ``indices`` (ascending); the entries after them are
              padding, other unique positions of the row that every site ignores. None: all K are kept.
    pinned:   ``[B, K]`` bool, kept tokens the stage pins: later sites offer them to the stages that ask
              for the ``pinned`` signal (MustDrop's key set: its filter never drops them); None: no pins.
    """

    indices: Tensor
    features: Tensor | None = None
    assign: Tensor | None = None
    grid: tuple[int, int] | None = None
    counts: Tensor | None = None
    pinned: Tensor | None = None

    @property
    def num_kept(self) -> int:
        return self.indices.shape[1]

    def kept_counts(self) -> Tensor:
        """``[B]`` how many entries of each row are kept (K everywhere unless the stage is adaptive)."""
        every = torch.full(self.indices.shape[:1], self.num_kept, dtype=torch.long, device=self.indices.device)
        return every if self.counts is None else self.counts

    def live(self) -> Tensor:
        """``[B, K]`` True at the entries that are kept, False at an adaptive row's padding."""
        slots = torch.arange(self.num_kept, device=self.indices.device)
        return slots < self.kept_counts()[:, None]


def adaptive_keep(order: Tensor, counts: Tensor, k: int) -> Keep:
    """The Keep of an adaptive selection: ``order`` ``[B, N]`` ranks each row's positions best first, row b
    keeps its best ``counts[b]`` (ascending), and the next ``k - counts[b]`` of the ranking are its padding
    (ascending too), so the padded rows hold ``k`` unique positions and dropping ``counts`` gives the top k."""
    rank = torch.arange(order.shape[1], device=order.device).expand_as(order)
    top = order[:, :k]
    padding = rank[:, :k] >= counts[:, None]
    # sort kept entries before padding, each part by position: key = position (+ N for padding)
    key = top + padding.long() * order.shape[1]
    return Keep(indices=top.gather(1, key.argsort(dim=1)), counts=counts)


def carried_pins(before: Tensor | None, gathered: Tensor | None, keep: "Keep") -> Tensor | None:
    """``[B, K]`` pins after ``keep``: the pins the kept tokens carried (``gathered``; for a merge, any member's
    of ``before``) and the ones the stage sets itself."""
    pins = gathered
    if before is not None and keep.assign is not None:
        pins = torch.zeros(keep.indices.shape, dtype=torch.long, device=before.device).scatter_add_(
            1, keep.assign.clamp(min=0), (before & (keep.assign >= 0)).long()) > 0
    if keep.pinned is not None:
        pins = keep.pinned if pins is None else pins | keep.pinned
    return pins


def pinned_at(pinned: Tensor | None, copies: int, index: Tensor) -> Tensor:
    """``[B, L']`` pins at ``index``, positions into the rows of ``pinned`` ``[B0, L]`` each repeated ``copies``
    times (as generate expands a batch for beams); all False when nothing is pinned."""
    if pinned is None:
        return torch.zeros_like(index, dtype=torch.bool)
    return pinned.repeat_interleave(copies, dim=0).gather(1, index)


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
