"""Tensor code of the ``llm(K)`` site: gathers at kept positions and masks with dead slots.

Pure functions of tensors (no hooks, no call state): ``decoder.py`` decides what is kept; these shrink
what each decoder layer receives to match. ``index`` ``[B, L']`` holds, per row, the positions of the
decoder input still present; ``dead`` ``[B, L']`` marks filler slots no query may attend to.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import Tensor


def gather_prefill_kwargs(kwargs: dict, index: Tensor, dead: Tensor | None) -> None:
    """A prefill layer's arguments at the kept positions ``index`` (rotary table, position ids, mask)."""
    if kwargs.get("position_embeddings") is not None:
        kwargs["position_embeddings"] = tuple(take_seq(t, index) for t in kwargs["position_embeddings"])
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = take_last(kwargs["position_ids"], index)
    mask = kwargs.get("attention_mask")
    kwargs["attention_mask"] = prefill_mask(mask, index, dead)


def prefill_mask(mask: Any, index: Tensor, dead: Tensor | None) -> Any:
    """The decoder's mask (None, 2-D padding or 4-D) for the kept positions, dead slots hidden."""
    if mask is None:
        if dead is None:
            return None  # causal over the kept tokens, which stay in order: SDPA's is_causal still holds
        size = index.shape[1]
        causal = torch.ones(size, size, dtype=torch.bool, device=index.device).tril()
        return mask_columns(causal[None, None].expand(index.shape[0], 1, size, size), dead)
    if not isinstance(mask, Tensor):
        raise ValueError("the llm(K) site supports eager, sdpa and flash attention masks; "
                         f"got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = take_last(mask, index)
        return mask if dead is None else mask.masked_fill(dead, 0)
    rows = mask.gather(2, index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    gathered = rows.gather(3, index[:, None, None, :].expand(-1, mask.shape[1], index.shape[1], -1))
    return gathered if dead is None else mask_columns(gathered, dead)


def gather_decode_mask(kwargs: dict, prefill_length: int, index: Tensor, dead: Tensor | None) -> None:
    """A decode step's mask: key columns of the kept prefill positions, then every generated one."""
    mask = kwargs.get("attention_mask")
    kv_length = None
    if isinstance(mask, Tensor):
        kv_length = mask.shape[-1]
    elif dead is None:
        return  # no mask: every cached key is attended, and this layer's cache holds only kept ones
    cache = cache_of(kwargs)
    if kv_length is None:
        # the cache's length is read from its first attention layer, which runs before every llm(K) layer
        # and has already taken this step's tokens
        kv_length = cache.get_seq_length()
    generated = torch.arange(prefill_length, kv_length, device=index.device).expand(index.shape[0], -1)
    columns = torch.cat([index, generated], dim=1)
    dead = None if dead is None else torch.cat([dead, torch.zeros_like(generated, dtype=torch.bool)], 1)
    if mask is None:
        kwargs["attention_mask"] = (~dead)[:, None, None, :]
        return
    if mask.dim() == 2:
        gathered = take_last(mask, columns)
        kwargs["attention_mask"] = gathered if dead is None else gathered.masked_fill(dead, 0)
        return
    gathered = mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    kwargs["attention_mask"] = gathered if dead is None else mask_columns(gathered, dead)


def cache_of(kwargs: dict) -> Any:
    """The KV cache a decoder or layer call received (``cache`` from transformers 5.24, ``past_key_values``
    before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def module_rotary(attention: torch.nn.Module) -> Callable:
    module = sys.modules[type(attention).__module__]
    if not hasattr(module, "apply_rotary_pos_emb"):
        raise ValueError(f"{type(attention).__name__}: no apply_rotary_pos_emb found next to it; the llm(K) site "
                         "supports Llama, Mistral and Qwen2-style decoders")
    return module.apply_rotary_pos_emb


def take(values: Tensor, positions: Tensor) -> Tensor:
    """``values[b, positions[b]]`` for ``[B, L, D]`` values."""
    return values.gather(1, positions[..., None].expand(-1, -1, values.shape[-1]))


def take_tokens(values: Tensor, positions: Tensor) -> Tensor:
    """``values[b, positions[b]]`` for ``[B, L]`` or ``[B, L, C]`` values (per-position signals)."""
    return take(values, positions) if values.dim() == 3 else values.gather(1, positions)


def take_seq(table: Tensor, index: Tensor) -> Tensor:
    """Gather a rotary table ``[..., B or 1, L, d]`` at ``[B, L']`` positions along the sequence dim."""
    batch = index.shape[0]
    table = table.expand(*table.shape[:-3], batch, *table.shape[-2:])
    lead = table.shape[:-3]
    shape = (*lead, batch, index.shape[1], table.shape[-1])
    expanded = index.view(*([1] * len(lead)), batch, index.shape[1], 1).expand(shape)
    return table.gather(-2, expanded)


def take_last(values: Tensor, index: Tensor) -> Tensor:
    """Gather ``[..., B or 1, L]`` (position ids, 2-D masks) at ``[B, L']`` along the last dim."""
    batch = index.shape[0]
    values = values.expand(*values.shape[:-2], batch, values.shape[-1])
    return values.gather(-1, index.expand(*values.shape[:-2], batch, index.shape[1]))


def positions_of(mask: Tensor) -> Tensor:
    """``[G, n]`` positions of the True entries of a ``[G, L]`` mask with n per row."""
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)


def mask_columns(mask: Tensor, dead: Tensor) -> Tensor:
    """Hide dead key columns from every query. A dead query still sees itself, so that no softmax row
    is empty (an empty row gives NaN, and NaN values leak through zero weights)."""
    blocked = dead[:, None, None, :]
    if mask.shape[-2] == mask.shape[-1]:
        eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
        blocked = blocked & ~(eye & dead[:, None, :, None])
    if mask.dtype == torch.bool:
        return mask & ~blocked
    keep = mask.masked_fill(blocked, torch.finfo(mask.dtype).min)
    if mask.shape[-2] == mask.shape[-1]:
        keep = keep.masked_fill(eye & dead[:, None, :, None], 0.0)
    return keep


def last_prompt_position(attend: Tensor) -> Tensor:
    """Index of the last attended position of each row."""
    positions = torch.arange(attend.shape[1], device=attend.device).expand_as(attend)
    return positions.masked_fill(~attend, -1).max(dim=1).values


def text_after_visual(text: Tensor, visual: Tensor) -> Tensor:
    """``[B, L]``: the ``text`` positions after each row's last visual token (DART's text pivots come
    from the text that follows the image: the question). Rows without visual tokens keep none."""
    positions = torch.arange(visual.shape[1], device=visual.device).expand_as(visual)
    last = positions.masked_fill(~visual, -1).max(dim=1, keepdim=True).values
    return text & (positions > last) & (last >= 0)


def extend_layers(state: Any, length: int) -> dict[int, tuple[Tensor, Tensor | None, Tensor]]:
    """For a no-cache pass over ``length`` positions (the prefill's plus the generated ones): each site's
    kept positions followed by every generated position, as the cached steps see them."""
    extra = length - state.length
    out = {}
    before = state.length  # length of the sequence entering the current site
    for layer, full, dead, relative in state.layers:
        batch = full.shape[0]
        generated = torch.arange(extra, device=full.device).expand(batch, extra)
        full_ext = torch.cat([full, generated + state.length], dim=1)
        relative_ext = torch.cat([relative, generated + before], dim=1)
        dead_ext = None if dead is None else torch.cat([dead, torch.zeros_like(generated, dtype=torch.bool)], 1)
        out[layer] = (full_ext, dead_ext, relative_ext)
        before = full.shape[1]
    return out
