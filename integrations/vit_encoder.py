"""What every standalone batched ViT integration shares (timm's and open_clip's): ``vision(L)`` sites only.

A family provides its encoder, blocks and layout, why ``cls_attn`` cannot be scored at a block (if it
cannot), the submodule whose output is the MLP's residual update, and any hooks that read per-call
facts before the first block (a dynamic patch grid). This class checks the pipeline against the
encoder before any hook exists, installs the sites (``vit_sites.EncoderSites``) and refuses inputs the
sites cannot follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from vtoken import signals

from .base import Integration, removed_on_failure
from .vit_sites import EncoderLayout, EncoderSites

ALTERNATIVES = "use kcenter, repshift, random, pool or pixel_shuffle instead"


class VisionEncoderIntegration(Integration):
    """A standalone batched ViT: ``vision(L)`` sites with ``0 <= L < depth - 1`` (pruning after the last
    block would leave no block to run on fewer tokens). Negative layers count from the last block."""

    #: the model family, for messages
    family: ClassVar[str] = "ViT"

    # --- what a model family provides ------------------------------------------------------------
    def encoder(self) -> torch.nn.Module:
        """The ViT itself (the wrapped model, or its vision tower)."""
        raise NotImplementedError

    def blocks(self) -> Sequence[torch.nn.Module]:
        raise NotImplementedError

    def encoder_layout(self) -> EncoderLayout:
        raise NotImplementedError

    def cls_attn_refusal(self, block: torch.nn.Module) -> str | None:
        """Why ``cls_attn`` cannot be scored at this block (None: it can)."""
        raise NotImplementedError

    def mlp_update(self, block: torch.nn.Module) -> torch.nn.Module | None:
        """The submodule whose output is exactly the residual update the block's MLP adds (None: none)."""
        raise NotImplementedError

    def input_hooks(self) -> list[Any]:
        """Extra hooks run before the first block (e.g. reading a dynamic grid); their handles."""
        return []

    def grad_checkpointing(self) -> bool:
        return False

    # --- the Integration contract ----------------------------------------------------------------
    site_signals: ClassVar[dict[str, frozenset[str]]] = {"vision": signals.VISION}

    def site_layers(self) -> dict[str, int]:
        return {"vision": len(self.blocks()) - 1}

    def supported_site_kinds(self) -> tuple[str, ...]:
        return ("vision",)

    def check_pipeline(self) -> None:
        depth = len(self.blocks())
        self.pipeline = self.pipeline.resolved({"vision": depth})  # vision(-1) is the last block
        accepted = f"vision(L) with 0 <= L < {depth - 1} (pass layer=L or site='vision(L)')"
        for stage in self.pipeline.stages:
            site = stage.site
            if site.kind != "vision":
                raise ValueError(f"{self.name} is a standalone {self.family} with only vision(L) sites; "
                                 f"stage {stage.name} is at {site}; accepted: {accepted}")
            if not 0 <= site.layer < depth - 1:
                last = ""
                if site.layer == depth - 1:
                    last = " (the last block has no block after it to run on fewer tokens)"
                raise ValueError(f"{site} does not exist in this {depth}-block {self.name} model{last}; "
                                 f"accepted: {accepted}")

    def install(self) -> None:
        self.check_pipeline()
        self._check_signals()
        self.encoder_sites: EncoderSites | None = None
        self.layout = self.encoder_layout()
        with removed_on_failure(self):
            for handle in self.input_hooks():
                self.hooks.add(handle)
            first = self.blocks()[0]
            self.hooks.add(first.register_forward_pre_hook(self._on_encoder_start, with_kwargs=True))
            self.encoder_sites = EncoderSites(self.pipeline, self.pipeline.sites, self.key, self.end_call,
                                              layout=self.layout)

    def remove(self) -> None:
        self.hooks.remove_all()
        if getattr(self, "encoder_sites", None) is not None:
            self.encoder_sites.remove()
            self.encoder_sites = None

    # --- checks ----------------------------------------------------------------------------------
    def _check_signals(self) -> None:
        """Refuse, before any hook is in place, signals the model cannot provide at a site."""
        blocks = self.blocks()
        for site in self.pipeline.sites:
            wanted = self.pipeline.signals_at(site)
            unknown = set(wanted) - signals.VISION
            if unknown:
                raise ValueError(f"stages at {site} need the signal(s) {signals.describe(unknown)}, which "
                                 f"{self.name} does not provide; {site} provides: {signals.describe(signals.VISION)}")
            block = blocks[site.layer]
            if "cls_attn" in wanted:
                reason = self.cls_attn_refusal(block)
                if reason is not None:
                    raise ValueError(f"cls_attn at {site} is not available on this {self.name} model: "
                                     f"{reason}; {ALTERNATIVES}")
            if "mlp_shift" in wanted and self.mlp_update(block) is None:
                raise ValueError(f"repshift at {site}: block {site.layer} ({type(block).__name__}) has no "
                                 "separate MLP residual update to measure")

    def _on_encoder_start(self, module: Any, args: tuple, kwargs: dict) -> None:
        if kwargs.get("attn_mask") is not None:
            raise ValueError("vtoken's vision(L) pruning cannot run with an attn_mask: the mask would not "
                             "match the sequence shortened after the pruning block; drop the attn_mask")
        if self.grad_checkpointing() and torch.is_grad_enabled():
            raise ValueError("vtoken's vision(L) pruning cannot run under gradient checkpointing (recomputed "
                             "blocks would see another sequence); disable it or run under torch.no_grad()")
        hidden = args[0] if args else kwargs.get("x", kwargs.get("q_x"))
        tokens = hidden.shape[0 if self.layout.seq_first else 1]
        call = self.encoder_sites.start_call()
        h, w = call.parts.get("encoder_grid", self.layout.grid)
        expected = self.layout.prefix + h * w
        if tokens != expected:
            raise ValueError(
                f"the first {self.family} block got {tokens} tokens, but {self.layout.prefix} prefix "
                f"token(s) and a {h}x{w} patch grid make {expected}: vision(L) pruning needs the full patch "
                "grid (is patch dropout active in training mode, or the input size not the model's?)"
            )
