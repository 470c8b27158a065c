"""``vision(L)`` sites inside a batched ViT encoder (CLIP in LLaVA, timm and open_clip ViTs).

Map: an encoder is a list of blocks over ``[B, prefix + N, D]`` tokens (``[N, B, D]`` for
sequence-first encoders), where the prefix is [CLS] and register tokens and the N patches sit on an
(h, w) grid. A forward hook on block L replaces its output by the prefix plus the tokens the stages
keep (or merge); the following blocks then simply run on the shorter sequence: no mask is needed
(ViT attention is unmasked), and whichever attention kernel the encoder uses stays in use.

Signals at ``vision(L)``: ``cls_attn`` (the [CLS] row of block L's attention, recomputed from the
block's input by a model-specific ``cls_row``) and ``mlp_shift`` (the L2 norm of the update block
L's MLP adds to each token, captured at the MLP's output).
After the encoder, ``index`` holds each surviving patch token's original grid position and ``grid``
the grid they still form (after merging), for the integration to map features back to placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from vtoken.pipeline import Pipeline
from vtoken.sites import Site
from vtoken.stats import Stats, clock
from vtoken.tokens import TokenSet


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


class EncoderSites:
    def __init__(self, pipeline: Pipeline, stats: Stats, layout: EncoderLayout, sites: list[Site]) -> None:
        self.pipeline, self.stats, self.layout = pipeline, stats, layout
        self.sites = {site.layer: site for site in sites}
        self.index: Tensor | None = None
        self.grid: tuple[int, int] | None = layout.grid
        self.weights: Tensor | None = None
        self._captured: dict[str, Tensor] = {}
        self.handles = [layout.blocks[0].register_forward_pre_hook(self._reset)]
        try:
            self._install()
        except BaseException:
            self.remove()  # never leave half the hooks behind
            raise

    def _install(self) -> None:
        layout, pipeline = self.layout, self.pipeline
        for layer, site in self.sites.items():
            block = layout.blocks[layer]
            wanted = pipeline.signals_at(site)
            unknown = set(wanted) - {"cls_attn", "mlp_shift"}
            if unknown:
                raise ValueError(f"stages at {site} need signal(s) {sorted(unknown)}, which vision sites do not "
                                 "provide; accepted there: cls_attn, mlp_shift")
            if "cls_attn" in wanted:
                if layout.cls_row is None or layout.prefix < 1:
                    raise ValueError(f"cls_attn at {site} needs a [CLS] token, which this encoder does not have")
                self.handles.append(block.register_forward_pre_hook(self._capture_input, with_kwargs=True))
            if "mlp_shift" in wanted:
                if layout.mlp is None:
                    raise ValueError(f"repshift at {site}: this encoder's blocks have no separable MLP")
                self.handles.append(layout.mlp(block).register_forward_hook(self._capture_mlp))
            self.handles.append(block.register_forward_hook(partial(self._prune, site)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _reset(self, module: Any, args: tuple) -> None:
        self.index, self.grid, self.weights = None, self.layout.grid, None
        self._captured = {}

    def _capture_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else next(iter(kwargs.values()))
        self._captured["input"] = hidden.transpose(0, 1) if self.layout.seq_first else hidden

    def _capture_mlp(self, module: Any, args: tuple, output: Tensor) -> None:
        self._captured["mlp"] = output.transpose(0, 1) if self.layout.seq_first else output

    def _prune(self, site: Site, module: Any, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        x = hidden.transpose(0, 1) if self.layout.seq_first else hidden
        prefix, patches = x[:, : self.layout.prefix], x[:, self.layout.prefix :]
        batch, n = patches.shape[:2]
        start = clock(x.device)
        signals: dict[str, Tensor] = {}
        if "input" in self._captured:
            row = self.layout.cls_row(module, self._captured.pop("input"))
            signals["cls_attn"] = row[:, self.layout.prefix :]
        if "mlp" in self._captured:
            signals["mlp_shift"] = self._captured.pop("mlp")[:, self.layout.prefix :].float().norm(dim=-1)
        scoring = clock(x.device) - start
        index = self.index if self.index is not None else torch.arange(n, device=x.device).expand(batch, n)
        tokens = TokenSet(features=patches, index=index, grid=self.grid, weights=self.weights, signals=signals)
        after, _ = self.pipeline.run(site, tokens, self.stats, scoring_seconds=scoring)
        self.index, self.grid, self.weights = after.index, after.grid, after.weights
        self.stats.kept[str(site)] = list(after.index)
        new = torch.cat([prefix, after.features.to(x.dtype)], dim=1)
        new = new.transpose(0, 1) if self.layout.seq_first else new
        return (new, *output[1:]) if isinstance(output, tuple) else new
