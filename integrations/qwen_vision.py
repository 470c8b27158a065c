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

Qwen2.5-VL's tower runs the groups in window order and attends within windows outside its
full-attention blocks (``qwen25_windows.py``: why the partition is kept rather than whole windows
pruned, and which steps of its forward are followed). The stages see each segment's groups in raster
order with their grid, as on Qwen2-VL; the kept ones go back into window order for the later blocks,
the window ``cu_window_seqlens`` shrink with them, and the merged tokens come out in the stages' order.
``cls_attn`` at the site is the attention received within what block L attends over: the whole frame
after a full-attention block, the window after a window block (scores then compare within a window).
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
from .qwen25_windows import check_window_forward, cut_pooled, full_size_merged, shrunk_windows, window_layout


def received_attention(block: torch.nn.Module, hidden: Tensor, cu_seqlens: Tensor, rotary: tuple[Tensor, Tensor],
                       apply_rotary: Callable) -> Tensor:
    """Mean attention each patch receives in ``block`` within its segment, mean over heads: ``[S]``.
    Recomputed from the block's own norm, qkv projection and rotary table (``kernels.attention_received``)."""
    attention = block.attn
    normed = block.norm1(hidden)
    length = normed.shape[0]
    q, k, _ = attention.qkv(normed).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary(q, k, *rotary)
    received = torch.zeros(length, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):  # each segment alone, its map never built
        queries, keys = q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None]
        received[start:end] = kernels.attention_received(queries, keys, scale=attention.scaling)[0]
    return received


@dataclass
class _Segment:
    image: int  # which image or clip of the tower's input
    offset: int  # first merge group of this segment within its image's groups
    index: Tensor  # original merge-group index (within the image) of each current group
    grid: tuple[int, int] | None
    #: Qwen2.5-VL: each current group's (its representative's) place in the tower's window order; the
    #: tower holds the segment's groups sorted by it, the stages see them in ``index`` order
    place: Tensor | None = None

    def tower_rows(self) -> Tensor:
        """Where each group (in the stages' order) sits among the segment's rows in the tower."""
        if self.place is None:
            return torch.arange(self.index.numel(), device=self.index.device)
        return torch.argsort(torch.argsort(self.place))


@dataclass
class _State:
    segments: list[_Segment] = field(default_factory=list)
    cu_seqlens: Tensor | None = None
    cu_windows: Tensor | None = None  # Qwen2.5-VL: the shrunk windows of the window blocks
    windows: tuple[Tensor, Tensor] | None = None  # Qwen2.5-VL: window_layout of this pass
    rotary: tuple[Tensor, Tensor] | None = None
    captured: dict[str, Any] = field(default_factory=dict)


