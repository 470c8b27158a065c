"""``vision(L)`` sites inside Qwen2-VL's vision transformer.

Map: the tower runs all images (and video frames) of a batch as one unbatched sequence of patches;
``cu_seqlens`` bound the attention segments (one per image, one per video frame), every block gets
the 2-D rotary table ``position_embeddings`` (cos, sin; one row per patch), and the final PatchMerger
turns each run of 4 consecutive patches (a 2x2 block) into one language-model token.

To stay consistent with the PatchMerger, pruning inside the tower works on whole merge groups: a
unit is 4 consecutive patches, its features the 4 patch vectors side by side ``[4 * C]``. Selection
drops whole groups; merging (pixel_shuffle, pool) averages groups patch-slot by patch-slot, so a
merged group is still 4 patches and takes the rotary rows of its central group. After block L the
hidden states, rotary table and ``cu_seqlens`` shrink together; pre-hooks hand the shrunk ones to
the later blocks. Each attention segment (image or frame) is one budget unit.

Qwen2.5-VL is not supported here: its tower permutes patches into windows and un-permutes the merged
tokens with full-size indices inside its own forward, which pruning cannot follow without copying it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from vtoken import calls, kernels, signals
from vtoken.calls import Call
from vtoken.pipeline import Pipeline
from vtoken.sites import Site
from vtoken.stats import clock
from vtoken.tokens import TokenSet

from .base import SiteHooks
from .grouping import run_in_groups

QUERY_CHUNK = 256


def received_attention(block: torch.nn.Module, hidden: Tensor, cu_seqlens: Tensor, rotary: tuple[Tensor, Tensor],
                       apply_rotary: Callable) -> Tensor:
    """Mean attention each patch receives in ``block`` within its segment, mean over heads: ``[S]``.
    Recomputed from the block's own norm, qkv projection and rotary table, query rows in chunks."""
    attention = block.attn
    normed = block.norm1(hidden)
    length = normed.shape[0]
    q, k, _ = attention.qkv(normed).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary(q, k, *rotary)
    received = torch.zeros(length, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = k[start:end].transpose(0, 1)[None]
        total = torch.zeros(end - start, dtype=torch.float32, device=hidden.device)
        for chunk in range(start, end, QUERY_CHUNK):
            queries = q[chunk : min(chunk + QUERY_CHUNK, end)].transpose(0, 1)[None]
            total += kernels.attention_rows(queries, keys, scale=attention.scaling)[0].sum(0)
        received[start:end] = total / (end - start)
    return received


@dataclass
class _Segment:
    image: int  # which image or clip of the tower's input
    offset: int  # first merge group of this segment within its image's groups
    index: Tensor  # original merge-group index (within the image) of each current group
    grid: tuple[int, int] | None


@dataclass
class _State:
    segments: list[_Segment] = field(default_factory=list)
    cu_seqlens: Tensor | None = None
    rotary: tuple[Tensor, Tensor] | None = None
    captured: dict[str, Any] = field(default_factory=dict)


class QwenVisionSites(SiteHooks):
    def __init__(self, pipeline: Pipeline, sites: list[Site], key: calls.CallKey,
                 end_call: Callable[[Call], None] | None = None, *, visual: torch.nn.Module,
                 apply_rotary: Callable) -> None:
        super().__init__(pipeline, sites, key, end_call)
        self.visual, self.apply_rotary = visual, apply_rotary
        self.unit = visual.spatial_merge_size ** 2
        blocks = visual.blocks
        self.hooks.add(visual.register_forward_pre_hook(self._start, with_kwargs=True))
        self.hooks.add(visual.register_forward_hook(self._finish, always_call=True))
        for layer, site in self.sites.items():
            wanted = pipeline.signals_at(site)
            # the block's input (for cls_attn) and its cu_seqlens / rotary table (for the first site)
            self.hooks.add(blocks[layer].register_forward_pre_hook(
                partial(self._capture_input, signals.CLS_ATTN in wanted), with_kwargs=True))
            if signals.MLP_SHIFT in wanted:
                self.hooks.add(blocks[layer].mlp.register_forward_hook(self._capture_mlp))
            self.hooks.add(blocks[layer].register_forward_hook(partial(self._prune, site)))
        for layer in range(min(self.sites) + 1, len(blocks)):
            self.hooks.add(blocks[layer].register_forward_pre_hook(self._shrunk_kwargs, with_kwargs=True))

    def _state(self) -> _State | None:
        call = calls.current(self.key)
        return None if call is None else call.parts.get("qwen_vision")

    # --- hooks -----------------------------------------------------------------------------------
    def _start(self, module: Any, args: tuple, kwargs: dict) -> None:
        call = calls.current(self.key)
        if call is None:  # the tower called on its own: its pass is a call
            call = calls.begin(self.key, Call(kind="encoder"))
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        merge = self.visual.spatial_merge_size
        segments = []
        for image, (t, h, w) in enumerate(grid_thw.tolist()):
            per_frame = h * w // self.unit
            for frame in range(t):
                index = torch.arange(per_frame, device=grid_thw.device) + frame * per_frame
                segments.append(_Segment(image=image, offset=frame * per_frame, index=index,
                                         grid=(h // merge, w // merge)))
        call.parts["qwen_vision"] = _State(segments=segments)

    def _finish(self, module: Any, args: tuple, output: Any) -> None:
        call = calls.current(self.key)
        if call is not None and call.kind == "encoder":
            self.end_call(call)

    def _capture_input(self, wants_input: bool, module: Any, args: tuple, kwargs: dict) -> None:
        state = self._state()
        state.captured["kwargs"] = dict(kwargs)
        if wants_input:
            state.captured["input"] = args[0] if args else kwargs["hidden_states"]

    def _capture_mlp(self, module: Any, args: tuple, output: Tensor) -> None:
        self._state().captured["mlp"] = output

    def _shrunk_kwargs(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._state()
        if state is None or state.cu_seqlens is None:
            return None
        kwargs["cu_seqlens"] = state.cu_seqlens
        kwargs["position_embeddings"] = state.rotary
        if kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = int((state.cu_seqlens[1:] - state.cu_seqlens[:-1]).max())
        return args, kwargs

    def _prune(self, site: Site, module: Any, args: tuple, output: Tensor) -> Tensor:
        call = calls.current(self.key)
        state = call.parts["qwen_vision"]
        hidden = output
        device = hidden.device
        block_kwargs = state.captured.pop("kwargs")
        if state.cu_seqlens is None:  # first site: what the block itself received
            cu_seqlens, rotary = block_kwargs["cu_seqlens"], block_kwargs["position_embeddings"]
        else:
            cu_seqlens, rotary = state.cu_seqlens, state.rotary
        start = clock(device)
        per_patch: dict[str, Tensor] = {}
        if "input" in state.captured:
            block_input = state.captured.pop("input")
            per_patch[signals.CLS_ATTN] = received_attention(module, block_input, cu_seqlens, rotary, self.apply_rotary)
        if "mlp" in state.captured:
            per_patch[signals.MLP_SHIFT] = state.captured.pop("mlp").float().norm(dim=-1)
        scoring = clock(device) - start

        units = hidden.view(-1, self.unit * hidden.shape[-1])  # one row per merge group
        per_group = {name: value.view(-1, self.unit).mean(1) for name, value in per_patch.items()}
        bounds = (cu_seqlens // self.unit).tolist()
        spans = [torch.arange(bounds[s], bounds[s + 1], device=device) for s in range(len(state.segments))]
        keys = [(bounds[s + 1] - bounds[s], segment.grid) for s, segment in enumerate(state.segments)]

        def stacked(members: list[int]) -> TokenSet:
            return TokenSet(
                features=torch.stack([units[spans[s]] for s in members]), grid=state.segments[members[0]].grid,
                index=torch.stack([state.segments[s].index for s in members]),
                signals={name: torch.stack([value[spans[s]] for s in members]) for name, value in per_group.items()},
            )

        kept_rows: list[Tensor | None] = [None] * len(state.segments)
        kept_features: list[Tensor | None] = [None] * len(state.segments)
        for members, after, keep in run_in_groups(self.pipeline, site, keys, stacked, call.stats, scoring):
            for row, s in enumerate(members):
                kept_rows[s] = spans[s][keep.indices[row]]
                kept_features[s] = after.features[row]
                state.segments[s].index = after.index[row]
                state.segments[s].grid = after.grid
        rows = torch.cat(kept_rows)  # current merge groups that stay (representatives for merged ones)
        patch_rows = (rows[:, None] * self.unit + torch.arange(self.unit, device=device)).reshape(-1)
        state.rotary = tuple(t[patch_rows] for t in rotary)
        counts = torch.tensor([f.shape[0] * self.unit for f in kept_features], device=device)
        state.cu_seqlens = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(cu_seqlens.dtype)
        call.stats.kept[str(site)] = [segment.index for segment in state.segments]
        return torch.cat(kept_features).reshape(-1, hidden.shape[-1]).to(hidden.dtype)

    # --- results ---------------------------------------------------------------------------------
    def image_results(self) -> list[tuple[Tensor, tuple[int, int] | None]]:
        """Per image or clip of the tower's pass in this call: the original merge-group index of every
        surviving group, and the grid they still form (None once a selection broke it, or for
        multi-frame clips)."""
        per_image: dict[int, list[_Segment]] = {}
        for segment in self._state().segments:
            per_image.setdefault(segment.image, []).append(segment)
        results = []
        for image in sorted(per_image):
            segments = per_image[image]
            index = torch.cat([s.index for s in segments])
            grid = segments[0].grid if len(segments) == 1 else None
            results.append((index, grid))
        return results
