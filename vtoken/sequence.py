"""Shrinking a padded batch of token sequences: model-agnostic tensor code used by integrations.

After pruning, each row keeps a subset of its positions. Rows can end up with different lengths, so they
are packed again with the padding on the side the batch had (left padding stays left for generation).
Padding slots reuse the row's original padding positions where it has enough of them, so a batch in
which every row drops the same number of tokens keeps its exact padding layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Packing:
    """How to build the shrunk batch: ``index`` ``[B, L']`` are positions in the old rows, ``mask`` the new
    attention mask (1 = real token), ``left`` whether padding sits on the left."""

    index: Tensor
    mask: Tensor
    left: bool

    def gather(self, values: Tensor, pad_value: float | int | None = None) -> Tensor:
        """Gather a ``[B, L, ...]`` tensor into ``[B, L', ...]``; padding slots get ``pad_value`` if given."""
        index = self.index.reshape(*self.index.shape, *([1] * (values.dim() - 2)))
        out = values.gather(1, index.expand(*self.index.shape, *values.shape[2:]))
        if pad_value is not None:
            pad = (self.mask == 0).reshape(*self.mask.shape, *([1] * (values.dim() - 2)))
            out = out.masked_fill(pad, pad_value)
        return out


def padding_side(attention_mask: Tensor | None) -> str | None:
    """'left', 'right', or None when no row is padded."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    if bool((attention_mask[:, 0] == 0).any()):
        return "left"
    return "right"


def pack_rows(keep: Tensor, attention_mask: Tensor | None) -> Packing:
    """Pack the positions where ``keep`` ``[B, L]`` is True (and the row is not padding) into new rows."""
    batch = keep.shape[0]
    valid = keep if attention_mask is None else keep & attention_mask.bool()
    pads = (
        torch.zeros_like(keep) if attention_mask is None else ~attention_mask.bool()
    )
    side = padding_side(attention_mask)
    left = side != "right"
    counts = valid.sum(1)
    new_length = int(counts.max()) if batch else 0
    index = torch.zeros(batch, new_length, dtype=torch.long, device=keep.device)
    mask = torch.zeros(batch, new_length, dtype=torch.long, device=keep.device)
    for row in range(batch):
        content = valid[row].nonzero()[:, 0]
        need = new_length - content.numel()
        slots = pads[row].nonzero()[:, 0][:need]
        if slots.numel() < need:
            filler = torch.zeros(need - slots.numel(), dtype=torch.long, device=keep.device)
            slots = torch.cat([slots, filler])
        if left:
            index[row] = torch.cat([slots, content])
            mask[row, need:] = 1
        else:
            index[row] = torch.cat([content, slots])
            mask[row, : content.numel()] = 1
    return Packing(index=index, mask=mask, left=left)


def mask_positions(mask: Tensor) -> Tensor:
    """Position ids counted from each row's first token (padding slots get 0), as generate counts them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def gather_sequence(packing: Packing, values: Tensor, pad_value: Any = None) -> Tensor:
    """Gather a per-position tensor whose last dim is the sequence (``[B, L]`` or ``[C, B, L]``)."""
    batch = packing.index.shape[0]
    if values.dim() == 2:
        return packing.gather(values.expand(batch, -1), pad_value=pad_value)
    moved = values.expand(values.shape[0], batch, -1).permute(1, 2, 0)  # [B, L, C]
    return packing.gather(moved, pad_value=pad_value).permute(2, 0, 1)
