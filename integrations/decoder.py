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
- no-cache passes of the same generate call (``use_cache=False``): the whole, longer sequence runs
  again; at each site the prefill's selection is applied again, followed by every generated position,
  so the result equals the cached steps (no new selection is made on the longer sequence).
When samples of a batch keep different numbers of tokens, the shorter rows are filled with "dead"
slots (dropped positions that every query is masked from), so one rectangular cache serves the batch.

DART's text pivots are the text tokens after each row's last visual token (the question).
Per-call state (see ``vtoken.calls``): a prefill's selection lives in its call and, once the cache
exists, on the KV cache object, which every decode step carries: threads never share it, beams and
several returned sequences expand it as generate expands the batch, and a manual decode loop of
``model(...)`` calls finds it through the cache it passes back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from vtoken import calls, kernels, signals
from vtoken.calls import Call
from vtoken.pipeline import Pipeline
from vtoken.sequence import padding_side
from vtoken.sites import Site
from vtoken.stats import Stats, clock
from vtoken.tokens import TokenSet, pinned_at

from .base import SiteHooks
from .decode_site import DecodeSite, follow_rows
from .decoder_tensors import (
    cache_of,
    extend_layers,
    gather_decode_mask,
    gather_prefill_kwargs,
    last_prompt_position,
    module_rotary,
    positions_of,
    take,
    take_seq,
    take_tokens,
    text_after_visual,
)
from .grouping import run_in_groups
from .recycling import apply_merges, choose_raters, dual_text_attention, merge_targets, rater_attention
from .transitions import TransitionHooks, accumulated, instruction_attention

#: the attribute of a KV cache object that carries the llm(K) state its prefill was built with
CACHE_ATTRIBUTE = "_vtoken_decoder_calls"
#: the signals computed from layer K-1's captured input (the others: transitions.py)
FROM_LAYER_BEFORE = frozenset({signals.LAST_QUERY_ATTN, signals.KEY_NORM, signals.TEXT_TOKENS, signals.RATER_ATTN,
                               signals.TEXT_ATTN_DUAL})


@dataclass
class DecoderCall:
    """The llm(K) state of one prefill, kept for the decode steps that follow it.

    It lives in the call that prepared the prefill (``call.parts["decoder"]``) and, from the prefill
    on, on the KV cache object itself: the cache is what a decode step carries, so a manual decode
    loop over ``model(...)`` calls (each a call of its own) finds the state its cache was built with.
    """

    visual: Tensor  # [B, L] visual positions of the decoder input
    units: Tensor  # [B] images per row
    attention_mask: Tensor | None  # [B, L] 2-D padding mask of the decoder input
    length: int = 0
    index: Tensor | None = None  # [B, L'] positions (into the decoder input) still present
    dead: Tensor | None = None  # [B, L'] slots that must never be attended to
    captured: dict[int, tuple[Tensor, Any]] = field(default_factory=dict)
    keys: dict[int, Tensor] = field(default_factory=dict)  # layer -> its k_proj output in this prefill
    #: per llm(K) site: (K, index into the decoder input, dead, index into layer K's input)
    layers: list[tuple[int, Tensor, Tensor | None, Tensor]] = field(default_factory=list)
    prefilled: bool = False
    decode: Any = None  # the decode site's DecodeState, from the end of the prefill on
    transitions: dict[int, Tensor] = field(default_factory=dict)  # layer -> TTV at decoder-input positions
    copies: int = 1  # rows per prompt after expand
    raters: Tensor | None = None  # [B, L] SparseVLM's text raters, chosen from the decoder input
    merges: dict[int, Tensor] = field(default_factory=dict)  # site K -> merge targets (recycling.py)
    pinned: Tensor | None = None  # [B0, L] decoder-input positions the projector's stages pinned (before expand)

    def expand(self, batch: int) -> None:
        """Repeat each row for beam search / several returned sequences (generate expands the batch
        before the prefill, each row's copies next to each other)."""
        rows = self.visual.shape[0]
        if batch == rows:
            return
        if batch % rows:
            raise RuntimeError(f"the decoder received {batch} rows for a prefill prepared with {rows}")
        factor = batch // rows
        self.copies = factor
        self.visual = self.visual.repeat_interleave(factor, dim=0)
        self.units = self.units.repeat_interleave(factor, dim=0)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask.repeat_interleave(factor, dim=0)


