"""Signals the projector site computes for any vision-language model, and helpers the families use for
their own: ``prompt_text`` (the instruction's input embeddings, CDPruner) and the blocks and scores of
``encoder_attn`` (the attention each patch receives in chosen encoder layers, HiPrune)."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

from vtoken import kernels, signals

from .visual_blocks import Encoded, VisualBlock

#: the site signals of a family whose tower has no [CLS] token (SigLIP, InternViT): ``cls_attn`` at the projector
#: is the attention each patch receives, and the decoder's signals in the LLM
RECEIVED_ATTENTION_SITES: dict[str, frozenset[str]] = {"projector": frozenset({signals.CLS_ATTN}), "llm": signals.LLM}


def prompt_text(model: Any, input_ids: Tensor, mask: Tensor | None, encoded: Encoded) -> list[Tensor]:
    """Per unit, the ``prompt_text`` signal: the language model's input embeddings ``[T, D]`` of the text
    after the last visual placeholder of the unit's row (the instruction, in the usual image-then-question
    prompt), padding left out. A row whose text all comes before its images gives ``T = 0``."""
    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in {block.token_id for block in encoded.blocks}:
        visual |= input_ids == token_id
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    after = positions > torch.where(visual, positions, -1).amax(dim=1, keepdim=True)
    if mask is not None:
        after &= mask.bool()
    embed = model.get_input_embeddings()
    per_row = [embed(input_ids[row][after[row]]) for row in range(input_ids.shape[0])]
    rows = _block_rows(input_ids, encoded.blocks)
    return [per_row[rows[unit.block]] for unit in encoded.units]  # a block's views share its row's text


def _block_rows(input_ids: Tensor, blocks: list[VisualBlock]) -> list[int]:
    """The row of every visual block: blocks of one token id fill that id's placeholders in row order."""
    rows = [0] * len(blocks)
    for token_id in dict.fromkeys(block.token_id for block in blocks):
        mine = iter([b for b, block in enumerate(blocks) if block.token_id == token_id])
        for row, count in enumerate((input_ids == token_id).sum(1).tolist()):
            while count > 0:
                b = next(mine)
                rows[b] = row
                count -= blocks[b].size
    return rows


def encoder_attn_blocks(params: dict, depth: int, object_share: float, deep: int, family: str) -> list[int]:
    """The encoder blocks (0-based) of the ``encoder_attn`` signal's layers: ``params['layers']`` holds
    (object layer, deep layer) counted from 1 (negative: from the end) or None for the family's
    defaults, ``round(depth * object_share)`` and block ``deep``."""
    chosen = []
    for layer, default in zip(params.get("layers", (None, None)), (max(1, round(depth * object_share)), deep + 1)):
        layer = default if layer is None else layer
        absolute = layer if layer > 0 else depth + 1 + layer
        if not 1 <= absolute <= depth:
            raise ValueError(f"encoder layer {layer} does not exist in {family}'s {depth}-layer vision encoder; "
                             f"accepted: 1..{depth} or -{depth}..-1")
        chosen.append(absolute - 1)
    return chosen


def clip_received_attention(layer: torch.nn.Module, hidden: Tensor,
                            projected: dict[str, Tensor] | None = None) -> Tensor:
    """Attention each token receives in a CLIP or SigLIP encoder layer, mean over heads and every query
    ([CLS] included where there is one): ``[B, T]``. ``projected``: the layer's own ``q_proj`` and ``k_proj``
    outputs from the forward (``projection_hooks``); missing ones are recomputed from the layer's input
    ``hidden`` through ``layer_norm1``, which gives the same values at the cost of two projections."""
    attention = layer.self_attn
    projected = projected or {}
    batch, length, _ = hidden.shape
    normed = None if {"q_proj", "k_proj"} <= set(projected) else layer.layer_norm1(hidden)
    q, k = (projected[name] if name in projected else getattr(attention, name)(normed) for name in ("q_proj", "k_proj"))
    q = q.view(batch, length, -1, attention.head_dim).transpose(1, 2)
    k = k.view(batch, length, -1, attention.head_dim).transpose(1, 2)
    return kernels.attention_received(q, k, scale=attention.scale)  # no [T, T] map: blockwise column sums


def projection_hooks(layers: Any, wanted: list[int]) -> tuple[dict[int, dict[str, Tensor]], list[Any]]:
    """Forward hooks storing the ``q_proj`` and ``k_proj`` outputs of each wanted encoder layer, for
    forwards of this thread only (the modules are shared between threads): the store and the handles
    (hand them to ``captured_inputs``, which removes them on the way out)."""
    owner = threading.get_ident()
    store: dict[int, dict[str, Tensor]] = {}

    def keeper(index: int, name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
            if threading.get_ident() == owner:
                store.setdefault(index, {})[name] = output
        return hook

    handles = [getattr(layers[i].self_attn, name).register_forward_hook(keeper(i, name))
               for i in dict.fromkeys(wanted) for name in ("q_proj", "k_proj")]
    return store, handles


def hidden_state_blocks(requested: list[int], count: int) -> list[int]:
    """The encoder blocks that produce the hidden states ``requested`` (numbered as ``vision_feature_layer``
    counts them: hidden state h, or -h from the end, comes out of block h-1), for a tower of ``count``
    blocks; a number that names no block's output is refused with the accepted range."""
    blocks = []
    for hidden in requested:
        absolute = hidden if hidden >= 0 else count + 1 + hidden
        if not 1 <= absolute <= count:
            raise ValueError(f"cls_attn layer {hidden} is not a vision hidden state with an attention block; "
                             f"accepted: 1..{count} or -{count}..-1 (as vision_feature_layer counts)")
        blocks.append(absolute - 1)
    return blocks
