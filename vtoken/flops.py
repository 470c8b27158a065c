"""Analytic prefill FLOPs of a vision-language model, split into vision encoder / projector / LLM.

Pure functions of the model's dimensions and token counts (no model, no tensors), so the numbers for
a full-size model can be computed on any machine. Conventions:

- one multiply-add is 2 FLOPs; only matrix products are counted (norms, activations, softmax, rotary
  and the embedding lookup are a fraction of a percent and left out);
- attention is counted as the dense ``L x L`` score and value products every layer computes (the
  causal half is not subtracted: dense SDPA/FlashAttention kernels do most of that work anyway, and
  the DART/FastV FLOPs formulas count ``n^2`` as well);
- prefill as ``generate()`` runs it: the LM head projects only the last position (``logits=1``);
- after ``llm(K)`` pruning, decoder layer ``i`` sees ``text + layer_visual_tokens[i]`` positions, as
  ``model.vtoken.stats.llm_layer_tokens`` reports them.

``prefill_flops`` gives the split. A model's dimensions come from its family's integration
(``Integration.model_dims``; ``dims_from_model(model)`` asks it), and so do the counts of a prefill's
visual part (``Integration.visual_counts``): nothing here knows a model family.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class VisionDims:
    """A ViT: ``layers`` blocks of width ``hidden`` over the patches (+ ``prefix`` tokens such as [CLS])."""

    layers: int
    hidden: int
    intermediate: int
    patch_dim: int  #: input values per patch (channels * temporal * patch * patch)
    prefix: int = 1  #: tokens before the patches ([CLS] for CLIP; 0 for Qwen's tower)
    gated_mlp: bool = False  #: SwiGLU-style MLP (3 matrices) instead of 2
    window: int | None = None  #: tokens per attention window for windowed blocks (Qwen2.5-VL)
    full_attention_layers: tuple[int, ...] | None = None  #: blocks with full attention (None: all)


@dataclass(frozen=True)
class ProjectorDims:
    """The vision-to-LLM projector: an MLP ``in_dim*group -> hidden -> out_dim`` per output token
    (``group`` patches merged into one token: 1 for LLaVA, 4 for Qwen's 2x2 PatchMerger)."""

    in_dim: int
    hidden: int
    out_dim: int
    group: int = 1


@dataclass(frozen=True)
class LLMDims:
    """A decoder-only language model (Llama, Mistral, Qwen2 layouts)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool = True


@dataclass(frozen=True)
class ModelDims:
    vision: VisionDims
    projector: ProjectorDims
    llm: LLMDims

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- vision encoder -------------------------------------------------------------------------------
def vision_layer_flops(dims: VisionDims, tokens: int, window: int | None = None) -> int:
    """One ViT block over ``tokens`` tokens; ``window``: tokens per attention window (None: full)."""
    d = dims.hidden
    projections = 2 * tokens * d * (4 * d)  # q, k, v, out
    span = tokens if window is None else min(window, tokens)
    attention = 2 * 2 * tokens * span * d  # scores and weighted values
    mlp = 2 * tokens * d * dims.intermediate * (3 if dims.gated_mlp else 2)
    return projections + attention + mlp


def vision_flops(dims: VisionDims, patches: int, images: int = 1,
                 layer_tokens: Sequence[int] | None = None) -> int:
    """The vision tower over ``images`` images of ``patches`` patches each.

    layer_tokens: tokens per image (prefix included) that each block sees, for towers pruned inside
    (``vision(L)`` sites); default every block sees ``prefix + patches``.
    """
    if layer_tokens is None:
        layer_tokens = [dims.prefix + patches] * dims.layers
    if len(layer_tokens) != dims.layers:
        raise ValueError(f"layer_tokens has {len(layer_tokens)} entries for a {dims.layers}-layer tower")
    total = 2 * patches * dims.patch_dim * dims.hidden  # patch embedding
    for index, tokens in enumerate(layer_tokens):
        windowed = dims.window is not None and (
            dims.full_attention_layers is None or index not in dims.full_attention_layers)
        total += vision_layer_flops(dims, tokens, dims.window if windowed else None)
    return images * total


# --- projector ------------------------------------------------------------------------------------
def projector_flops(dims: ProjectorDims, tokens: int) -> int:
    """The projector producing ``tokens`` LLM tokens (all images together)."""
    return 2 * tokens * (dims.in_dim * dims.group * dims.hidden + dims.hidden * dims.out_dim)


# --- language model -------------------------------------------------------------------------------
def llm_layer_flops(dims: LLMDims, tokens: int) -> int:
    """One decoder layer over ``tokens`` positions (prefill, empty cache)."""
    d, q_width, kv_width = dims.hidden, dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    projections = 2 * tokens * d * (2 * q_width + 2 * kv_width)  # q, o and k, v
    attention = 2 * 2 * tokens * tokens * q_width
    mlp = 2 * tokens * d * dims.intermediate * (3 if dims.gated_mlp else 2)
    return projections + attention + mlp


def llm_flops(dims: LLMDims, text_tokens: int, layer_visual_tokens: Sequence[int], logits: int = 1) -> int:
    """Prefill of the language model: layer ``i`` sees ``text_tokens + layer_visual_tokens[i]``
    positions (one sample); ``logits`` positions go through the LM head."""
    if len(layer_visual_tokens) != dims.layers:
        raise ValueError(f"layer_visual_tokens has {len(layer_visual_tokens)} entries for {dims.layers} layers")
    layers = sum(llm_layer_flops(dims, text_tokens + visual) for visual in layer_visual_tokens)
    return layers + 2 * logits * dims.hidden * dims.vocab


def layer_visual_tokens(layers: int, visual: int, kept: int | None = None, site_layer: int | None = None) -> list[int]:
    """Visual tokens per decoder layer: ``visual`` everywhere, or ``kept`` from layer ``site_layer`` on
    (``llm(K)`` pruning); ``site_layer=0`` means pruned before the LLM."""
    if kept is None:
        return [visual] * layers
    start = 0 if site_layer is None else site_layer
    return [visual] * start + [kept] * (layers - start)


def kv_cache_bytes(dims: LLMDims, text_tokens: int, layer_visual_tokens: Sequence[int], bytes_per_value: int,
                   batch: int = 1) -> int:
    """Bytes of the key/value cache after prefill (each layer caches the positions it saw)."""
    per_position = 2 * dims.kv_heads * dims.head_dim * bytes_per_value
    return batch * per_position * sum(text_tokens + visual for visual in layer_visual_tokens)


def prefill_flops(dims: ModelDims, *, patches: int, images: int, text_tokens: int,
                  layer_visual_tokens: Sequence[int], projector_tokens: int | None = None,
                  vision_layer_tokens: Sequence[int] | None = None, logits: int = 1) -> dict[str, int]:
    """FLOPs of one prefill (one sample), split ``{"vision", "projector", "llm", "total"}``.

    patches: patches per image entering the tower; projector_tokens: tokens the projector outputs for
    all images (default: ``images * patches / group``, every patch; smaller after ``vision(L)`` pruning);
    layer_visual_tokens: visual tokens each decoder layer sees (all images together).
    """
    if projector_tokens is None:
        projector_tokens = images * patches // dims.projector.group
    split = {
        "vision": vision_flops(dims.vision, patches, images, vision_layer_tokens),
        "projector": projector_flops(dims.projector, projector_tokens),
        "llm": llm_flops(dims.llm, text_tokens, layer_visual_tokens, logits),
    }
    split["total"] = sum(split.values())
    return split


# --- what the integrations give -----------------------------------------------------------------
@dataclass(frozen=True)
class VisualCounts:
    """The visual part of one sample's prefill: ``images`` images, each ``patches`` patches entering the
    vision tower (prefix tokens such as [CLS] not counted) and ``tokens`` visual tokens in the language
    model's input (its placeholders) when nothing is pruned."""

    images: int
    patches: int
    tokens: int


def llm_dims_from_config(text: Any) -> LLMDims:
    """Dimensions of a Hugging Face decoder config (the Llama, Mistral and Qwen2 field names)."""
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return LLMDims(
        layers=int(text.num_hidden_layers), hidden=int(text.hidden_size), intermediate=int(text.intermediate_size),
        heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
        vocab=int(text.vocab_size),
    )


def dims_from_model(model: Any) -> ModelDims:
    """The dimensions of a loaded model, wrapped or not, as its family's integration gives them."""
    from vtoken.integrations.base import Integration  # imported when asked: this module stays pure math

    return Integration.for_model(model).model_dims()
