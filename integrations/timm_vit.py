"""Standalone timm ``VisionTransformer`` (timm >= 1.0): ``vision(L)`` sites only.

    model = timm.create_model("vit_base_patch16_224").eval()
    vtoken.wrap(model, "pixel_shuffle", layer=6)   # blocks 7.. run on 196/4 patches + [CLS]
    vtoken.unwrap(model)                           # the original model again
    vtoken.wrap(model, "cls_attn", keep=49, site="vision(6)")

Map of the model:
- ``model.blocks``: ``Block``s over ``[B, prefix + N, D]`` where the prefix is ``num_prefix_tokens``
  ([CLS] first, then register / distillation tokens) and the N patches sit on ``patch_embed.grid_size``
  (or, with ``dynamic_img_size=True``, on the grid of the actual input, read from the patch embedding's
  ``[B, H, W, D]`` output on every call).
- A forward hook on block L replaces its output by the prefix plus the kept (or merged) patches; blocks
  L+1.. run on the shorter sequence with whatever attention kernel they use (the hooks never touch
  the attention modules). ``forward_features`` returns the shorter sequence; the head pools it as usual.
- ``cls_attn``: the [CLS] row of block L's attention, recomputed from the block input: ``norm1``, the
  block's own ``attn.qkv``, ``q_norm`` / ``k_norm``, ``attn.scale``, through ``vtoken.kernels``.
  Refused when the model has no class token or does not pool by it (``global_pool`` other than
  ``'token'`` or ``''``).
- ``mlp_shift`` (``repshift``): the output of ``block.ls2``, which is exactly the residual update
  ``x = x + drop_path2(ls2(mlp(norm2(x))))`` adds (``norm2`` for ``ResPostBlock``).
After a call, ``model.vtoken.stats.kept["vision(L)"]`` holds, per image, the original grid position of
every patch that survived site L.

Not supported (refused with a message when met): ``attn_mask`` arguments (the mask would not match the
shortened sequence), gradient checkpointing with gradients enabled, patch dropout in training mode,
and ``cls_attn`` / ``repshift`` on block types without a separate attention / MLP (``ParallelScalingBlock``,
``ParallelThingsBlock``). ``forward_intermediates`` after a pruning site returns the shorter sequences and
cannot reshape them to NCHW.

``VisionEncoderIntegration`` below holds what every standalone batched ViT shares (open_clip's
integration uses it too).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken import kernels, signals
from vtoken.registry import register_integration

from .base import Integration
from .vit_sites import EncoderLayout, EncoderSites

_ALTERNATIVES = "use kcenter, repshift, random, pool or pixel_shuffle instead"


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
        try:
            for handle in self.input_hooks():
                self.hooks.add(handle)
            first = self.blocks()[0]
            self.hooks.add(first.register_forward_pre_hook(self._on_encoder_start, with_kwargs=True))
            self.encoder_sites = EncoderSites(self.pipeline, self.layout, self.pipeline.sites, self.key,
                                              self.end_call)
        except BaseException:
            self.remove()  # a failed wrap leaves no trace
            raise

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
                                     f"{reason}; {_ALTERNATIVES}")
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


def _timm_classes() -> Any | None:
    """timm's vision_transformer module, if timm is loaded (a timm model implies timm was imported)."""
    return sys.modules.get("timm.models.vision_transformer")


@register_integration("timm_vit")
class TimmViTIntegration(VisionEncoderIntegration):
    model_types: ClassVar[tuple[str, ...]] = ("timm.VisionTransformer",)
    family: ClassVar[str] = "timm VisionTransformer"

    @classmethod
    def matches(cls, model: Any) -> bool:
        module = _timm_classes()
        return module is not None and isinstance(model, module.VisionTransformer)

    def encoder(self) -> torch.nn.Module:
        return self.model

    def blocks(self) -> Sequence[torch.nn.Module]:
        return self.model.blocks

    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.model, "grad_checkpointing", False))

    def encoder_layout(self) -> EncoderLayout:
        return EncoderLayout(blocks=self.blocks(), prefix=int(self.model.num_prefix_tokens),
                             grid=tuple(int(s) for s in self.model.patch_embed.grid_size),
                             mlp=self.mlp_update, cls_row=self._cls_row)

    def input_hooks(self) -> list[Any]:
        # dynamic_img_size: the patch embedding returns [B, H, W, D] for the actual input; its grid is the
        # one the patches sit on for this call (the blocks' pre-hooks run after it).
        return [self.model.patch_embed.register_forward_hook(self._read_grid)]

    def _read_grid(self, module: Any, args: tuple, output: Tensor) -> None:
        """This call's patch grid (a call of its own starts here, before the first block)."""
        if isinstance(output, Tensor) and output.dim() == 4:
            fmt = getattr(module, "output_fmt", "NHWC")
            fmt = str(getattr(fmt, "value", fmt))
            grid = tuple(output.shape[2:4]) if fmt == "NCHW" else tuple(output.shape[1:3])
        else:
            grid = tuple(int(s) for s in self.model.patch_embed.grid_size)
        self.encoder_sites.start_call(grid)

    def mlp_update(self, block: torch.nn.Module) -> torch.nn.Module | None:
        module = _timm_classes()
        if isinstance(block, module.ResPostBlock):
            return block.norm2  # x = x + drop_path2(norm2(mlp(x)))
        if isinstance(block, module.Block):
            return block.ls2  # x = x + drop_path2(ls2(mlp(norm2(x))))
        return None

    def cls_attn_refusal(self, block: torch.nn.Module) -> str | None:
        model = self.model
        if not getattr(model, "has_class_token", model.cls_token is not None):
            return (f"it has no class token (class_token=False, global_pool={model.global_pool!r}), so "
                    "there is no [CLS] attention row")
        if getattr(model, "attn_pool", None) is not None:
            return f"it pools with an attention pool (global_pool={model.global_pool!r}), not its [CLS] token"
        if model.global_pool not in ("token", ""):
            return (f"it pools by global_pool={model.global_pool!r}, not by its [CLS] token, whose "
                    "attention is then no trained importance signal")
        from timm.layers.attention import Attention

        module = _timm_classes()
        if not isinstance(block, (module.Block, module.ResPostBlock)) or type(block.attn) is not Attention:
            attn = getattr(block, "attn", None)
            what = "no separate attention" if attn is None else type(attn).__name__
            return (f"{type(block).__name__} (with {what}) is not a block with timm's standard Attention "
                    "(qkv projection), whose [CLS] row vtoken recomputes")
        return None

    def _cls_row(self, block: torch.nn.Module, hidden: Tensor) -> Tensor:
        """[CLS] attention over all tokens of ``block`` for its input ``hidden`` ``[B, T, D]``, mean over
        heads: ``[B, T]``. The attention module itself is not called (it keeps its fused kernel)."""
        attn = block.attn
        normed = hidden if isinstance(block, _timm_classes().ResPostBlock) else block.norm1(hidden)
        batch, length, _ = normed.shape
        qkv = attn.qkv(normed).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0, :, :, :1]), attn.k_norm(qkv[1])
        return kernels.attention_rows(q, k, scale=attn.scale)[:, 0]
