"""Layer-wise pixel shuffle inside the vision encoder.

Paper: LaCo, "Efficient Layer Compression for Vision Encoders in MLLMs" (layer-wise pixel shuffle).
After encoder layer L, each r x r neighbourhood of patch tokens is folded into one token:
space-to-channel gives an (r^2 * D)-vector per neighbourhood, and the training-free shortcut averages
its r^2 channel groups back to D. That average is exactly the mean of the r^2 tokens, so the shortcut
is a fixed 2x2 (by default) average pooling applied mid-encoder; later layers run on N / r^2 tokens.

LaCo trains a merge layer on top of the shortcut. vtoken ships only the shortcut (no weights are
invented); ``residual`` is the extension point for a trained merge: a module mapping the
space-to-channel vector ``[..., r^2 * D]`` to ``[..., D]`` that is added to the shortcut, loadable
from a state dict with ``load_residual``.
Prefix tokens ([CLS], registers) are left to the integration, which passes only patch tokens here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..registry import register_stage
from ..tokens import Keep, TokenSet, require_grid
from .base import EncoderStage, option
from .pool import merge_cells


@register_stage("pixel_shuffle")
class PixelShuffle(EncoderStage):
    ratio: int = option(2, "r: each r x r neighbourhood becomes one token (r=1: no-op)")
    residual: Any = option(None, "optional trained merge module [.., r*r*D] -> [.., D] added to the training-free "
                                 "shortcut")

    site_kinds: ClassVar[tuple[str, ...]] = ("vision", "projector")
    budgeted: ClassVar[bool] = False
    merging: ClassVar[bool] = True
    needs_grid: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep is not None:
            raise ValueError("pixel_shuffle has a fixed ratio, not a budget: set ratio=r (tokens / r^2)")
        if self.ratio < 1:
            raise ValueError(f"pixel_shuffle ratio must be >= 1; got {self.ratio}")

    def load_residual(self, module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> "PixelShuffle":
        """Attach a trained residual merge module with its weights; returns self."""
        module.load_state_dict(state_dict)
        self.residual = module.eval()
        return self

    def output_count(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        return num_tokens // (self.ratio * self.ratio)

    def select(self, tokens: TokenSet, k: int) -> Keep:
        h, w = require_grid(tokens, "pixel_shuffle")
        r = self.ratio
        if h % r or w % r:
            raise ValueError(f"pixel_shuffle ratio {r} does not divide the {h}x{w} token grid; "
                             f"accepted ratios: {[d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]}")
        keep = merge_cells(tokens, h // r, w // r)
        if self.residual is not None:
            keep.features = keep.features + self.residual(space_to_channel(tokens.features, h, w, r))
        return keep


def space_to_channel(x: torch.Tensor, h: int, w: int, r: int) -> torch.Tensor:
    """``[B, h*w, D]`` -> ``[B, (h/r)*(w/r), r*r*D]``: each r x r neighbourhood's tokens side by side."""
    b, _, d = x.shape
    x = x.view(b, h // r, r, w // r, r, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // r) * (w // r), r * r * d)
