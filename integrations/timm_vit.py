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

``vit_encoder.VisionEncoderIntegration`` holds what every standalone batched ViT shares (open_clip's
integration uses it too).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken import kernels
from vtoken.registry import register_integration

from .vit_encoder import VisionEncoderIntegration
from .vit_sites import EncoderLayout


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
