"""Qwen2.5-VL's window partition, kept consistent when ``vision(L)`` prunes merge groups.

Qwen2.5-VL's tower (``Qwen2_5_VisionTransformerPretrainedModel.forward``, the same from transformers 5.20
on) reorders the merge groups (4 patches each) into windows of ``window_size / patch_size / merge``
groups a side before the first block (``get_vision_window_index``: per image and frame, windows in row
order, each window's groups in row order, partial windows at the right and bottom edges). Blocks in
``fullatt_block_indexes`` attend over each image frame (``cu_seqlens``), the others within each window
(``cu_window_seqlens``); after the merger the forward un-permutes the merged tokens with
``argsort(window_index)``, a full-size index.

Pruning keeps the partition: a kept group stays in the window its place in the image puts it in, so
after block L every window keeps its surviving groups in window order, ``cu_window_seqlens`` shrink
window by window (emptied windows vanish, as the model drops the empty windows of its own padding) and
the full-attention ``cu_seqlens`` shrink frame by frame. Each later block then computes for a kept group
exactly what the unpruned block computes with the dropped groups taken out of its attention: the
attention pattern is the model's own, restricted to the kept groups. Pruning whole windows instead would
also be exact, but it forces every stage to choose in units of a window (16 groups, 64 patches on the
released models), coarser than any budget a stage is asked for and unlike every other site; so groups
are chosen freely and the windows follow them. A merged group (pixel_shuffle, pool) stands at its
representative's place and window.

The forward is followed in two places only, and ``check_window_forward`` refuses ``vision(L)`` when the
tower's source no longer has them: the window order (recomputed here with the model's own
``get_vision_window_index``) and the final full-size un-permutation, which a merger forward hook feeds
with a full-size tensor whose first rows, once un-permuted, are the kept tokens (the tower's forward
hook then cuts the rest off).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

#: statements of the tower's forward that the window bookkeeping relies on
WINDOW_FORWARD_STEPS = (
    "get_vision_window_index(",
    "self.permute_input_for_window_attn(hidden_states, window_index",
    "if layer_num in self.fullatt_block_indexes",
    "reverse_indices = torch.argsort(window_index)",
    "merged_hidden_states = self.merger(hidden_states)",
    "merged_hidden_states = merged_hidden_states[reverse_indices, :]",
)


def check_window_forward(visual: torch.nn.Module) -> None:
    """Refuse ``vision(L)`` on a windowed tower whose forward is not the one this module follows."""
    import transformers

    try:
        source = inspect.getsource(type(visual).forward)
    except (OSError, TypeError):
        source = ""
    missing = [step for step in WINDOW_FORWARD_STEPS if step not in source]
    if missing:
        raise ValueError(
            f"vision(L) on {type(visual).__name__} follows its window permutation, and the forward of "
            f"transformers {transformers.__version__} no longer has {missing[0]!r}; vision(L) is supported "
            "with the tower as transformers 5.20 to 5.23 write it. Use the projector or llm(K) sites on this version"
        )


def window_layout(visual: torch.nn.Module, grid_thw: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The tower's own window order of this pass: the place of every merge group (global, raster order
    of the tower's input) in the windowed sequence ``[G]``, and the window boundaries in groups ``[W + 1]``."""
    from transformers.vision_utils import get_vision_window_index

    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size, kwargs=dict(kwargs),  # a copy: precomputed ones stay for the forward
    )
    place = torch.argsort(window_index.to(grid_thw.device))
    bounds = cu_window_seqlens.to(grid_thw.device).long() // visual.spatial_merge_size ** 2
    return place, bounds


def shrunk_windows(places: Tensor, bounds: Tensor, unit: int, dtype: torch.dtype) -> Tensor:
    """``cu_window_seqlens`` (in patches) for the kept groups at window-order ``places`` (ascending): the
    kept groups of each window, windows left empty dropped."""
    window = torch.bucketize(places, bounds[1:], right=True)
    counts = torch.bincount(window, minlength=bounds.numel() - 1)
    counts = counts[counts > 0] * unit
    return torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(dtype)


def full_size_merged(merged: Tensor, places: Tensor) -> Tensor:
    """What the merger hands the forward so that its ``merged[argsort(window_index)]`` puts ``merged``
    (the kept tokens, in the order wanted) in its first rows: row i of ``merged`` goes where the
    forward reads output row i, ``places[i]``; the other rows are zeros that are cut off afterwards."""
    full = merged.new_zeros(places.numel(), merged.shape[-1])
    full[places[: merged.shape[0]]] = merged
    return full


def cut_pooled(output: Any, kept: int) -> Any:
    """The tower's output with only the first ``kept`` merged tokens (the rest are ``full_size_merged``'s
    zeros)."""
    if isinstance(output, tuple):
        return (output[0], output[1][:kept], *output[2:])
    output.pooler_output = output.pooler_output[:kept]
    return output
