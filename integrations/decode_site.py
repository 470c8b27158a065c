"""The ``decode`` site inside a Hugging Face decoder: stages choose, while ``generate()`` decodes, which
visual entries of the KV cache the following steps keep.

``decoder.py`` owns the hooks and calls in here at four points of a generate call:
- the prefill's first layer call: the cache learns to follow beam search's row reordering (``follow_rows``);
- the end of the prefill: ``start`` records what each group of layers caches (whole prompt before the
  first ``llm(K)`` site, each site's kept positions after it);
- each cached decoding step: ``begin_step`` hands the decoder a mask over layer 0's cache (so the
  model never builds one from a cache length that removed entries no longer match), ``layer_mask``
  gives every layer the mask over its own entries, and the step's layer inputs are kept for scoring;
- the end of a step: ``end_step`` appends the step's token to every group, and on every n-th step
  (``decode(n)``) scores the visual entries with the new token's attention row (its query recomputed
  from the layer input with the layer's own ``q_proj``, against the keys already in the cache, through
  ``vtoken.kernels.attention_rows``: no attention map is asked of the model), runs the stages and
  removes the other visual entries from every layer's cache (``decode_cache.shrink``).

Choices run inside ``generate()`` only: a manual decode loop may let the model count positions from
the cache length, which removed entries would change. Positions never change: the rotary embedding
of each kept entry was applied when it was cached, and generate counts new positions itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from vtoken import kernels
from vtoken.pipeline import Pipeline
from vtoken.sites import Site
from vtoken.stats import Stats, clock
from vtoken.tokens import TokenSet

from .decode_cache import DecodeState, Entries, allowed_as_mask, blocked_after_choices, shrink, step_mask
from .decoder_tensors import positions_of, take, take_last, take_seq
from .grouping import run_in_groups


@dataclass
class DecodeStep:
    """One cached decoding step of a call whose pipeline has a decode site."""

    live: Tensor  # [B] whether the step's token may be attended (the caller's mask)
    choose: bool  # whether the stages choose after this step
    cache: Any
    masks: dict[int, Tensor] = field(default_factory=dict)  # group's first layer -> its mask
    captured: dict[int, tuple[Tensor, Any]] = field(default_factory=dict)  # layer -> (input, rotary)


@dataclass
class RecomputeStep:
    """A pass of generation without a cache over the prompt and s generated tokens: the twin of cached
    step s. Each generated query is hidden from the visual keys that the choices before its step removed,
    and a choosing step chooses from the last query's row, as the cached step does."""

    blocked: Tensor  # [B, F, F] over sequence positions
    live: Tensor  # [B, F] attendable sequence positions (no padding)
    bases: list[list[tuple[int, Tensor]]]  # per row, the choices made before this pass
    keys: list[tuple]  # per row, where this pass's choices are stored
    steps: int
    choose: bool
    captured: dict[int, tuple[Tensor, Any, Tensor, Tensor]] = field(default_factory=dict)


