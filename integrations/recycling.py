"""SparseVLM's pieces of the ``llm(K)`` site: its text raters, their attention, and merged (recycled) tokens.

- Raters (chosen once per prefill, from the decoder input as the authors do): the text after each row's
  last visual token (the question) is compared with the row's visual tokens by dot product; per visual
  token a softmax over the text, then the mean over the visual tokens gives each text token's relevance;
  the raters are the text tokens whose relevance is above the row's mean. Text is never pruned, so the
  raters stay valid at every later site.
- ``rater_attn``: the raters' causal attention at layer K-1 to every position, mean over heads and raters,
  recomputed from that layer's own q/k (``instruction_attention`` with the raters as its queries).
- Merges: a merging stage at an ``llm(K)`` site says, with ``Keep.assign``, which slot each visual token
  goes to. The slot's hidden state becomes the mean of the hidden states (the residual stream entering
  layer K) of the tokens assigned to it. The same ``targets`` are applied again on a no-cache pass over
  a longer sequence, whose first positions are the prefill's, so recomputation equals the cached steps.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .decoder_tensors import text_after_visual
from .transitions import instruction_attention, query_attention_rows


def choose_raters(embeds: Tensor, visual: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``[B, L]`` raters among the text after each row's last visual token, from the decoder input
    ``embeds`` ``[B, L, D]`` (``visual`` ``[B, L]``; padding, per ``attention_mask``, is no text)."""
    text = ~visual if attention_mask is None else ~visual & attention_mask.bool()
    text = text_after_visual(text, visual)
    raters = torch.zeros_like(text)
    for row in range(embeds.shape[0]):
        if not bool(visual[row].any()) or not bool(text[row].any()):
            continue
        v = embeds[row, visual[row]].float()
        t = embeds[row, text[row]].float()
        relevance = (v @ t.T).softmax(dim=-1).mean(dim=0)  # [T]
        raters[row, text[row].nonzero()[:, 0]] = relevance > relevance.mean()
    return raters


def rater_attention(layer: Any, hidden: Tensor, rotary: tuple[Tensor, Tensor], attend: Tensor, raters: Tensor,
                    apply_rotary: Callable) -> Tensor:
    """``[B, L]``: the ``raters``' attention at ``layer`` (input ``hidden``, present positions), mean over
    heads and raters; rows without raters get zeros."""
    return instruction_attention(layer, hidden, rotary, attend, raters & attend, apply_rotary)


def dual_text_attention(layer: Any, hidden: Tensor, rotary: tuple[Tensor, Tensor], attend: Tensor, text: Tensor,
                        apply_rotary: Callable) -> Tensor:
    """MustDrop's ``text_attn_dual`` ``[B, L, 2]``: the attention of the ``text`` positions at ``layer`` to every
    position, mean over heads, summed over the text (column 0) and its maximum over the text (column 1)."""
    rows, weight = query_attention_rows(layer, hidden, rotary, attend, text & attend, apply_rotary)
    total = (rows * weight[..., None]).sum(1)
    peak = rows.masked_fill(weight[..., None] == 0, 0.0).amax(1)  # attention is >= 0: padding rows add nothing
    return torch.stack([total, peak], dim=-1)


def merge_targets(length: int, visual_positions: Tensor, keep: Any) -> Tensor:
    """``[G, length]``: for each position of layer K's input, the position of the slot it merges into
    (-1: none), from a merging stage's Keep over the visual tokens at ``visual_positions`` ``[G, N]``."""
    groups = visual_positions.shape[0]
    targets = torch.full((groups, length), -1, dtype=torch.long, device=visual_positions.device)
    slots = visual_positions.gather(1, keep.indices)  # [G, K] where each slot sits
    merged = keep.assign >= 0
    member = torch.where(merged, slots.gather(1, keep.assign.clamp(min=0)), -1)
    return targets.scatter_(1, visual_positions, member)


def apply_merges(hidden: Tensor, targets: Tensor) -> Tensor:
    """``hidden`` ``[B, L, D]`` with every slot named in ``targets`` ``[B, L0 <= L]`` replaced by the mean of
    the hidden states assigned to it (a slot assigned only itself keeps its value exactly)."""
    length = targets.shape[1]
    part = hidden[:, :length]
    assigned = (targets >= 0).to(hidden.dtype)
    where = targets.clamp(min=0)
    sums = torch.zeros_like(part).scatter_add_(1, where[..., None].expand_as(part), part * assigned[..., None])
    counts = torch.zeros_like(assigned).scatter_add_(1, where, assigned)
    mean = sums / counts.clamp(min=1)[..., None]
    merged = torch.where((counts > 0)[..., None], mean, part)
    return torch.cat([merged, hidden[:, length:]], dim=1)
