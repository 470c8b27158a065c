"""Standalone open_clip ``VisionTransformer``, alone or as the ``.visual`` tower of an open_clip model
(``CLIP``, ``CustomTextCLIP``, ``CoCa``): ``vision(L)`` sites only.

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    vtoken.wrap(model, "cls_attn", keep=24, site="vision(6)")  # encode_image: 24 patches after block 6

Map of the model:
- ``visual.transformer.resblocks``: ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) or
  ``CustomResidualAttentionBlock`` (open_clip's ``Attention``) over [CLS] + the patches of
  ``visual.grid_size``, batch-first or sequence-first as ``visual.transformer.batch_first`` says
  (older open_clip releases run sequence-first).
- A forward hook on block L replaces its output by [CLS] plus the kept (or merged) patches; blocks L+1..
  run on the shorter sequence through their own attention call (fused SDPA stays in use). The pooled
  embedding and ``output_tokens`` come from the shorter sequence.
- ``cls_attn``: the [CLS] row of block L's attention, recomputed from the block input: ``ln_1``, the [CLS]
  query and all keys from the attention's ``in_proj_weight`` / ``in_proj_bias`` (then ``ln_q`` / ``ln_k``
  for open_clip's ``Attention``), scale ``head_dim ** -0.5``, through ``vtoken.kernels``.
  Refused when the tower does not pool by its [CLS] token (``pool_type`` other than ``'tok'``, or an
  attentional pooler): its [CLS] attention is then no trained importance signal. Also refused for
  scaled-cosine attention (``scaled_cosine_attn=True``).
- ``mlp_shift`` (``repshift``): the output of ``block.ls_2``, exactly the update ``x + ls_2(mlp(ln_2(x)))``
  adds.
After a call, ``model.vtoken.stats.kept["vision(L)"]`` holds the original grid position of every
surviving patch. Models whose ``.visual`` is a ``TimmModel`` are timm ViTs: wrap ``model.visual.trunk``
with the ``timm_vit`` integration.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vtoken import kernels
from vtoken.registry import register_integration

from .vit_encoder import VisionEncoderIntegration
from .vit_sites import EncoderLayout


def _vision_tower(model: Any) -> Any | None:
    """The open_clip VisionTransformer of ``model`` (itself or its ``.visual``), None if it has none."""
    module = sys.modules.get("open_clip.transformer")  # an open_clip model implies open_clip was imported
    if module is None or not isinstance(model, torch.nn.Module):
        return None
    if isinstance(model, module.VisionTransformer):
        return model
    visual = getattr(model, "visual", None)
    return visual if isinstance(visual, module.VisionTransformer) else None


@register_integration("open_clip_vit")
class OpenClipViTIntegration(VisionEncoderIntegration):
    model_types: ClassVar[tuple[str, ...]] = ("open_clip.VisionTransformer", "open_clip.CLIP")
    family: ClassVar[str] = "open_clip VisionTransformer"

    @classmethod
    def matches(cls, model: Any) -> bool:
        return _vision_tower(model) is not None

    def encoder(self) -> torch.nn.Module:
        return _vision_tower(self.model)

    def blocks(self) -> Sequence[torch.nn.Module]:
        return self.encoder().transformer.resblocks

    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.encoder().transformer, "grad_checkpointing", False))

    def encoder_layout(self) -> EncoderLayout:
        visual = self.encoder()
        # releases without the attribute run their transformer sequence-first
        seq_first = not getattr(visual.transformer, "batch_first", False)
        return EncoderLayout(blocks=self.blocks(), prefix=1, grid=tuple(int(s) for s in visual.grid_size),
                             seq_first=seq_first, mlp=self.mlp_update, cls_row=self._cls_row)

    def mlp_update(self, block: torch.nn.Module) -> torch.nn.Module | None:
        if all(hasattr(block, name) for name in ("ls_2", "mlp", "ln_2")):
            return block.ls_2  # x = x + ls_2(mlp(ln_2(x)))
        return None

    def cls_attn_refusal(self, block: torch.nn.Module) -> str | None:
        visual = self.encoder()
        if getattr(visual, "attn_pool", None) is not None:
            return "the tower pools with an attentional pooler, not its [CLS] token"
        pool_type = getattr(visual, "pool_type", "tok")
        if pool_type != "tok":
            return (f"the tower pools by pool_type={pool_type!r}, not by its [CLS] token, whose attention "
                    "is then no trained importance signal")
        attn = getattr(block, "attn", None)
        if not hasattr(block, "ln_1") or hasattr(block, "ln_1_kv"):
            return f"{type(block).__name__} is not a self-attention block with ln_1"
        if isinstance(attn, torch.nn.MultiheadAttention):
            if attn.bias_k is not None or attn.add_zero_attn:
                return "its nn.MultiheadAttention adds bias_k / zero-attention keys"
            return None
        oc = sys.modules["open_clip.transformer"]
        if isinstance(attn, oc.Attention):
            if getattr(attn, "logit_scale", None) is not None:
                return "its Attention uses scaled cosine attention, whose [CLS] row vtoken does not recompute"
            return None
        return f"{type(attn).__name__} is neither nn.MultiheadAttention nor open_clip's Attention"

    def _cls_row(self, block: torch.nn.Module, hidden: Tensor) -> Tensor:
        """[CLS] attention over all tokens of ``block`` for its input ``hidden`` ``[B, T, D]`` (batch-first
        here whatever the transformer's layout), mean over heads: ``[B, T]``."""
        attn = block.attn
        normed = block.ln_1(hidden)
        batch, length, dim = normed.shape
        heads = attn.num_heads
        head_dim = dim // heads
        # nn.MultiheadAttention and open_clip's Attention both project q, k, v with in_proj_weight [3D, D]
        # (nn.MultiheadAttention with kdim/vdim != D keeps separate q/k weights instead)
        if getattr(attn, "_qkv_same_embed_dim", True):
            wq, wk = attn.in_proj_weight[:dim], attn.in_proj_weight[dim: 2 * dim]
        else:
            wq, wk = attn.q_proj_weight, attn.k_proj_weight
        bias = attn.in_proj_bias
        bq, bk = (None, None) if bias is None else (bias[:dim], bias[dim: 2 * dim])
        q = F.linear(normed[:, :1], wq, bq).view(batch, 1, heads, head_dim).transpose(1, 2)
        k = F.linear(normed, wk, bk).view(batch, length, heads, head_dim).transpose(1, 2)
        if not isinstance(attn, torch.nn.MultiheadAttention):
            q, k = attn.ln_q(q), attn.ln_k(k)  # QK norm (Identity unless qk_norm=True)
        return kernels.attention_rows(q, k, scale=head_dim ** -0.5)[:, 0]
