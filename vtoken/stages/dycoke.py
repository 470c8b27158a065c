"""Token temporal merging (TTM) of DyCoke: drop the tokens of a frame that repeat the same place of an
earlier frame in its window.

Paper: Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (CVPR
2025); the authors' public code (KD-TAO/DyCoke, ``dycole_ttm`` in ``llava/model/llava_arch.py``) is the
reference for the procedure.

Inputs: a video clip's tokens at the projector with their (t, h, w) layout (``TokenSet.layout``).
Windows: the frames are cut into windows of ``window`` consecutive frames (4, the authors'). The first
frame of a window is its reference. In a window of 4 the authors compare frame 1 with frame 0, frame 2
with frame 0 and frame 3 with frame 2; in general an odd offset is compared with the even frame before it
and an even offset with the reference. Score: the cosine similarity of a token with the token at the same
(row, column) of its comparison frame. Selection: each compared frame keeps its least similar tokens,
every compared frame the same number (the authors prune a fixed share of each frame); references are kept
whole. The stage only drops tokens, as the authors' code does (the paper calls it merging).

Where vtoken differs, and why:
- Exact budget: the authors keep ``int((1 - ratio) * h * w)`` tokens per compared frame. Here the budget
  ``k`` (per clip) is met exactly: the references are kept and ``k`` minus their tokens is shared out over
  the compared frames (the first frames get one more when it does not divide).
- Budgets below the references' tokens: the authors' code cannot go there. Here the references after the
  first are then compared with the reference of the window before them and share out what is left the
  same way (the compared frames keep nothing); the clip's first frame is always kept whole, so a budget
  below one frame's ``h * w`` tokens is refused at call time.
- Every frame is handled alike: the authors' code skips the comparison with frame 2 in the clip's last
  window (``range(0, frames - 4, 4)``), reads each pair's similarity one pair early
  (``similarities[(i - 2) // 2]``) and loses the last frame of an odd count; here each frame is compared
  with its own comparison frame as the paper describes.
- Ties (equal similarity) keep the lower position.
- DyCoke's second part, pruning the visual KV cache entries while decoding, is not this stage: it is
  ``dycoke_kv`` on the ``decode`` site (``dycoke_decode.py``), composed as ``"dycoke+dycoke_kv@decode"``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..registry import register_stage
from ..tokens import Keep, TokenSet, require_clip, sorted_topk
from .base import Stage, check_count, option


@register_stage("dycoke")
class DyCoke(Stage):
    window: int = option(4, "frames per window; the first is the window's reference (4, the authors')")

    #: the whole clip, every frame on its (h, w) grid: wrap refuses it after a stage that selects a subset
    needs_grid: ClassVar[bool] = True
    #: video clips only (refused on images at call time): image-only callers such as the demo can skip it
    needs_clip: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self, "window", 2, "frames per window")

    def select(self, tokens: TokenSet, k: int) -> Keep:
        t, h, w = require_clip(tokens, "dycoke")
        per_frame = h * w
        shares = frame_shares(t, per_frame, self.window, k)
        frames = tokens.features.float().reshape(tokens.batch_size, t, per_frame, -1)
        kept = []
        for frame, share in enumerate(shares):
            base = frame * per_frame
            if share == per_frame:
                kept.append(torch.arange(base, base + per_frame, device=frames.device).expand(tokens.batch_size, -1))
            elif share > 0:
                other = comparison_frame(frame, self.window)
                similarity = torch.cosine_similarity(frames[:, frame], frames[:, other], dim=-1)
                kept.append(base + sorted_topk(-similarity, share))
        return Keep(indices=torch.cat(kept, dim=1))


def comparison_frame(frame: int, window: int) -> int | None:
    """The earlier frame whose tokens ``frame``'s are compared with (None for the clip's first frame)."""
    offset = frame % window
    if offset == 0:
        return frame - window if frame else None  # a reference: the reference of the window before
    return frame - 1 if offset % 2 else frame - offset


def frame_shares(t: int, per_frame: int, window: int, k: int) -> list[int]:
    """Tokens each frame keeps: the first frame all, then the references, then the compared frames, each
    tier's rest shared out evenly over its frames (earlier frames first for the remainder)."""
    if k < per_frame:
        raise ValueError(f"dycoke keeps the first frame of a clip whole ({per_frame} tokens), more than the budget "
                         f"of {k} for this clip of {t} frames; raise keep to at least {per_frame} per clip")
    references = list(range(window, t, window))
    compared = [f for f in range(t) if f % window]
    shares = [0] * t
    shares[0] = per_frame
    left = k - per_frame
    for tier in (references, compared):
        if not tier:
            continue
        take = min(left, per_frame * len(tier))
        share, extra = divmod(take, len(tier))
        for rank, frame in enumerate(tier):
            shares[frame] = share + (1 if rank < extra else 0)
        left -= take
    return shares

