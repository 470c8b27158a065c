"""TransPrune's signals at an ``llm(K)`` site, computed from the decoder's own modules during the prefill.

- ``token_transition`` (TTV): a forward hook on each accumulating layer's attention block and MLP sees
  the block's (normalised) input x and its output y; per position, the transition is
  ``|y| / |x| * softmax_positions(1 - cos(x, y))`` (magnitude ratio times the share of the row's direction
  change), attention and MLP blocks added. The site sums it over the layers from ``from_layer`` to K-1,
  each layer's value kept at the positions it saw (a token dropped at an earlier site has none later).
- ``instruction_attn`` (IGA): layer K's own ``q_proj``/``k_proj`` (its norms and rotary embedding) on
  layer K's input; the attention of each text position after the row's last visual token (the
  instruction) to every position, causal, mean over heads and over the instruction, through
  ``vtoken.kernels.attention_rows`` (no attention map is asked of the model).
The softmax over positions runs over each row's attended positions only (padding and dead slots left
out), so a row gives the same transitions alone and in a padded batch.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vtoken import calls, kernels

from .decoder_tensors import take_last, take_seq


def transition(x: Tensor, y: Tensor, live: Tensor) -> Tensor:
    """``[B, L]`` TTV of one block: input ``x`` and output ``y`` ``[B, L, D]``; ``live`` ``[B, L]`` the
    positions the softmax runs over (others get 0)."""
    x, y = x.float(), y.float()
    ratio = y.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
    turn = (1 - F.cosine_similarity(x, y, dim=-1)).masked_fill(~live, float("-inf"))
    share = torch.softmax(turn, dim=-1).nan_to_num(0.0)
    return ratio * share


class TransitionHooks:
    """Forward hooks on the attention block and MLP of ``layers[first:end]`` that add each prefill's
    transitions to its decoder state (``state.transitions``, per layer, at decoder-input positions)."""

    def __init__(self, layers: Any, first: int, end: int, key: calls.CallKey, hooks: Any) -> None:
        self.key = key
        for index in range(first, end):
            layer = layers[index]
            if not (hasattr(layer, "self_attn") and hasattr(layer, "mlp")):
                raise ValueError(f"token_transition reads each layer's attention block and MLP; decoder layer {index} "
                                 "has no self_attn/mlp (a linear-attention layer?)")
            hooks.add(layer.self_attn.register_forward_hook(partial(self._on_block, index, True), with_kwargs=True))
            hooks.add(layer.mlp.register_forward_hook(partial(self._on_block, index, False), with_kwargs=True))

    def _on_block(self, index: int, attention: bool, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        call = calls.current(self.key)
        step = None if call is None else call.parts.get("decoder_step")
        if step is None or step.mode != "prefill":
            return
        state = step.state
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        y = output[0] if isinstance(output, tuple) else output
        batch, length = x.shape[:2]
        index_now = state.index if state.index is not None else torch.arange(length, device=x.device).expand(batch, -1)
        live = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        if state.attention_mask is not None:
            live &= take_last(state.attention_mask.bool(), index_now)
        if state.dead is not None:
            live &= ~state.dead
        full = torch.zeros(batch, state.length, dtype=torch.float32, device=x.device)
        full.scatter_(1, index_now, transition(x, y, live))
        state.transitions[index] = state.transitions.get(index, 0) + full


def accumulated(state: Any, first: int, end: int, index: Tensor) -> Tensor:
    """``[B, L']``: the transitions of layers ``first..end-1`` summed, at the present positions ``index``."""
    total = sum(state.transitions.get(layer, 0) for layer in range(first, end))
    if not isinstance(total, Tensor):
        return torch.zeros(index.shape, dtype=torch.float32, device=index.device)
    return total.gather(1, index)


def instruction_attention(layer: Any, hidden: Tensor, rotary: tuple[Tensor, Tensor], attend: Tensor,
                          instruction: Tensor, apply_rotary: Callable) -> Tensor:
    """``[B, L]``: mean over the ``instruction`` positions ``[B, L]`` (and heads) of their attention at
    ``layer`` to every position, from the layer's input ``hidden``; ``attend`` ``[B, L]`` the keys allowed."""
    rows, weight = query_attention_rows(layer, hidden, rotary, attend, instruction, apply_rotary)
    return (rows * weight[..., None]).sum(1) / weight.sum(1).clamp_min(1)[:, None]


def query_attention_rows(layer: Any, hidden: Tensor, rotary: tuple[Tensor, Tensor], attend: Tensor,
                         queries_at: Tensor, apply_rotary: Callable) -> tuple[Tensor, Tensor]:
    """The causal attention rows ``[B, W, L]`` (mean over heads) of the positions ``queries_at`` ``[B, L]``
    at ``layer``, each row's queries first, padded to the longest with weight 0 (``[B, W]``)."""
    instruction = queries_at
    attention = layer.self_attn
    batch, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    counts = instruction.sum(1)
    width = max(int(counts.max()), 1)
    # each row's instruction positions, padded with its last position (weight 0)
    order = torch.sort((~instruction).long(), dim=1, stable=True).indices[:, :width]
    weight = (torch.arange(width, device=hidden.device)[None] < counts[:, None]).float()
    queries = attention.q_proj(normed.gather(1, order[..., None].expand(-1, -1, normed.shape[-1])))
    queries = queries.view(batch, width, -1, attention.head_dim)
    heads = getattr(getattr(attention, "config", None), "num_attention_heads", queries.shape[2])
    if queries.shape[2] == 2 * heads:  # gated attention (Qwen3.5): per head, the query, then its output gate
        queries = queries.view(batch, width, heads, 2, attention.head_dim)[:, :, :, 0]
    queries = queries.transpose(1, 2)
    keys = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    if hasattr(attention, "q_norm"):
        queries, keys = attention.q_norm(queries), attention.k_norm(keys)
    cos, sin = rotary
    queries = apply_rotary(queries, queries, take_seq(cos, order), take_seq(sin, order))[0]
    keys = apply_rotary(keys, keys, cos, sin)[1]
    rows = kernels.attention_rows(queries, keys, scale=attention.scaling, key_mask=attend, causal_limit=order)
    return rows, weight