@dataclass
class _Step:
    """What the layers do in one pass of the decoder."""

    mode: str  # "prefill" (select), "decode" (one cached step), "recompute" (a no-cache pass over more)
    state: DecoderCall
    #: recompute: per site K, (index into the decoder input, dead, index into layer K's input) extended
    #: by the positions generated since the prefill
    layers: dict[int, tuple[Tensor, Tensor | None, Tensor]] = field(default_factory=dict)
    current: tuple[Tensor, Tensor | None] | None = None
    decode: Any = None  # a cached step of a pipeline with a decode site: its DecodeStep
    recompute: Any = None  # a no-cache pass of such a pipeline over generated tokens: its RecomputeStep


class DecoderSites(SiteHooks):
    def __init__(self, pipeline: Pipeline, sites: list[Site], key: calls.CallKey,
                 end_call: Callable[[Call], None] | None = None, *, language_model: torch.nn.Module) -> None:
        llm_sites = [site for site in sites if site.kind == "llm"]
        decode_sites = [site for site in sites if site.kind == "decode"]
        if len(decode_sites) > 1:
            raise ValueError(f"one decode site per pipeline; got {', '.join(map(str, decode_sites))}: put the decode "
                             "stages at one of them")
        super().__init__(pipeline, llm_sites, key, end_call)
        self.lm = language_model
        self.layers = language_model.layers
        self.capture_layers = {site.layer - 1 for site in llm_sites
                               if FROM_LAYER_BEFORE & set(self.pipeline.signals_at(site))}
        self.raters_wanted = any(signals.RATER_ATTN in self.pipeline.signals_at(site) for site in llm_sites)
        spans = [(self.pipeline.signals_at(site)[signals.TOKEN_TRANSITION]["from_layer"], site.layer)
                 for site in llm_sites if signals.TOKEN_TRANSITION in self.pipeline.signals_at(site)]
        if spans:
            TransitionHooks(self.layers, min(a for a, _ in spans), max(b for _, b in spans), key, self.hooks)
        for site in llm_sites:
            wanted = self.pipeline.signals_at(site)
            if signals.INSTRUCTION_ATTN in wanted and not hasattr(self.layers[site.layer], "self_attn"):
                raise ValueError(f"instruction_attn at {site} reads decoder layer {site.layer}'s attention, which "
                                 "this model's layer lacks (a linear-attention layer); choose K before a "
                                 "full-attention layer")
        # hybrid decoders (Qwen3.5) may start with linear-attention layers: the first attention layer's rotary
        self.apply_rotary: Callable = module_rotary(next(layer.self_attn for layer in self.layers
                                                         if hasattr(layer, "self_attn")))
        self.decode = (DecodeSite(pipeline, decode_sites[0], language_model, self.apply_rotary)
                       if decode_sites else None)
        if self.decode is not None:  # every layer's mask follows its own entries
            first = 0
        else:
            first = min(min(self.sites) - 1, *self.capture_layers) if self.capture_layers else min(self.sites)
        self.hooks.add(language_model.register_forward_pre_hook(self._on_decoder, with_kwargs=True))
        self.hooks.add(language_model.register_forward_hook(self._after_decoder, always_call=True))
        for index in range(first, len(self.layers)):
            self.hooks.add(
                self.layers[index].register_forward_pre_hook(partial(self._on_layer, index), with_kwargs=True)
            )
        for index in self.capture_layers:
            projection = getattr(self.layers[index].self_attn, "k_proj", None)
            if isinstance(projection, torch.nn.Module):
                self.hooks.add(projection.register_forward_hook(partial(self._on_keys, index)))

    def expect_prefill(self, call: Call, prefill: Any) -> None:
        """Called by the integration right before the decoder's prefill with images."""
        call.parts["decoder"] = DecoderCall(visual=prefill.visual, units=prefill.units,
                                            attention_mask=prefill.attention_mask)

    @contextlib.contextmanager
    def prefill_scope(self, prefill: Any) -> Iterator[Call]:
        """A call of its own around a direct call of the language model (the bench's oracle)."""
        call = calls.begin(self.key, Call(kind="forward"))
        try:
            self.expect_prefill(call, prefill)
            yield call
        finally:
            calls.end(self.key, call)

    def kept_positions(self, call: Call) -> tuple[Tensor, Tensor | None] | None:
        """After a prefill: the positions of the decoder input present after the last llm(K) site, and
        the dead slots among them (None when no site ran)."""
        state = call.parts.get("decoder")
        if state is None or state.index is None:
            return None
        return state.index, state.dead

    # --- hooks -----------------------------------------------------------------------------------
    def _on_decoder(self, module: Any, args: tuple, kwargs: dict) -> None:
        call = calls.current(self.key)
        own = None
        if call is None:  # the language model called on its own (a manual decode step on it)
            call = own = calls.begin(self.key, Call(kind="language_model"))
        call.parts["decoder_owned"] = own
        cache = cache_of(kwargs)
        past = 0 if cache is None else cache.get_seq_length()
        embeds = kwargs.get("inputs_embeds")
        length = embeds.shape[1] if embeds is not None else (args[0] if args else kwargs["input_ids"]).shape[1]
        batch = embeds.shape[0] if embeds is not None else (args[0] if args else kwargs["input_ids"]).shape[0]
        state: DecoderCall | None = call.parts.get("decoder")
        step = None
        if past > 0:
            attached = getattr(cache, CACHE_ATTRIBUTE, {}).get(self.key)
            if attached is not None:
                step = _Step("decode", attached)
                if attached.decode is not None:
                    step.decode = self.decode.begin_step(attached.decode, kwargs, cache,
                                                         generating=call.kind == "generate")
        elif state is not None and not state.prefilled:
            state.expand(batch)
            state.length = length
            if length != state.visual.shape[1]:
                raise RuntimeError(f"the decoder received {length} positions, but the prefill that was "
                                   f"prepared for it had {state.visual.shape[1]}")
            step = _Step("prefill", state)
            if self.raters_wanted:
                ids = None if embeds is not None else (args[0] if args else kwargs["input_ids"])
                state.raters = choose_raters(embeds if ids is None else self.lm.embed_tokens(ids), state.visual,
                                             state.attention_mask)
        elif state is not None and length >= state.length and (state.layers or state.decode is not None):
            step = _Step("recompute", state, layers=extend_layers(state, length))
            if state.decode is not None and length > state.length:
                step.recompute = self.decode.begin_recompute(state.decode, call.parts.get("decoder_generated"),
                                                             length)
        call.parts["decoder_step"] = step

    def _after_decoder(self, module: Any, args: tuple, output: Any) -> None:
        call = calls.current(self.key)
        if call is None:
            return
        step = call.parts.pop("decoder_step", None)
        if step is not None and step.mode == "prefill":
            step.state.prefilled = True
            step.state.captured.clear()
            step.state.keys.clear()
            step.state.transitions.clear()
            step.state.raters = None
            if self.decode is not None:
                state = step.state
                state.decode = self.decode.start(state.visual, state.units, state.attention_mask, state.layers,
                                                 state.copies)
        elif step is not None and step.decode is not None:
            self.decode.end_step(step.decode, step.state.decode, call.stats)
        elif step is not None and step.recompute is not None:
            self.decode.end_recompute(step.recompute, step.state.decode, call.stats)
        own = call.parts.pop("decoder_owned", None)
        if own is not None:
            self.end_call(own)

    def _on_layer(self, index: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = calls.current(self.key)
        step: _Step | None = None if call is None else call.parts.get("decoder_step")
        if step is None:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:] if args else ()
        state = step.state
        if step.mode == "prefill":
            cache = cache_of(kwargs)
            if cache is not None:
                getattr(cache, CACHE_ATTRIBUTE, None) or setattr(cache, CACHE_ATTRIBUTE, {})
                getattr(cache, CACHE_ATTRIBUTE)[self.key] = state
                if self.decode is not None:
                    follow_rows(cache, CACHE_ATTRIBUTE)
            if index in self.sites:
                hidden = self._prune(self.sites[index], hidden, state, call.stats, kwargs.get("position_embeddings"))
            if state.index is not None:
                gather_prefill_kwargs(kwargs, state.index, state.dead)
            if index in self.capture_layers:
                state.captured[index] = (hidden, kwargs.get("position_embeddings"))
        elif step.mode == "recompute":
            if index in step.layers:
                full, dead, relative = step.layers[index]
                if index in state.merges:  # the prefill's recycled tokens, merged again from the same positions
                    hidden = apply_merges(hidden, state.merges[index])
                hidden = take(hidden, relative)
                step.current = (full, dead)
            if step.current is not None:
                gather_prefill_kwargs(kwargs, *step.current)
            if step.recompute is not None:
                self.decode.recompute_layer(step.recompute, index, kwargs, hidden, step.current)
        elif step.decode is not None:
            self.decode.layer_mask(step.decode, state.decode, index, kwargs, hidden)
        elif state.layers and index >= state.layers[0][0]:
            _, layer_index, layer_dead, _ = [entry for entry in state.layers if entry[0] <= index][-1]
            gather_decode_mask(kwargs, state.length, layer_index, layer_dead)
        return (hidden, *rest), kwargs

    def _on_keys(self, index: int, module: Any, args: tuple, output: Tensor) -> None:
        call = calls.current(self.key)
        step = None if call is None else call.parts.get("decoder_step")
        if step is not None and step.mode == "prefill":
            state = step.state
            if index in state.captured and index not in state.keys:
                state.keys[index] = output

    # --- selection at llm(K) ---------------------------------------------------------------------
    def _prune(self, site: Site, hidden: Tensor, call: DecoderCall, stats: Stats, rotary: Any = None) -> Tensor:
        batch, length, _ = hidden.shape
        device = hidden.device
        index = call.index if call.index is not None else torch.arange(length, device=device).expand(batch, -1)
        alive = torch.ones(batch, length, dtype=torch.bool, device=device) if call.dead is None else ~call.dead
        visual = call.visual.gather(1, index) & alive
        attend = alive if call.attention_mask is None else alive & call.attention_mask.gather(1, index).bool()
        wanted = self.pipeline.signals_at(site)
        start = clock(device)
        text = text_after_visual(~visual & attend, visual)
        computed = self._signals(site, wanted, attend, call, (hidden, rotary, index, text))
        scoring = clock(device) - start
        normed = self.lm.norm(hidden)

        # rows with the same visual (and, for text pivots, text) counts and image count are selected together
        with_text = signals.TEXT_TOKENS in wanted
        merging = any(stage.merging for stage in self.pipeline.stages_at(site))
        targets = torch.full((batch, length), -1, dtype=torch.long, device=device) if merging else None
        keys = []
        for row in range(batch):
            n_visual = int(visual[row].sum())
            n_text = int(text[row].sum()) if with_text else 0
            keys.append((n_visual, n_text, int(call.units[row])) if n_visual else None)

        def stacked(rows: list[int]) -> TokenSet:
            rows_t = torch.tensor(rows, device=device)
            positions = positions_of(visual[rows_t])
            tokens = TokenSet.from_features(
                take(normed[rows_t], positions), units=max(int(call.units[rows[0]]), 1),
                signals={name: take_tokens(value[rows_t], positions) for name, value in computed.items()},
            )
            if with_text:
                text_positions = positions_of(text[rows_t])
                tokens.context["text_features"] = take(normed[rows_t], text_positions)
                tokens.context["text_key_norm"] = computed[signals.KEY_NORM][rows_t].gather(1, text_positions)
            if merging:  # merges are made of the residual stream, which is what the layers receive
                tokens.context["hidden"] = take(hidden[rows_t], positions)
            return tokens

        # padding is dropped as well: the short rows are refilled with dead slots below
        stay = attend & ~visual
        kept_record = stats.kept.setdefault(str(site), [None] * batch)
        for rows, _, keep in run_in_groups(self.pipeline, site, keys, stacked, stats, scoring):
            rows_t = torch.tensor(rows, device=device)
            # an adaptive stage's padding entries (after each row's count) stay dropped
            stay[rows_t[:, None], positions_of(visual[rows_t]).gather(1, keep.indices)] = keep.live()
            counts = keep.kept_counts().tolist()
            for g, row in enumerate(rows):
                kept_record[row] = keep.indices[g, :counts[g]]
            if keep.assign is not None:
                targets[rows_t] = merge_targets(length, positions_of(visual[rows_t]), keep)
        if targets is not None and bool((targets >= 0).any()):
            hidden = apply_merges(hidden, targets)
            call.merges[site.layer] = targets

        # rows may keep different counts: fill the short ones with dead slots to stay rectangular. The
        # dead slots go on the batch's padding side, so each row's tokens stay together, in order: the
        # last token of a left-padded row stays last, and next-token pairs (labels) stay adjacent.
        left = padding_side(call.attention_mask) != "right"
        new_length = int(stay.sum(1).max())
        new_index = torch.empty(batch, new_length, dtype=torch.long, device=device)
        dead = torch.zeros(batch, new_length, dtype=torch.bool, device=device)
        for row in range(batch):
            kept = stay[row].nonzero()[:, 0]
            missing = new_length - kept.numel()
            if missing:
                # any dropped position serves: a dead slot is never attended to, whatever it held
                spare = (~stay[row]).nonzero()[:, 0][:missing]
                kept = torch.cat([spare, kept] if left else [kept, spare])
                dead[row, :missing] = left
                dead[row, new_length - missing:] = not left
            new_index[row] = kept
        call.index = index.gather(1, new_index)
        call.dead = dead if bool(dead.any()) else None
        call.layers.append((site.layer, call.index, call.dead, new_index))
        self._record_layer_counts(site, call, stats)
        return take(hidden, new_index)

    def _signals(self, site: Site, wanted: dict, attend: Tensor, call: DecoderCall, here: tuple) -> dict[str, Tensor]:
        """Per-position signals ``[B, L]`` recomputed from layer K-1's own projections (TransPrune's from the
        transitions of earlier layers and layer K's projections; ``here``: layer K's input, its rotary table,
        the present positions and the instruction's)."""
        out: dict[str, Tensor] = {}
        hidden_k, rotary_k, index_k, text_k = here
        if signals.TOKEN_TRANSITION in wanted:
            first = wanted[signals.TOKEN_TRANSITION]["from_layer"]
            out[signals.TOKEN_TRANSITION] = accumulated(call, first, site.layer, index_k)
        if signals.INSTRUCTION_ATTN in wanted:
            table = tuple(t if call.index is None else take_seq(t, call.index) for t in rotary_k)
            out[signals.INSTRUCTION_ATTN] = instruction_attention(self.layers[site.layer], hidden_k, table, attend,
                                                                  text_k, self.apply_rotary)
        if signals.PINNED in wanted:  # the projector's pins at the positions still present (rows as expanded)
            out[signals.PINNED] = pinned_at(call.pinned, call.copies, index_k)
        if not (FROM_LAYER_BEFORE & set(wanted)):
            return out
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
        if signals.RATER_ATTN in wanted:
            out[signals.RATER_ATTN] = rater_attention(layer, hidden, rotary, attend, call.raters.gather(1, index_k),
                                                      self.apply_rotary)
        if signals.TEXT_ATTN_DUAL in wanted:
            out[signals.TEXT_ATTN_DUAL] = dual_text_attention(layer, hidden, rotary, attend, text_k, self.apply_rotary)
        keys = self.apply_rotary(keys, keys, cos, sin)[1]
        if signals.KEY_NORM in wanted or signals.TEXT_TOKENS in wanted:
            out[signals.KEY_NORM] = keys.transpose(1, 2).reshape(batch, length, -1).float().abs().sum(-1)
        if signals.LAST_QUERY_ATTN in wanted:
            last = last_prompt_position(attend)  # [B]
            # the norm is per position: normalising the last position alone is the same
            query_in = layer.input_layernorm(hidden.gather(1, last.view(batch, 1, 1).expand(-1, 1, hidden.shape[-1])))
            query = attention.q_proj(query_in).view(batch, 1, -1, attention.head_dim)
            heads = getattr(getattr(attention, "config", None), "num_attention_heads", query.shape[2])
            if query.shape[2] == 2 * heads:  # gated attention (Qwen3.5): per head, the query, then its output gate
                query = query.view(batch, 1, heads, 2, attention.head_dim)[:, :, :, 0]
            query = query.transpose(1, 2)
            if hasattr(attention, "q_norm"):
                query = attention.q_norm(query)
            query = self.apply_rotary(query, query, take_seq(cos, last[:, None]), take_seq(sin, last[:, None]))[0]
            rows = kernels.attention_rows(query, keys, scale=attention.scaling, key_mask=attend,
                                          causal_limit=last[:, None])
            out[signals.LAST_QUERY_ATTN] = rows[:, 0]
        return out

    def _record_layer_counts(self, site: Site, call: DecoderCall, stats: Stats) -> None:
        before = int(call.visual[0].sum())
        present = call.visual.gather(1, call.index)[0]
        after = int((present if call.dead is None else present & ~call.dead[0]).sum())
        counts = stats.llm_layer_tokens or [before] * len(self.layers)
        stats.llm_layer_tokens = counts[: site.layer] + [after] * (len(self.layers) - site.layer)

