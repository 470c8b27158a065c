"""The ``llm(K)`` site inside a Hugging Face decoder (Llama, Mistral, Qwen2 layouts).

Map of the decoder: ``lm.layers[i]`` (``input_layernorm``, ``self_attn`` with ``q_proj``/``k_proj``,
``head_dim``, ``scaling``), ``lm.norm``; the decoder computes one causal mask and one rotary table for
the whole stack and passes them to every layer as keyword arguments.

What happens (forward pre-hooks only; the decoder's own forward is untouched):
- prefill, layer K-1: its input hidden states, rotary table and the output of its own ``k_proj`` are
  captured, for the signals: FastV's last-query attention row (one query recomputed with the layer's
  ``q_proj``, against the captured keys, through ``vtoken.kernels``) and DART's key norms. No attention
  map is ever asked of the model, and the keys are not computed twice (if ``k_proj`` is never called as
  a module, e.g. fused projections, the keys are recomputed from the captured input).
- prefill, layer K: the stages select visual tokens per sample; the hidden states shrink to the text
  tokens plus the kept visual tokens, in original order.
- prefill, layers >= K: the rotary table, position ids and mask are gathered at the kept positions,
  so kept tokens keep their original rotary positions and the causal/padding mask stays right.
  These layers therefore cache only the kept tokens; layers < K cache every token.
- decode steps, layers >= K: the mask's key columns are gathered the same way (kept prefill
  positions, then every generated position), so each layer attends exactly to its own cache.
When samples of a batch keep different numbers of tokens, the shorter rows are filled with "dead"
slots (dropped positions that every query is masked from), so one rectangular cache serves the batch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from vtoken import kernels
from vtoken.sites import Site
from vtoken.tokens import TokenSet

from vtoken.stats import clock


@dataclass
class _Call:
    """State of one prefill and the decode steps that follow it."""

    visual: Tensor  # [B, L] visual positions of the decoder input
    units: Tensor  # [B] images per row
    attention_mask: Tensor | None  # [B, L] 2-D padding mask of the decoder input
    length: int = 0
    index: Tensor | None = None  # [B, L'] positions (into the decoder input) still present
    dead: Tensor | None = None  # [B, L'] slots that must never be attended to
    captured: dict[int, tuple[Tensor, Any]] = field(default_factory=dict)
    keys: dict[int, Tensor] = field(default_factory=dict)  # layer -> its k_proj output in this prefill
    #: (K, index, dead) after each llm(K) site, for the decode steps of layers >= K
    layers: list[tuple[int, Tensor, Tensor | None]] = field(default_factory=list)
    in_prefill: bool = True


class DecoderSites:
    def __init__(self, integration: Any, language_model: torch.nn.Module, sites: list[Site]) -> None:
        self.integration = integration
        self.pipeline = integration.pipeline
        self.stats = integration.stats
        self.lm = language_model
        self.layers = language_model.layers
        self.sites = {site.layer: site for site in sites}
        self.capture_layers = {site.layer - 1 for site in sites if self.pipeline.signals_at(site)}
        self.apply_rotary: Callable = _module_rotary(self.layers[0].self_attn)
        self.pending: _Call | None = None
        self.call: _Call | None = None
        first = min(min(self.sites) - 1, *self.capture_layers) if self.capture_layers else min(self.sites)
        self.handles = [language_model.register_forward_pre_hook(self._on_decoder, with_kwargs=True)]
        for index in range(first, len(self.layers)):
            self.handles.append(
                self.layers[index].register_forward_pre_hook(partial(self._on_layer, index), with_kwargs=True)
            )
        for index in self.capture_layers:
            projection = getattr(self.layers[index].self_attn, "k_proj", None)
            if isinstance(projection, torch.nn.Module):
                self.handles.append(projection.register_forward_hook(partial(self._on_keys, index)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.pending = self.call = None

    def expect_prefill(self, prefill: Any) -> None:
        """Called by the integration right before the decoder's prefill with images."""
        self.pending = _Call(visual=prefill.visual, units=prefill.units, attention_mask=prefill.attention_mask)

    # --- hooks -----------------------------------------------------------------------------------
    def _on_decoder(self, module: Any, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill:
            self.call, self.pending = self.pending, None
            if self.call is not None:
                embeds = kwargs.get("inputs_embeds")
                self.call.length = embeds.shape[1] if embeds is not None else args[0].shape[1]
                if self.call.length != self.call.visual.shape[1]:
                    raise RuntimeError(f"the decoder received {self.call.length} positions, but the prefill that was "
                                       f"prepared for it had {self.call.visual.shape[1]}")
        elif self.call is not None:
            self.call.in_prefill = False

    def _on_layer(self, index: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.call
        if call is None:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:] if args else ()
        if call.in_prefill:
            if index in self.sites:
                hidden = self._prune(self.sites[index], hidden, call)
            if call.index is not None:
                self._gather_prefill_kwargs(kwargs, call)
            if index in self.capture_layers:
                call.captured[index] = (hidden, kwargs.get("position_embeddings"))
        elif call.layers and index >= call.layers[0][0]:
            _, layer_index, layer_dead = [entry for entry in call.layers if entry[0] <= index][-1]
            self._gather_decode_mask(kwargs, call, layer_index, layer_dead)
        return (hidden, *rest), kwargs

    def _on_keys(self, index: int, module: Any, args: tuple, output: Tensor) -> None:
        call = self.call
        if call is not None and call.in_prefill and index in call.captured and index not in call.keys:
            call.keys[index] = output

    # --- selection at llm(K) ---------------------------------------------------------------------
    def _prune(self, site: Site, hidden: Tensor, call: _Call) -> Tensor:
        batch, length, _ = hidden.shape
        device = hidden.device
        index = call.index if call.index is not None else torch.arange(length, device=device).expand(batch, -1)
        alive = torch.ones(batch, length, dtype=torch.bool, device=device) if call.dead is None else ~call.dead
        visual = call.visual.gather(1, index) & alive
        attend = alive if call.attention_mask is None else alive & call.attention_mask.gather(1, index).bool()
        wanted = self.pipeline.signals_at(site)
        start = clock(device)
        signals = self._signals(site, wanted, attend, call)
        scoring = clock(device) - start
        normed = self.lm.norm(hidden)
        text = _text_after_first_visual(~visual & attend, visual)

        # rows with the same visual/text counts and image count are selected together
        groups: dict[tuple[int, int, int], list[int]] = {}
        for row in range(batch):
            key = (int(visual[row].sum()), int(text[row].sum()), int(call.units[row]))
            groups.setdefault(key, []).append(row)
        # padding is dropped as well: the short rows are refilled with dead slots below
        stay = attend & ~visual
        kept_record = self.stats.kept.setdefault(str(site), [None] * batch)
        for (n_visual, _, units), rows in groups.items():
            if n_visual == 0:
                continue
            rows_t = torch.tensor(rows, device=device)
            positions = _positions(visual[rows_t])
            tokens = TokenSet.from_features(
                _take(normed[rows_t], positions), units=max(units, 1),
                signals={name: value[rows_t].gather(1, positions) for name, value in signals.items()},
            )
            if "text_tokens" in wanted:
                text_positions = _positions(text[rows_t])
                tokens.context["text_features"] = _take(normed[rows_t], text_positions)
                tokens.context["text_key_norm"] = signals["key_norm"][rows_t].gather(1, text_positions)
            _, keep = self.pipeline.run(site, tokens, self.stats, scoring_seconds=scoring / len(groups))
            stay[rows_t[:, None], positions.gather(1, keep.indices)] = True
            for g, row in enumerate(rows):
                kept_record[row] = keep.indices[g]

        # rows may keep different counts: fill the short ones with dead slots to stay rectangular
        new_length = int(stay.sum(1).max())
        new_index = torch.empty(batch, new_length, dtype=torch.long, device=device)
        dead = torch.zeros(batch, new_length, dtype=torch.bool, device=device)
        for row in range(batch):
            kept = stay[row].nonzero()[:, 0]
            missing = new_length - kept.numel()
            if missing:
                spare = (~stay[row]).nonzero()[:, 0][:missing]
                kept, order = torch.cat([kept, spare]).sort()
                dead[row] = order >= new_length - missing
            new_index[row] = kept
        call.index = index.gather(1, new_index)
        call.dead = dead if bool(dead.any()) else None
        call.layers.append((site.layer, call.index, call.dead))
        self._record_layer_counts(site, call)
        return _take(hidden, new_index)

    def _signals(self, site: Site, wanted: dict, attend: Tensor, call: _Call) -> dict[str, Tensor]:
        """Per-position signals ``[B, L]`` recomputed from layer K-1's own projections."""
        if not ({"last_query_attn", "key_norm", "text_tokens"} & set(wanted)):
            return {}
        layer_index = site.layer - 1
        hidden, rotary = call.captured.pop(layer_index)
        layer = self.layers[layer_index]
        attention = layer.self_attn
        batch, length, _ = hidden.shape
        projected = call.keys.pop(layer_index, None)
        if projected is None:  # k_proj was not seen running: recompute it from the captured input
            projected = attention.k_proj(layer.input_layernorm(hidden))
        keys = projected.view(batch, length, -1, attention.head_dim).transpose(1, 2)
        if hasattr(attention, "k_norm"):
            keys = attention.k_norm(keys)
        cos, sin = rotary
        keys = self.apply_rotary(keys, keys, cos, sin)[1]
        out: dict[str, Tensor] = {}
        if "key_norm" in wanted or "text_tokens" in wanted:
            out["key_norm"] = keys.transpose(1, 2).reshape(batch, length, -1).float().abs().sum(-1)
        if "last_query_attn" in wanted:
            last = _last_prompt_position(attend)  # [B]
            # the norm is per position: normalising the last position alone is the same
            query_in = layer.input_layernorm(hidden.gather(1, last.view(batch, 1, 1).expand(-1, 1, hidden.shape[-1])))
            query = attention.q_proj(query_in).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
            if hasattr(attention, "q_norm"):
                query = attention.q_norm(query)
            query = self.apply_rotary(query, query, _take_seq(cos, last[:, None]), _take_seq(sin, last[:, None]))[0]
            rows = kernels.attention_rows(query, keys, scale=attention.scaling, key_mask=attend,
                                          causal_limit=last[:, None])
            out["last_query_attn"] = rows[:, 0]
        return out

    def _record_layer_counts(self, site: Site, call: _Call) -> None:
        before = int(call.visual[0].sum())
        present = call.visual.gather(1, call.index)[0]
        after = int((present if call.dead is None else present & ~call.dead[0]).sum())
        counts = self.stats.llm_layer_tokens or [before] * len(self.layers)
        self.stats.llm_layer_tokens = counts[: site.layer] + [after] * (len(self.layers) - site.layer)

    # --- shrinking the per-layer arguments -------------------------------------------------------
    def _gather_prefill_kwargs(self, kwargs: dict, call: _Call) -> None:
        index = call.index
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = tuple(_take_seq(t, index) for t in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _take_last(kwargs["position_ids"], index)
        mask = kwargs.get("attention_mask")
        kwargs["attention_mask"] = self._prefill_mask(mask, call)

    def _prefill_mask(self, mask: Any, call: _Call) -> Any:
        index, dead = call.index, call.dead
        if mask is None:
            if dead is None:
                return None  # causal over the kept tokens, which stay in order: SDPA's is_causal still holds
            size = index.shape[1]
            causal = torch.ones(size, size, dtype=torch.bool, device=index.device).tril()
            return _mask_columns(causal[None, None].expand(index.shape[0], 1, size, size), dead)
        if not isinstance(mask, Tensor):
            raise ValueError(f"the llm(K) site supports eager, sdpa and flash attention masks; got {type(mask).__name__}")
        if mask.dim() == 2:
            mask = _take_last(mask, index)
            return mask if dead is None else mask.masked_fill(dead, 0)
        rows = mask.gather(2, index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
        gathered = rows.gather(3, index[:, None, None, :].expand(-1, mask.shape[1], index.shape[1], -1))
        return gathered if dead is None else _mask_columns(gathered, dead)

    def _gather_decode_mask(self, kwargs: dict, call: _Call, index: Tensor, dead: Tensor | None) -> None:
        mask = kwargs.get("attention_mask")
        kv_length = None
        if isinstance(mask, Tensor):
            kv_length = mask.shape[-1]
        elif dead is None:
            return  # no mask: every cached key is attended, and this layer's cache holds only kept ones
        cache = kwargs.get("past_key_values")
        if kv_length is None:
            new = kwargs.get("position_embeddings")[0].shape[-2]
            kv_length = cache.get_seq_length() + new
        generated = torch.arange(call.length, kv_length, device=index.device).expand(index.shape[0], -1)
        columns = torch.cat([index, generated], dim=1)
        dead = None if dead is None else torch.cat([dead, torch.zeros_like(generated, dtype=torch.bool)], 1)
        if mask is None:
            kwargs["attention_mask"] = (~dead)[:, None, None, :]
            return
        if mask.dim() == 2:
            gathered = _take_last(mask, columns)
            kwargs["attention_mask"] = gathered if dead is None else gathered.masked_fill(dead, 0)
            return
        gathered = mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
        kwargs["attention_mask"] = gathered if dead is None else _mask_columns(gathered, dead)


def _module_rotary(attention: torch.nn.Module) -> Callable:
    module = sys.modules[type(attention).__module__]
    if not hasattr(module, "apply_rotary_pos_emb"):
        raise ValueError(f"{type(attention).__name__}: no apply_rotary_pos_emb found next to it; the llm(K) site "
                         "supports Llama, Mistral and Qwen2-style decoders")
    return module.apply_rotary_pos_emb


def _take(values: Tensor, positions: Tensor) -> Tensor:
    """``values[b, positions[b]]`` for ``[B, L, D]`` values."""
    return values.gather(1, positions[..., None].expand(-1, -1, values.shape[-1]))


def _take_seq(table: Tensor, index: Tensor) -> Tensor:
    """Gather a rotary table ``[..., B or 1, L, d]`` at ``[B, L']`` positions along the sequence dim."""
    batch = index.shape[0]
    table = table.expand(*table.shape[:-3], batch, *table.shape[-2:])
    lead = table.shape[:-3]
    expanded = index.view(*([1] * len(lead)), batch, index.shape[1], 1).expand(*lead, batch, index.shape[1], table.shape[-1])
    return table.gather(-2, expanded)


def _take_last(values: Tensor, index: Tensor) -> Tensor:
    """Gather ``[..., B or 1, L]`` (position ids, 2-D masks) at ``[B, L']`` along the last dim."""
    batch = index.shape[0]
    values = values.expand(*values.shape[:-2], batch, values.shape[-1])
    return values.gather(-1, index.expand(*values.shape[:-2], batch, index.shape[1]))


def _positions(mask: Tensor) -> Tensor:
    """``[G, n]`` positions of the True entries of a ``[G, L]`` mask with n per row."""
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)


def _mask_columns(mask: Tensor, dead: Tensor) -> Tensor:
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


def _last_prompt_position(attend: Tensor) -> Tensor:
    """Index of the last attended position of each row."""
    positions = torch.arange(attend.shape[1], device=attend.device).expand_as(attend)
    return positions.masked_fill(~attend, -1).max(dim=1).values


def _text_after_first_visual(text: Tensor, visual: Tensor) -> Tensor:
    out = text.clone()
    if bool(visual.any()):
        out[: int(visual.float().argmax())] = False
    return out