class DecodeSite:
    def __init__(self, pipeline: Pipeline, site: Site, language_model: torch.nn.Module,
                 apply_rotary: Callable) -> None:
        self.pipeline, self.site = pipeline, site
        self.layers = language_model.layers
        if not all(hasattr(layer, "self_attn") for layer in self.layers):
            raise ValueError(f"the {site} site removes key/value entries from every decoder layer's cache, but this "
                             "hybrid decoder's linear-attention layers keep a recurrent state instead; accepted here: "
                             "the sites before decoding (projector, llm(K))")
        self.implementation = getattr(language_model.config, "_attn_implementation", "sdpa") or "sdpa"
        self.apply_rotary = apply_rotary
        wanted = pipeline.signals_at(site).get("decode_attn")
        count = len(self.layers)
        if wanted is None:
            self.score_layers: list[int] = []
        elif wanted.get("layer") is None:
            self.score_layers = list(range(count))
        else:
            layer = wanted["layer"]
            if not -count <= layer < count:
                raise ValueError(f"decode_attn layer={layer} does not exist in this {count}-layer decoder; "
                                 f"accepted: {-count} <= layer < {count}, or None for the mean of every layer")
            self.score_layers = [layer % count]

    # --- prefill ---------------------------------------------------------------------------------
    def start(self, visual: Tensor, units: Tensor, attention_mask: Tensor | None,
              sites: list[tuple[int, Tensor, Tensor | None, Tensor]], copies: int = 1) -> DecodeState:
        """What each group of layers cached in the prefill. ``sites``: the llm(K) sites' (K, kept positions
        of the decoder input, dead slots, ...) in order."""
        batch, length = visual.shape
        mask = (torch.ones(batch, length, dtype=torch.bool, device=visual.device) if attention_mask is None
                else attention_mask.bool())
        groups = [Entries(0, torch.arange(length, device=visual.device).expand(batch, -1).clone(), mask.clone())]
        for layer, index, dead, _ in sites:
            live = take_last(mask, index)
            groups.append(Entries(layer, index.clone(), live if dead is None else live & ~dead))
        return DecodeState(groups=groups, visual=visual.bool(), units=units.clone(), copies=copies)

    # --- a decoding step -------------------------------------------------------------------------
    def begin_step(self, state: DecodeState, kwargs: dict, cache: Any, generating: bool) -> DecodeStep:
        mask = kwargs.get("attention_mask")
        batch = state.visual.shape[0]
        if isinstance(mask, Tensor) and mask.dim() == 2:
            live = mask[:, -1].bool()
        else:
            live = torch.ones(batch, dtype=torch.bool, device=state.visual.device)
        choose = generating and (state.steps + 1) % self.site.every == 0
        step = DecodeStep(live=live, choose=choose, cache=cache)
        embeds = kwargs.get("inputs_embeds")
        dtype = embeds.dtype if isinstance(embeds, Tensor) else torch.float32
        # a ready 4-D (or flash 2-D) mask over layer 0's own entries: the model uses it as given
        kwargs["attention_mask"] = self._mask(step, state.groups[0], dtype)
        return step

    def layer_mask(self, step: DecodeStep, state: DecodeState, index: int, kwargs: dict, hidden: Tensor) -> None:
        kwargs["attention_mask"] = self._mask(step, state.group_of(index), hidden.dtype)
        if step.choose and index in self.score_layers:
            step.captured[index] = (hidden, kwargs.get("position_embeddings"))

    def _mask(self, step: DecodeStep, group: Entries, dtype: torch.dtype) -> Tensor:
        if group.first_layer not in step.masks:
            step.masks[group.first_layer] = step_mask(group.live, self.implementation, dtype)
        return step.masks[group.first_layer]

    def end_step(self, step: DecodeStep, state: DecodeState, stats: Stats) -> None:
        state.append(step.live)
        if not step.choose:
            return
        device = state.visual.device
        start = clock(device)
        scores = self._scores(step, state)
        scoring = clock(device) - start
        last = state.groups[-1]
        features = step.cache.layers[len(self.layers) - 1].keys  # [B, Hk, C, d]: the last layer's keys
        features = features.transpose(1, 2).reshape(features.shape[0], features.shape[2], -1)
        candidates = last.live & state.is_visual(last.position)
        chosen = self.choose(candidates, last.position, scores, features, state.units, stats, scoring)
        shrink(state, chosen, step.cache.layers)
        state.history.append((state.steps, chosen))
        self.publish(state.visual, [[(step, kept[row]) for step, kept in state.history]
                                    for row in range(chosen.shape[0])], stats)

    def choose(self, candidates: Tensor, position: Tensor, scores: Tensor | None, features: Tensor, units: Tensor,
               stats: Stats, scoring: float) -> Tensor:
        """Run the stages on the ``candidates`` ``[B, C]`` of a frame of entries (their sequence positions
        ``position``, ``scores`` and ``features`` ``[B, C, D]``); returns the kept sequence positions
        ``[B, k]`` (-1 filled where a row keeps fewer)."""
        device, batch = candidates.device, candidates.shape[0]
        keys = [(int(candidates[row].sum()), int(units[row])) if candidates[row].any() else None
                for row in range(batch)]

        def stacked(rows: list[int]) -> TokenSet:
            rows_t = torch.tensor(rows, device=device)
            columns = positions_of(candidates[rows_t])
            return TokenSet.from_features(
                take(features[rows_t], columns), units=max(int(units[rows[0]]), 1),
                signals={"decode_attn": scores[rows_t].gather(1, columns)} if scores is not None else {})

        width = max((key[0] for key in keys if key is not None), default=0)
        chosen = torch.full((batch, width), -1, dtype=torch.long, device=device)
        for rows, _, keep in run_in_groups(self.pipeline, self.site, keys, stacked, stats, scoring):
            rows_t = torch.tensor(rows, device=device)
            picked = position[rows_t].gather(1, positions_of(candidates[rows_t]).gather(1, keep.indices))
            chosen[rows_t, : picked.shape[1]] = picked
        return chosen

    def _scores(self, step: DecodeStep, state: DecodeState) -> Tensor | None:
        """``[B, C_last]``: the new token's attention to each entry of the last group of layers, mean over
        heads and over the scoring layers (each layer's row over its own entries)."""
        if not self.score_layers:
            return None
        last = state.groups[-1]
        total = torch.zeros(last.position.shape, dtype=torch.float32, device=last.position.device)
        span = state.length + state.steps
        for index in self.score_layers:
            hidden, (cos, sin) = step.captured.pop(index)
            layer = self.layers[index]
            attention = layer.self_attn
            batch = hidden.shape[0]
            query = attention.q_proj(layer.input_layernorm(hidden)).view(batch, 1, -1, attention.head_dim)
            query = query.transpose(1, 2)
            if hasattr(attention, "q_norm"):
                query = attention.q_norm(query)
            query = self.apply_rotary(query, query, cos, sin)[0]
            group = state.group_of(index)
            row = kernels.attention_rows(query, step.cache.layers[index].keys, scale=attention.scaling,
                                         key_mask=group.live)[:, 0]
            # through sequence positions: the scoring layer's group may hold more entries than the last
            by_position = torch.zeros(batch, span, dtype=torch.float32, device=row.device)
            by_position.scatter_(1, group.position, row)
            total += by_position.gather(1, last.position)
        return total / len(self.score_layers)

    # --- generation without a cache ---------------------------------------------------------------
    def begin_recompute(self, state: DecodeState, generated: Tensor | None, length: int) -> RecomputeStep:
        """A no-cache pass over ``length`` positions; ``generated`` ``[B, s]``: the tokens generated so far."""
        steps = length - state.length
        if generated is None or generated.shape[1] != steps:
            raise RuntimeError("the decode site lost track of the tokens generated without a cache")
        bases, keys = [], []
        for row, tokens in enumerate(generated.tolist()):
            prompt = row // state.copies
            bases.append(state.store.get((prompt, tuple(tokens[:-1])), []))
            keys.append((prompt, tuple(tokens)))
        batch = generated.shape[0]
        live = torch.ones(batch, length, dtype=torch.bool, device=state.visual.device)
        prompt_live = state.groups[0].live[:, : state.length]
        live[:, : state.length] = prompt_live
        blocked = blocked_after_choices(state.visual, bases, length)
        choose = steps % self.site.every == 0
        return RecomputeStep(blocked, live, bases, keys, steps, choose)

    def recompute_layer(self, step: RecomputeStep, index: int, kwargs: dict, hidden: Tensor,
                        current: tuple[Tensor, Tensor | None] | None) -> None:
        """Hide what the choices removed from the layer's mask; keep the inputs a choosing pass scores."""
        batch, length = step.live.shape
        frame = current[0] if current is not None else torch.arange(length, device=hidden.device).expand(batch, -1)
        blocked = step.blocked.gather(1, frame[:, :, None].expand(-1, -1, length)).gather(
            2, frame[:, None, :].expand(-1, frame.shape[1], -1))
        kwargs["attention_mask"] = allowed_as_mask(kwargs.get("attention_mask"), blocked, self.implementation,
                                                   hidden.dtype)
        if step.choose and (index in self.score_layers or index == len(self.layers) - 1):
            live = step.live.gather(1, frame)
            if current is not None and current[1] is not None:
                live = live & ~current[1]
            step.captured[index] = (hidden, kwargs.get("position_embeddings"), frame, live & ~blocked[:, -1])

    def end_recompute(self, step: RecomputeStep, state: DecodeState, stats: Stats) -> None:
        histories = step.bases
        if step.choose:
            device = state.visual.device
            batch, length = step.live.shape
            start = clock(device)
            scores = None
            if self.score_layers:
                scores = sum(self._row_by_position(step, index, length) for index in self.score_layers)
                scores = scores / len(self.score_layers)
            scoring = clock(device) - start
            hidden, rotary, frame, visible = step.captured[len(self.layers) - 1]
            keys = self._keys(len(self.layers) - 1, hidden, rotary)  # [B, Hk, L', d]
            features = torch.zeros(batch, length, keys.shape[1] * keys.shape[3], dtype=keys.dtype, device=device)
            features.scatter_(1, frame[..., None].expand(-1, -1, features.shape[-1]),
                              keys.transpose(1, 2).reshape(batch, frame.shape[1], -1))
            candidates = torch.zeros(batch, length, dtype=torch.bool, device=device).scatter_(1, frame, visible)
            candidates[:, state.length:] = False
            candidates[:, : state.length] &= state.visual
            positions = torch.arange(length, device=device).expand(batch, -1)
            chosen = self.choose(candidates, positions, scores, features, state.units, stats, scoring)
            histories = [base + [(step.steps, chosen[row])] for row, base in enumerate(step.bases)]
        for key, history in zip(step.keys, histories):
            state.store[key] = history
        self.publish(state.visual, histories, stats)

    def _keys(self, index: int, hidden: Tensor, rotary: Any) -> Tensor:
        """Layer ``index``'s keys (after its norm and rotary embedding) for its input ``hidden``."""
        layer = self.layers[index]
        attention = layer.self_attn
        batch, length, _ = hidden.shape
        keys = attention.k_proj(layer.input_layernorm(hidden)).view(batch, length, -1, attention.head_dim)
        keys = keys.transpose(1, 2)
        if hasattr(attention, "k_norm"):
            keys = attention.k_norm(keys)
        cos, sin = rotary
        return self.apply_rotary(keys, keys, cos, sin)[1]

    def _row_by_position(self, step: RecomputeStep, index: int, length: int) -> Tensor:
        """The last query's attention row at layer ``index``, mean over heads, by sequence position."""
        hidden, (cos, sin), frame, visible = step.captured[index]
        layer = self.layers[index]
        attention = layer.self_attn
        batch = hidden.shape[0]
        last = torch.full((batch, 1), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
        query = attention.q_proj(layer.input_layernorm(hidden[:, -1:])).view(batch, 1, -1, attention.head_dim)
        query = query.transpose(1, 2)
        if hasattr(attention, "q_norm"):
            query = attention.q_norm(query)
        query = self.apply_rotary(query, query, take_seq(cos, last), take_seq(sin, last))[0]
        keys = self._keys(index, hidden, (cos, sin))
        row = kernels.attention_rows(query, keys, scale=attention.scaling, key_mask=visible)[:, 0]
        return torch.zeros(batch, length, dtype=torch.float32, device=row.device).scatter_(1, frame, row)

    def publish(self, visual: Tensor, histories: list[list[tuple[int, Tensor]]], stats: Stats) -> None:
        """``stats.kept['decode(n)']``: per row, one (step, kept visual tokens) per choice, the tokens as
        indices among the row's visual tokens in the decoder input (the prefill's order)."""
        rows = []
        for row, history in enumerate(histories):
            tokens = visual[row].nonzero()[:, 0]
            rows.append([(step, torch.searchsorted(tokens, kept[kept >= 0])) for step, kept in history])
        stats.kept[str(self.site)] = rows


def follow_rows(cache: Any, attribute: str) -> None:
    """Make ``cache`` carry the decode state of every call attached to it (``attribute``) through beam
    search's row reordering: the state of row i must follow the cache row that becomes row i."""
    if getattr(cache, "_vtoken_follows_rows", False) or not hasattr(cache, "reorder_cache"):
        return
    original = cache.reorder_cache

    def reorder_cache(beam_idx: Tensor) -> Any:
        result = original(beam_idx)
        for state in getattr(cache, attribute, {}).values():
            if state.decode is not None:
                state.decode.select_rows(beam_idx)
        return result

    cache.reorder_cache = reorder_cache
    cache._vtoken_follows_rows = True
