"""Tensor code of the ``decode`` site: which KV-cache entries each decoder layer holds, and removing some.

Pure functions of tensors and cache layers (no hooks, no call state); ``decoder.py`` decides when and
what. Positions count the *sequence* a generate call runs: the decoder input of the prefill (0..P-1),
then P + s for the token consumed by decoding step s. Layers that hold the same entries form a group:
layers before the first ``llm(K)`` site hold the whole prompt, each site's layers its kept positions.
Removing entries gathers each layer's key and value tensors into new, shorter ones, so the memory of
the removed entries is released (not only masked); rows that keep different counts are filled to one
length with "dead" entries that no query may attend to, as at ``llm(K)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Entries:
    """The cache entries of the layers from ``first_layer`` up to the next group: ``position`` ``[B, C]``
    each entry's sequence position, ``live`` ``[B, C]`` whether a query may attend to it (False for
    padding and dead fillers)."""

    first_layer: int
    position: Tensor
    live: Tensor

    def select(self, rows: Tensor) -> None:
        self.position = self.position.index_select(0, rows)
        self.live = self.live.index_select(0, rows)


@dataclass
class DecodeState:
    """The decode site's per-call state (it rides on the KV cache with the rest of the decoder's state).

    groups:  what each group of layers caches (first layers first).
    visual:  ``[B, P]`` visual positions of the prefill's decoder input.
    units:   ``[B]`` images per row (a per-image budget is multiplied by it).
    steps:   cached decoding steps run so far.
    history: one ``(step, [B, k] kept visual positions, -1 filled)`` per choice, rows in the cache's order.
    copies:  rows per prompt (beams, several returned sequences: generate puts a prompt's rows together).
    store:   generation without a cache: the choices made so far along each sequence, by (prompt, the
             tokens generated), so that a beam finds its own whichever row beam search moves it to.
    """

    groups: list[Entries]
    visual: Tensor
    units: Tensor
    steps: int = 0
    history: list[tuple[int, Tensor]] = field(default_factory=list)
    copies: int = 1
    store: dict[tuple, list[tuple[int, Tensor]]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.visual.shape[1]

    def group_of(self, layer: int) -> Entries:
        return [group for group in self.groups if group.first_layer <= layer][-1]

    def select_rows(self, rows: Tensor) -> None:
        """Follow a reordering of the cache's rows (beam search keeps the best beams)."""
        rows = rows.to(self.visual.device)
        for group in self.groups:
            group.select(rows)
        self.visual = self.visual.index_select(0, rows)
        self.units = self.units.index_select(0, rows)
        self.history = [(step, kept.index_select(0, rows)) for step, kept in self.history]

    def is_visual(self, position: Tensor) -> Tensor:
        """``[B, C]``: which entries at ``position`` are visual tokens of the prompt."""
        prompt = position < self.length
        return prompt & self.visual.gather(1, position.clamp(max=self.length - 1))

    def append(self, live: Tensor) -> None:
        """Every layer cached the token of the step just run (sequence position P + steps)."""
        for group in self.groups:
            new = torch.full_like(group.position[:, :1], self.length + self.steps)
            group.position = torch.cat([group.position, new], dim=1)
            group.live = torch.cat([group.live, live[:, None].to(group.live.device)], dim=1)
        self.steps += 1


def step_mask(live: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """The attention mask of one decoding step over the cached entries ``live`` ``[B, C]`` followed by the
    step's own token: 2-D for flash attention, boolean 4-D for SDPA, additive 4-D for eager attention."""
    allowed = torch.cat([live, torch.ones_like(live[:, :1])], dim=1)
    if "flash" in implementation:
        return allowed.long()
    if implementation == "sdpa":
        return allowed[:, None, None, :]
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)
    return blocked[:, None, None, :]


def blocked_after_choices(visual: Tensor, histories: list[list[tuple[int, Tensor]]], length: int) -> Tensor:
    """Generation without a cache: ``[B, F, F]`` over sequence positions, True where the query at a
    generated position may not see a visual key that a choice made before that query's step removed.
    ``visual`` ``[B, P]``; ``histories[b]``: row b's ``(step, kept positions)`` choices; F = P + generated."""
    batch, prompt = visual.shape
    blocked = torch.zeros(batch, length, length, dtype=torch.bool, device=visual.device)
    for row, history in enumerate(histories):
        for step, kept in history:
            removed = visual[row].clone()
            removed[kept[kept >= 0]] = False
            # the token consumed by step j sits at P + j - 1; a choice after step s serves steps s + 1 on
            blocked[row, prompt + step:, :prompt] = removed
    return blocked


def allowed_as_mask(mask, blocked: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """A no-cache pass's layer mask (None, boolean or additive 4-D) with ``blocked`` ``[B, L, L]`` hidden."""
    if mask is None:
        size = blocked.shape[-1]
        allowed = torch.ones(size, size, dtype=torch.bool, device=blocked.device).tril()[None] & ~blocked
        if implementation == "sdpa":
            return allowed[:, None]
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        raise ValueError("generation without a cache under a decode stage needs eager or SDPA attention (a 4-D "
                         f"mask per query); got {type(mask).__name__} of {getattr(mask, 'dim', lambda: '?')()} dims: "
                         "use use_cache=True or attn_implementation='sdpa'")
    if mask.dtype == torch.bool:
        return mask & ~blocked[:, None]
    return mask.masked_fill(blocked[:, None], torch.finfo(mask.dtype).min)


def keep_index(stay: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``stay`` ``[B, C]`` packed to one length: ``[B, C']`` columns to keep (in order, fillers
    first) and ``[B, C']`` liveness (False for fillers, which are removed columns nobody attends to)."""
    batch = stay.shape[0]
    width = int(stay.sum(1).max())
    index = torch.empty(batch, width, dtype=torch.long, device=stay.device)
    live = torch.ones(batch, width, dtype=torch.bool, device=stay.device)
    for row in range(batch):
        kept = stay[row].nonzero()[:, 0]
        missing = width - kept.numel()
        if missing:
            spare = (~stay[row]).nonzero()[:, 0][:missing]
            kept = torch.cat([spare, kept])
            live[row, :missing] = False
        index[row] = kept
    return index, live


def shrink(state: DecodeState, chosen: Tensor, caches: list) -> None:
    """Keep, in every layer, the non-visual live entries and the visual entries at ``chosen`` ``[B, k]``
    sequence positions (-1: none); ``caches[i]`` is layer i's cache layer (``.keys``/``.values``
    ``[B, H, C, d]``). Each layer's tensors are replaced by gathered copies: the old ones are freed."""
    for number, group in enumerate(state.groups):
        picked = (group.position[:, :, None] == chosen[:, None, :]).any(-1)
        stay = group.live & (~state.is_visual(group.position) | picked)
        index, live = keep_index(stay)
        end = state.groups[number + 1].first_layer if number + 1 < len(state.groups) else len(caches)
        for layer in caches[group.first_layer:end]:
            gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather.to(layer.keys.device))
            layer.values = layer.values.gather(2, gather.to(layer.values.device))
        group.position = group.position.gather(1, index)
        group.live = live


def cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a KV cache's layers (``cache.layers``)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def generated_cache_bytes(model, inputs: dict, new_tokens: int) -> int:
    """Bytes of the KV cache that a greedy ``generate()`` of ``new_tokens`` tokens leaves: the cache its last
    decoding steps attended to. With a decode-site stage that is what the stage's choices left; without
    one, the whole prompt's. Paired with the same call on the unwrapped model, it is the KV-cache saving
    a benchmark reports for the decode site (the cache after the prefill is the same for both)."""
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    cache = getattr(output, "cache", None)
    return cache_bytes(cache if cache is not None else output.past_key_values)