class QwenVisionSites(SiteHooks):
    def __init__(self, pipeline: Pipeline, sites: list[Site], key: calls.CallKey,
                 end_call: Callable[[Call], None] | None = None, *, visual: torch.nn.Module,
                 apply_rotary: Callable) -> None:
        super().__init__(pipeline, sites, key, end_call)
        self.visual, self.apply_rotary = visual, apply_rotary
        self.unit = visual.spatial_merge_size ** 2
        self.windowed = hasattr(visual, "window_size")  # Qwen2.5-VL
        if self.windowed:
            check_window_forward(visual)
        self.full_blocks = set(getattr(visual, "fullatt_block_indexes", None) or range(len(visual.blocks)))
        blocks = visual.blocks
        self.hooks.add(visual.register_forward_pre_hook(self._start, with_kwargs=True))
        self.hooks.add(visual.register_forward_hook(self._finish, always_call=True))
        if self.windowed:
            self.hooks.add(visual.merger.register_forward_hook(self._unpermute))
        for layer, site in self.sites.items():
            wanted = pipeline.signals_at(site)
            # the block's input (for cls_attn) and its cu_seqlens / rotary table (for the first site)
            self.hooks.add(blocks[layer].register_forward_pre_hook(
                partial(self._capture_input, signals.CLS_ATTN in wanted), with_kwargs=True))
            if signals.MLP_SHIFT in wanted:
                self.hooks.add(blocks[layer].mlp.register_forward_hook(self._capture_mlp))
            self.hooks.add(blocks[layer].register_forward_hook(partial(self._prune, site)))
        for layer in range(min(self.sites) + 1, len(blocks)):
            self.hooks.add(blocks[layer].register_forward_pre_hook(partial(self._shrunk_kwargs, layer),
                                                                   with_kwargs=True))

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
        windows = window_layout(self.visual, grid_thw, kwargs) if self.windowed else None
        segments, first = [], 0
        for image, (t, h, w) in enumerate(grid_thw.tolist()):
            per_frame = h * w // self.unit
            for frame in range(t):
                index = torch.arange(per_frame, device=grid_thw.device) + frame * per_frame
                place = None if windows is None else windows[0][first : first + per_frame]
                segments.append(_Segment(image=image, offset=frame * per_frame, index=index,
                                         grid=(h // merge, w // merge), place=place))
                first += per_frame
        call.parts["qwen_vision"] = _State(segments=segments, windows=windows)

    def _finish(self, module: Any, args: tuple, output: Any) -> Any:
        call = calls.current(self.key)
        if call is None:
            return None
        state = call.parts.get("qwen_vision")
        if output is not None and state is not None and state.windows is not None and state.cu_seqlens is not None:
            output = cut_pooled(output, sum(segment.index.numel() for segment in state.segments))
        if call.kind == "encoder":
            self.end_call(call)
        return output

    def _unpermute(self, module: Any, args: tuple, output: Tensor) -> Tensor | None:
        """The merged kept tokens, in the stages' order, placed where the tower's full-size un-permutation
        reads them (``qwen25_windows.full_size_merged``)."""
        state = self._state()
        if state is None or state.cu_seqlens is None:
            return None
        rows, start = [], 0
        for segment in state.segments:
            rows.append(start + segment.tower_rows())
            start += segment.index.numel()
        return full_size_merged(output[torch.cat(rows)], state.windows[0])

    def _capture_input(self, wants_input: bool, module: Any, args: tuple, kwargs: dict) -> None:
        state = self._state()
        state.captured["kwargs"] = dict(kwargs)
        if wants_input:
            state.captured["input"] = args[0] if args else kwargs["hidden_states"]

    def _capture_mlp(self, module: Any, args: tuple, output: Tensor) -> None:
        self._state().captured["mlp"] = output

    def _attends(self, layer: int, state: _State) -> Tensor:
        """The shrunk segments block ``layer`` attends over: frames, or windows at a window block."""
        return state.cu_seqlens if state.cu_windows is None or layer in self.full_blocks else state.cu_windows

    def _shrunk_kwargs(self, layer: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._state()
        if state is None or state.cu_seqlens is None:
            return None
        cu_seqlens = self._attends(layer, state)
        kwargs["cu_seqlens"] = cu_seqlens
        kwargs["position_embeddings"] = state.rotary
        if kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
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
            cu_seqlens, rotary = self._attends(site.layer, state), state.rotary
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
        spans, start = [], 0  # each segment's groups (stages' order) as rows of the tower's sequence
        for segment in state.segments:
            spans.append(start + segment.tower_rows())
            start += segment.index.numel()
        keys = [(span.numel(), segment.grid) for span, segment in zip(spans, state.segments)]

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
                segment = state.segments[s]
                kept_rows[s] = spans[s][keep.indices[row]]
                kept_features[s] = after.features[row]
                segment.index, segment.grid = after.index[row], after.grid
                if segment.place is not None:  # back into window order for the tower
                    segment.place = segment.place[keep.indices[row]]
                    order = torch.argsort(segment.place)
                    kept_rows[s], kept_features[s] = kept_rows[s][order], kept_features[s][order]
        rows = torch.cat(kept_rows)  # current merge groups that stay (representatives for merged ones)
        patch_rows = (rows[:, None] * self.unit + torch.arange(self.unit, device=device)).reshape(-1)
        state.rotary = tuple(t[patch_rows] for t in rotary)
        counts = torch.tensor([f.shape[0] * self.unit for f in kept_features], device=device)
        state.cu_seqlens = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(cu_seqlens.dtype)
        if state.windows is not None:
            places = torch.cat([segment.place for segment in state.segments]).sort().values
            state.cu_windows = shrunk_windows(places, state.windows[1], self.unit, cu_seqlens.dtype)
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
