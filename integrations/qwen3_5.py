"""Qwen3.5 and Qwen3.5-MoE (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``).

Map of the model (what differs from Qwen3-VL, whose integration this one extends):
- The vision side is Qwen3-VL's without DeepStack (one merger); positions, images and timestamped video
  frames as Qwen3-VL's.
- The decoder is hybrid (``text_config.layer_types``): most layers are ``linear_attention`` (Gated
  DeltaNet: a causal convolution over the last few inputs and a recurrent state, both in the cache) and
  every few layers one is ``full_attention`` (keys and values in the cache; its ``q_proj`` gives, per head,
  the query followed by an output gate). The model hands the linear-attention layers a 2-D padding mask
  (None when nothing is padded or for a one-token decode step) and zeroes their padded inputs.

``llm(K)``: layers < K see every token, layers >= K the kept ones, for both kinds of layer and their
caches:
- full-attention layers >= K are shortened as in every decoder (``decoder.py``): hidden states, rotary
  table, positions and mask at the kept positions, so their key/value cache holds the kept tokens only.
- linear-attention layers >= K run their convolution and recurrence over the kept tokens in order, so
  their convolution window and recurrent state are built from those alone. The slots that fill the rows
  keeping fewer tokens (dead slots, on the batch's padding side) are handed to them as padding: an
  explicit 2-D mask goes in before the ``llm(K)`` hooks gather it, so a zero input at a dead slot leaves
  the state as it was (zero before a left-padded row's first token; after a right-padded row's last).
  In a cached decode step they keep the model's own mask: their state already holds the kept tokens.
- K must come after the first full-attention layer: transformers reads the prompt's length (decode
  positions, every step's mask size) from the first full-attention layer's cache, so that layer must
  hold the whole prompt, as a layer < K does.
- The signals (FastV's last-query attention, DART's key norms and text pivots) are recomputed from layer
  K-1's attention, so stages that need them run where layer K-1 is a full-attention layer; where it is a
  linear-attention layer there is no attention to read, and only stages without signals run (kcenter,
  random).
- No ``decode`` site: a linear-attention layer has no per-token cache entries to remove.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vtoken.flops import ModelDims
from vtoken.registry import register_integration
from vtoken.sites import Site

from .decoder_tensors import cache_of
from .qwen3_vl import Qwen3VLIntegration

LINEAR, FULL = "linear_attention", "full_attention"
#: per-call parts: whether the language model's current pass decodes from a filled cache, and the mask
#: the model gave the linear-attention layer now running
_DECODING = "qwen3_5_decoding"
_MODEL_MASK = "qwen3_5_linear_mask"


@register_integration("qwen3_5")
class Qwen3_5Integration(Qwen3VLIntegration):
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_5", "qwen3_5_moe")
    unsupported_sites: ClassVar[dict[str, str]] = {
        "vision": "its learned position table is resampled to each full grid inside the vision tower's forward",
        "decode": "its linear-attention layers keep a recurrent state, not per-token cache entries to remove",
    }

    # --- sites -----------------------------------------------------------------------------------
    def supported_site_kinds(self) -> tuple[str, ...]:
        return ("projector", "llm")

    def site_kinds(self) -> tuple[str, ...]:
        return self.supported_site_kinds()  # no decode site (see unsupported_sites)

    def layer_types(self) -> list[str]:
        return list(self.model.config.get_text_config().layer_types)

    def first_full_attention(self) -> int:
        types = self.layer_types()
        return types.index(FULL) if FULL in types else len(types)

    def layer_range(self, kind: str) -> range:
        if kind == "llm":
            return range(self.first_full_attention() + 1, len(self.layer_types()))
        return super().layer_range(kind)

    def layer_note(self, kind: str) -> str:
        if kind != "llm":
            return super().layer_note(kind)
        signal_sites = [k + 1 for k, kind_ in enumerate(self.layer_types()) if kind_ == FULL and k + 1 in
                        self.layer_range("llm")]
        return (f"transformers reads the prompt's length from the cache of the first full-attention layer "
                f"({self.first_full_attention()}), which must hold every token; stages with signals (fastv, dart) "
                f"need layer K-1 to be a full-attention layer: K in {signal_sites}")

    def check_pipeline(self) -> None:
        """The base checks, after a clearer refusal of a signal stage where layer K-1 has no attention."""
        for site in self.pipeline.sites:
            if site.kind != "llm" or site.layer is None or not self.pipeline.signals_at(site):
                continue
            layer = site.layer
            if layer in self.layer_range("llm") and self.layer_types()[layer - 1] != FULL:
                names = ", ".join(stage.name for stage in self.pipeline.stages_at(site))
                raise ValueError(f"{names} at {site} read(s) the attention of layer {layer - 1}, a linear-attention "
                                 f"layer in this {self.family} model; accepted: {self.layer_note('llm')}")
        super().check_pipeline()

    def provided_signals(self, site: Site) -> frozenset[str]:
        offered = super().provided_signals(site)
        if site.kind == "llm" and site.layer is not None and self.layer_types()[site.layer - 1] != FULL:
            return frozenset()  # layer K-1 is a linear-attention layer: no attention to read signals from
        return offered

    # --- linear-attention layers after an llm(K) site ---------------------------------------------
    def _install_hooks(self) -> None:
        super()._install_hooks()
        first = self.first_llm_site()
        if self.decoder is None or first is None:
            return
        language_model = self.language_model()
        self.hooks.add(language_model.register_forward_pre_hook(self._note_decoding, with_kwargs=True))
        for index, kind in enumerate(self.layer_types()):
            if index >= first and kind == LINEAR:
                layer = language_model.layers[index]
                # before the llm(K) hooks (prepend) and after them
                self.hooks.add(layer.register_forward_pre_hook(self._padding_mask_in, with_kwargs=True, prepend=True))
                self.hooks.add(layer.register_forward_pre_hook(self._padding_mask_out, with_kwargs=True))

    def _note_decoding(self, module: Any, args: tuple, kwargs: dict) -> None:
        call = self.current_call()
        if call is not None:
            cache = cache_of(kwargs)
            call.parts[_DECODING] = cache is not None and cache.get_seq_length() > 0

    def _padding_mask_in(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """A prefill (or no-cache) pass: give the layer an explicit 2-D padding mask over the decoder's
        input, which the llm(K) hooks then gather at the kept positions with the dead slots at 0."""
        call = self.current_call()
        if call is None:
            return None
        mask = kwargs.get("attention_mask")
        call.parts[_MODEL_MASK] = mask
        if mask is not None or call.parts.get(_DECODING):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        length = kwargs["position_embeddings"][0].shape[-2]  # the decoder input's length (not yet gathered)
        kwargs["attention_mask"] = torch.ones(hidden.shape[0], length, dtype=torch.long, device=hidden.device)
        return args, kwargs

    def _padding_mask_out(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """A cached decode step: the layer keeps the model's own mask (the llm(K) hooks shape masks for
        attention over cached keys, which a recurrent layer does not have)."""
        call = self.current_call()
        if call is None or not call.parts.get(_DECODING):
            return None
        kwargs["attention_mask"] = call.parts.pop(_MODEL_MASK, None)
        return args, kwargs

    def model_dims(self) -> ModelDims:
        raise self._lacks("model dimensions for FLOPs (its linear-attention decoder layers are not modelled)")
