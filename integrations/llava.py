"""LLaVA-1.5 (transformers' ``LlavaForConditionalGeneration``; Llama/Vicuna and Mistral text models).

Map of the model:
- ``model.model.vision_tower``: CLIP ViT. Hidden state ``vision_feature_layer`` (-2 for LLaVA-1.5)
  without [CLS] ("default" strategy) gives 576 patch tokens on a 24 x 24 grid for 336px / patch 14.
  [CLS] attention for ``cls_attn`` is recomputed from the encoder layer that produces that hidden
  state: its input (captured by a temporary forward pre-hook), ``layer_norm1``, ``q_proj`` for the
  [CLS] row only, ``k_proj`` for all tokens.
- ``model.model.multi_modal_projector``: 2-layer MLP; the ``projector`` site is its output.
- ``<image>`` placeholders (``config.image_token_id``) in ``input_ids``: one per feature; what shrinks
  before the LLM is the placeholders, the embeddings, the attention mask, labels and (with
  ``positions='original'``) the position ids.
- ``model.model.language_model``: Llama/Mistral decoder; the ``llm(K)`` site lives there.
Positions default to ``compact`` (kept tokens are renumbered), as published LLaVA pruning results use.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken import kernels, signals
from vtoken.flops import ModelDims, ProjectorDims, VisionDims, VisualCounts, llm_dims_from_config
from vtoken.registry import register_integration
from vtoken.sites import Site
from vtoken.stats import clock

from .base import captured_inputs
from .hf_vlm import Encoded, HFVisionLanguage, VisualUnit
from .projector_signals import clip_received_attention, encoder_attn_blocks, hidden_state_blocks, projection_hooks
from .vit_sites import EncoderLayout


@register_integration("llava")
class LlavaIntegration(HFVisionLanguage):
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    options: ClassVar[dict[str, Any]] = {"positions": "compact"}

    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    site_signals: ClassVar[dict[str, frozenset[str]]] = {
        "vision": signals.VISION, "llm": signals.LLM,
        "projector": frozenset({signals.CLS_ATTN, signals.ENCODER_ATTN, signals.PROMPT_TEXT}),
    }

    def site_layers(self) -> dict[str, int]:
        return {"llm": len(self.language_model().layers), "vision": len(self.vision_layers())}

    def layer_range(self, kind: str) -> range:
        if kind == "vision":  # only blocks before the one that produces the features LLaVA reads
            return range(0, self._first_feature_block(self.model.config.vision_feature_layer))
        return super().layer_range(kind)

    def plain_prompt(self) -> tuple[str, str] | None:
        if self.family != "llava":  # LLaVA-NeXT's format depends on its language model
            return None
        return "LLaVA-1.5's plain format", "USER: {image}\n{question} ASSISTANT:"

    def layer_note(self, kind: str) -> str:
        if kind != "vision":
            return ""
        block = self._first_feature_block(self.model.config.vision_feature_layer)
        return f"blocks before block {block}, which produces the vision feature layer LLaVA reads"

    def supported_site_kinds(self) -> tuple[str, ...]:
        return ("vision", "projector", "llm")

    def encoder_layout(self) -> EncoderLayout:
        config = self.model.config.vision_config
        side = config.image_size // config.patch_size
        return EncoderLayout(blocks=self.vision_layers(), prefix=1, grid=(side, side),
                             mlp=lambda block: block.mlp, cls_row=self._cls_row)

    def _first_feature_block(self, feature_layer: int | list[int]) -> int:
        """The first block whose output LLaVA reads as features (hidden state h comes out of block h-1):
        pruning must happen before it, so that the features LLaVA reads are the pruned ones."""
        count = len(self.vision_layers())
        layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        return min((h if h >= 0 else count + 1 + h) - 1 for h in layers)

    def _check_vision_sites(self, feature_layer: int | list[int]) -> None:
        """A call may ask for another ``vision_feature_layer`` than the config's: check it again."""
        first_block = self._first_feature_block(feature_layer)
        for site in self.pipeline.sites:
            if site.kind == "vision" and site.layer >= first_block:
                raise ValueError(f"{site} is at or after the vision feature layer's block ({first_block}); "
                                 f"accepted: vision(L) with 0 <= L < {first_block} (or prune at the projector)")

    def vision_layers(self) -> torch.nn.ModuleList:
        tower = self.model.model.vision_tower
        # CLIPVisionModel holds the encoder directly in transformers 5.x; older layouts nest a vision_model
        return getattr(tower, "vision_model", tower).encoder.layers

    def encode_images(self, inputs: dict[str, Any], signals: dict[str, dict]) -> Encoded:
        config = self.model.config
        layer = inputs.get("vision_feature_layer") or config.vision_feature_layer
        strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        pixel_values = inputs["pixel_values"]
        wanted_layers = self._cls_layers(signals, layer)
        attn_blocks = self._encoder_attn_blocks(signals, layer)
        if self.encoder_sites is not None:
            self._check_vision_sites(layer)
        projected, hooks = projection_hooks(self.vision_layers(), attn_blocks)
        with captured_inputs(self.vision_layers(), wanted_layers + attn_blocks, *hooks) as captured:
            extra = {"image_sizes": inputs["image_sizes"]} if inputs.get("image_sizes") is not None else {}
            output = self.model.model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True, **extra,
            )
        features = output.pooler_output
        features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        grid, index = (side, side), None
        if self.encoder_sites is not None:
            pruned, pruned_grid = self.encoder_sites.result()
            if pruned is not None:
                grid, index = pruned_grid, pruned
        if strategy != "default":
            grid = None  # [CLS] is one of the tokens: no pure grid
        computed: dict[str, Tensor] = {}
        start = clock(features.device)
        if "cls_attn" in signals:
            rows = torch.stack([
                self._cls_row(self.vision_layers()[i], captured[i]) for i in wanted_layers
            ]).mean(0)
            computed["cls_attn"] = rows[:, 1:] if strategy == "default" else rows
        if attn_blocks:  # HiPrune's object and deep layers, one column each
            rows = torch.stack([clip_received_attention(self.vision_layers()[i], captured[i], projected.get(i))
                                for i in attn_blocks], -1)
            computed["encoder_attn"] = rows[:, 1:] if strategy == "default" else rows
        scoring = clock(features.device) - start
        units = [
            VisualUnit(block=i, features=features[i], grid=grid,
                       signals={name: value[i] for name, value in computed.items()},
                       index=None if index is None else index[i])
            for i in range(features.shape[0])
        ]
        slots = side * side + (1 if strategy != "default" else 0)
        return Encoded.one_block_per_unit(self.image_token_id(), units, slots=slots, scoring_seconds=scoring)

    def _encoder_attn_blocks(self, signals: dict[str, dict], feature_layer: int | list[int]) -> list[int]:
        """The blocks of ``encoder_attn`` (HiPrune): by default layer 9 of CLIP-L's 24 (scaled to the depth)
        and the block that produces the feature layer."""
        if "encoder_attn" not in signals:
            return []
        deep = self._cls_layers({"cls_attn": {}}, feature_layer)[0]
        return encoder_attn_blocks(signals["encoder_attn"], len(self.vision_layers()), 9 / 24, deep, self.family)

    def check_signal_options(self, site: Site, wanted: dict[str, dict]) -> None:
        if site.kind == "projector":  # the [CLS] layers exist (the same check the call makes)
            self._cls_layers(wanted, self.model.config.vision_feature_layer)

    def _cls_layers(self, signals: dict[str, dict], feature_layer: int | list[int]) -> list[int]:
        """Encoder layer indices whose [CLS] attention is needed (hidden state h comes out of layer h-1)."""
        if "cls_attn" not in signals:
            return []
        requested = signals["cls_attn"].get("layers")
        if requested is None:
            requested = [feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer]
        return hidden_state_blocks(requested, len(self.vision_layers()))

    def _cls_row(self, layer: torch.nn.Module, hidden: Tensor) -> Tensor:
        """[CLS] attention over all tokens in a CLIP encoder layer, mean over heads: ``[B, N]``."""
        attention = layer.self_attn
        normed = layer.layer_norm1(hidden)
        batch, length, _ = normed.shape
        q = attention.q_proj(normed[:, :1]).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
        k = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        return kernels.attention_rows(q, k, scale=attention.scale)[:, 0]

    # --- what bench, FLOPs and the demo ask a family ---
    def patch_side(self) -> int:
        """Patches per side of the square image the CLIP tower takes (336 px / 14 px -> 24)."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def model_dims(self) -> ModelDims:
        """CLIP ViT ([CLS] + patches), the 2-layer MLP projector (on the concatenated feature layers when
        ``vision_feature_layer`` is a list) and the decoder."""
        config = self.model.config
        vision = config.vision_config
        llm = llm_dims_from_config(config.text_config)
        layers = config.vision_feature_layer
        concatenated = len(layers) if isinstance(layers, (list, tuple)) else 1
        tower = VisionDims(
            layers=int(vision.num_hidden_layers), hidden=int(vision.hidden_size),
            intermediate=int(vision.intermediate_size),
            patch_dim=int(getattr(vision, "num_channels", 3)) * vision.patch_size ** 2, prefix=1,
        )
        projector = ProjectorDims(in_dim=tower.hidden * concatenated, hidden=llm.hidden, out_dim=llm.hidden)
        return ModelDims(tower, projector, llm)

    def tokens_per_image(self) -> int | None:
        """Every image gives the tower's patch grid (plus [CLS] with the 'full' feature strategy)."""
        full = self.model.config.vision_feature_select_strategy != "default"
        return self.patch_side() ** 2 + (1 if full else 0)

    def synthetic_inputs(self, text_tokens: int, batch: int, seed: int, device: Any, dtype: Any,
                         visual_tokens: int | None = None) -> dict[str, Any]:
        """``<bos>``, half the text, the image's placeholders, the rest of the text; a square image of
        the tower's size (its token count is fixed: ``visual_tokens`` may only repeat it)."""
        config = self.model.config
        fixed = self.tokens_per_image()
        if visual_tokens is not None and visual_tokens != fixed:
            raise ValueError(f"{self.family} images give {fixed} visual tokens each (the tower's fixed image "
                             f"size); visual_tokens={visual_tokens} cannot be made, accepted: {fixed} or None")
        generator = torch.Generator().manual_seed(seed)
        input_ids = self.placeholder_prompt(fixed, text_tokens, batch, generator, device)
        size = config.vision_config.image_size
        pixels = torch.randn(batch, 3, size, size, generator=generator).to(device=device, dtype=dtype)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}

    def visual_counts(self, inputs: dict[str, Any]) -> VisualCounts:
        tokens = self.tokens_per_image()
        images = int((inputs["input_ids"][0] == self.image_token_id()).sum()) // tokens
        return VisualCounts(images=images, patches=self.patch_side() ** 2, tokens=tokens)

    def run_vision(self, inputs: dict[str, Any]) -> Any:
        config = self.model.config
        extra = {"image_sizes": inputs["image_sizes"]} if inputs.get("image_sizes") is not None else {}
        with torch.no_grad():
            return self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy, **extra,
            ).pooler_output

    def unit_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int] | None]:
        """One unit per image, on the tower's square patch grid ([CLS] among the tokens: no grid)."""
        side = self.patch_side()
        grid = (side, side) if self.model.config.vision_feature_select_strategy == "default" else None
        return [grid] * int(inputs["pixel_values"].shape[0])

    def overlay_view(self, image: Any, processor: Any) -> Any:
        """The image resized and centre-cropped as a CLIP image processor does (shortest edge, then crop)."""
        from PIL import Image

        ip = getattr(processor, "image_processor", None)
        size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
        shortest = _size_value(size, "shortest_edge")
        if getattr(ip, "do_resize", True) and shortest:
            scale = shortest / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BICUBIC)
        elif getattr(ip, "do_resize", True) and _size_value(size, "height") and _size_value(size, "width"):
            image = image.resize((_size_value(size, "width"), _size_value(size, "height")), Image.BICUBIC)
        ch, cw = _size_value(crop, "height"), _size_value(crop, "width")
        if getattr(ip, "do_center_crop", False) and ch and cw:
            left, top = (image.width - cw) // 2, (image.height - ch) // 2
            image = image.crop((left, top, left + cw, top + ch))
        return image


def _size_value(size: Any, key: str) -> int | None:
    """One entry of an image processor's ``size``/``crop_size`` (a dict or an object), None when unset."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None
