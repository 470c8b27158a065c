"""``vision(L)`` sites inside a batched ViT encoder (CLIP in LLaVA, timm and open_clip ViTs).

Map: an encoder is a list of blocks over ``[B, prefix + N, D]`` tokens (``[N, B, D]`` for
sequence-first encoders), where the prefix is [CLS] and register tokens and the N patches sit on an
(h, w) grid. A forward hook on block L replaces its output by the prefix plus the tokens the stages
keep (or merge); the following blocks then simply run on the shorter sequence: no mask is needed
(ViT attention is unmasked), and whichever attention kernel the encoder uses stays in use.

Signals at ``vision(L)``: ``cls_attn`` (the [CLS] row of block L's attention, recomputed from the
block's input by a model-specific ``cls_row``) and ``mlp_shift`` (the L2 norm of the update block
L's MLP adds to each token, captured at the MLP's output).
After the encoder, ``result(call)`` gives each surviving patch token's original grid position and the
grid they still form (after merging), for the integration to map features back to placeholders; the
call's stats hold the same as ``kept``. All of it is per call (``vtoken.calls``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from vtoken import calls, signals
from vtoken.calls import Call
from vtoken.pipeline import Pipeline
from vtoken.sites import Site
from vtoken.stats import clock
from vtoken.tokens import TokenSet

from .base import SiteHooks, removed_on_failure


@dataclass
class EncoderLayout:
    blocks: Sequence[torch.nn.Module]
    prefix: int  # tokens before the patches ([CLS], registers)
    grid: tuple[int, int]
    seq_first: bool = False
    #: block -> its MLP submodule, whose output is the MLP's residual update (for mlp_shift)
    mlp: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    #: (block, block input [B, T, D]) -> [B, T] attention of the first token to all tokens, mean over heads
    cls_row: Callable[[torch.nn.Module, Tensor], Tensor] | None = None


@dataclass
class EncoderCall:
    """The state of one pass through the encoder: what survives so far and the captured signals."""

    grid: tuple[int, int] | None
    index: Tensor | None = None
    weights: Tensor | None = None
    captured: dict[str, Tensor] = field(default_factory=dict)


class EncoderSites(SiteHooks):
    """The hooks of the ``vision(L)`` sites of one encoder. A model's own call (a VLM's forward or
    generate) carries the state; a standalone encoder's pass is a call of its own, from its first
    block (or an earlier ``start_call``) to its last block."""

    def __init__(self, pipeline: Pipeline, sites: list[Site], key: calls.CallKey,
                 end_call: Callable[[Call], None] | None = None, *, layout: EncoderLayout) -> None:
        super().__init__(pipeline, sites, key, end_call)
        self.layout = layout
        self.hooks.add(layout.blocks[0].register_forward_pre_hook(self._reset))
        self.hooks.add(layout.blocks[-1].register_forward_hook(self._finish, always_call=True))
        with removed_on_failure(self):
            self._install()

    def _install(self) -> None:
        layout, pipeline = self.layout, self.pipeline
        for layer, site in self.sites.items():
            block = layout.blocks[layer]
            wanted = pipeline.signals_at(site)
            if signals.CLS_ATTN in wanted:
                if layout.cls_row is None or layout.prefix < 1:
                    raise ValueError(f"cls_attn at {site} needs a [CLS] token, which this encoder does not have")
                self.hooks.add(block.register_forward_pre_hook(self._capture_input, with_kwargs=True))
            if signals.MLP_SHIFT in wanted:
                if layout.mlp is None:
                    raise ValueError(f"repshift at {site}: this encoder's blocks have no separable MLP")
                self.hooks.add(layout.mlp(block).register_forward_hook(self._capture_mlp))
            self.hooks.add(block.register_forward_hook(partial(self._prune, site)))

    # --- per-call state --------------------------------------------------------------------------
    def start_call(self, grid: tuple[int, int] | None = None) -> Call:
        """The current call, or a new encoder call when none is running (a standalone encoder); ``grid``:
        this call's patch grid when it differs from the layout's (dynamic image sizes)."""
        call = calls.current(self.key)
        # an encoder call that already ran its blocks is a stale one (a pass that raised half-way)
        if call is None or (call.kind == "encoder" and "encoder" in call.parts):
            call = calls.begin(self.key, Call(kind="encoder"))
        if grid is not None:
            call.parts["encoder_grid"] = grid
        return call

    def state(self, call: Call | None = None) -> EncoderCall | None:
        call = call if call is not None else calls.current(self.key)
        return None if call is None else call.parts.get("encoder")

    def result(self, call: Call | None = None) -> tuple[Tensor | None, tuple[int, int] | None]:
        """After the encoder ran in ``call``: the original grid index of every surviving patch per
        image ``[B, N']`` and the grid they still form (None once a selection broke it)."""
        state = self.state(call)
        if state is None:
            return None, self.layout.grid
        return state.index, state.grid

    # --- hooks -----------------------------------------------------------------------------------
    def _reset(self, module: Any, args: tuple) -> None:
        call = self.start_call()
        call.parts["encoder"] = EncoderCall(grid=call.parts.get("encoder_grid", self.layout.grid))

    def _finish(self, module: Any, args: tuple, output: Any) -> None:
        call = calls.current(self.key)
        if call is not None and call.kind == "encoder":
            self.end_call(call)

    def _capture_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        state = self.state()
        hidden = args[0] if args else next(iter(kwargs.values()))
        state.captured["input"] = hidden.transpose(0, 1) if self.layout.seq_first else hidden

    def _capture_mlp(self, module: Any, args: tuple, output: Tensor) -> None:
        state = self.state()
        if state is not None:
            state.captured["mlp"] = output.transpose(0, 1) if self.layout.seq_first else output

    def _prune(self, site: Site, module: Any, args: tuple, output: Any) -> Any:
        call = calls.current(self.key)
        state = self.state(call)
        hidden = output[0] if isinstance(output, tuple) else output
        x = hidden.transpose(0, 1) if self.layout.seq_first else hidden
        prefix, patches = x[:, : self.layout.prefix], x[:, self.layout.prefix :]
        batch, n = patches.shape[:2]
        start = clock(x.device)
        computed: dict[str, Tensor] = {}
        if "input" in state.captured:
            row = self.layout.cls_row(module, state.captured.pop("input"))
            computed[signals.CLS_ATTN] = row[:, self.layout.prefix :]
        if "mlp" in state.captured:
            computed[signals.MLP_SHIFT] = state.captured.pop("mlp")[:, self.layout.prefix :].float().norm(dim=-1)
        scoring = clock(x.device) - start
        index = state.index if state.index is not None else torch.arange(n, device=x.device).expand(batch, n)
        tokens = TokenSet(features=patches, index=index, grid=state.grid, weights=state.weights, signals=computed)
        after, _ = self.pipeline.run(site, tokens, call.stats, scoring_seconds=scoring)
        state.index, state.grid, state.weights = after.index, after.grid, after.weights
        call.stats.kept[str(site)] = list(after.index)
        new = torch.cat([prefix, after.features.to(x.dtype)], dim=1)
        new = new.transpose(0, 1) if self.layout.seq_first else new
        return (new, *output[1:]) if isinstance(output, tuple) else new
