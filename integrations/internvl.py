"""InternVL 2.5 / 3 / 3.5 (transformers' ``InternVLForConditionalGeneration``): tiles, pixel shuffle.

Map of the model:
- The processor cuts each image into tiles of the tower's size (a grid of crops chosen by aspect ratio,
  plus a thumbnail of the whole image, last, when there is more than one crop) and writes, per image,
  ``<img>`` + ``image_seq_length`` x tiles ``<IMG_CONTEXT>`` placeholders + ``</img>``. A video is its
  frames, each one tile written as ``FrameN: <img>...</img>``: to the model, a frame is an image.
- ``model.model.vision_tower``: InternViT. Its [CLS] is dropped ('default' strategy) and the f x f patch
  grid goes through ``pixel_shuffle`` (0.5: each 2 x 2 block of patches becomes one token of 4x the
  width), then the MLP projector: (f/2)^2 tokens per tile (256 for 448 px / patch 14).
- Units are the tokens after the shuffle. ``cls_attn`` is the tower's [CLS] row in the block that
  produces ``vision_feature_layer`` (recomputed from the block's input, ``layernorm_before``, ``q_proj``,
  ``k_proj`` and the q/k norms; InternViT keeps its [CLS] until the features are read), averaged over
  each token's 2 x 2 block of patches, which the model's own ``pixel_shuffle`` gathers.
- Tiles per image come from the placeholders: each run of ``<IMG_CONTEXT>`` in the prompt is one image
  (or frame), in the order of ``pixel_values``. Budgets (option ``tile_budget``): ``global`` (default)
  one budget per image over all its tiles, thumbnail included; ``tile``: each tile gets an equal share
  (an int keep stays exact per image). GlobalCom^2's guided split is not offered: the model's inputs do
  not carry the crop grid (rows x cols) the processor chose, so a crop's region in the thumbnail is
  unknown. A video's frames are separate images here, so its budget is per frame.
- The language model (Qwen2/Qwen3 or Llama-style) gets 1-D positions: ``projector`` and ``llm(K)`` sites.
  ``vision(L)`` is refused: see ``unsupported_sites``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken import kernels, signals
from vtoken.flops import ModelDims, ProjectorDims, VisionDims, VisualCounts, llm_dims_from_config
from vtoken.registry import register_integration
from vtoken.stats import clock

from .hf_vlm import Encoded, HFVisionLanguage, VisualBlock, VisualUnit
from .llava_next import split_budget
from .llava_onevision import capture_in_this_thread

TILE_BUDGETS = ("global", "tile")
_NO_VISION_SITE = ("the tower's patch grid is read whole by pixel_shuffle, which folds every 2 x 2 block of "
                   "patches into one token, so tokens dropped inside the tower leave no grid to shuffle; prune "
                   "at the projector or in the LLM")


@register_integration("internvl")
class InternVLIntegration(HFVisionLanguage):
    model_types: ClassVar[tuple[str, ...]] = ("internvl",)
    options: ClassVar[dict[str, Any]] = {"positions": "compact", "tile_budget": "global"}
    unsupported_sites: ClassVar[dict[str, str]] = {"vision": _NO_VISION_SITE}
    site_signals: ClassVar[dict[str, frozenset[str]]] = {
        "projector": frozenset({signals.CLS_ATTN}), "llm": signals.LLM,
    }

    def install(self) -> None:
        if self.settings["tile_budget"] not in TILE_BUDGETS:
            raise ValueError(f"tile_budget={self.settings['tile_budget']!r}; accepted: {', '.join(TILE_BUDGETS)}")
        super().install()

    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def vision_layers(self) -> torch.nn.ModuleList:
        return self.model.model.vision_tower.encoder.layer

    def encode_images(self, inputs: dict[str, Any], signals: dict[str, dict]) -> Encoded:
        config = self.model.config
        layer = inputs.get("vision_feature_layer") or config.vision_feature_layer
        strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if strategy != "default" or not isinstance(layer, int):
            raise ValueError(f"vtoken supports {self.family} with vision_feature_select_strategy='default' and one "
                             f"vision_feature_layer; got {strategy!r} and {layer!r}")
        wanted = self._cls_layers(signals, layer)
        captured: dict[int, Tensor] = {}
        handles = [self.vision_layers()[i].register_forward_pre_hook(capture_in_this_thread(captured, i),
                                                                     with_kwargs=True) for i in wanted]
        try:
            output = self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True)
        finally:
            for handle in handles:
                handle.remove()
        features = output.pooler_output  # [tiles, tokens per tile, D]
        start = clock(features.device)
        scores = None
        if wanted:
            rows = torch.stack([self._cls_row(self.vision_layers()[i], captured[i]) for i in wanted]).mean(0)
            scores = self._shuffled(rows[:, 1:])
        seconds = clock(features.device) - start
        per_tile = features.shape[1]
        side = int(round(per_tile ** 0.5))
        runs = _placeholder_runs(inputs["input_ids"], self.image_token_id())
        tiles = [length // per_tile for length in runs]
        if sum(tiles) != features.shape[0] or any(length % per_tile for length in runs):
            raise ValueError(f"the prompt's image placeholder runs {runs} do not hold the {features.shape[0]} tiles "
                             f"of {per_tile} tokens that pixel_values give; check that the processor and the "
                             "model match")
        blocks, units, first = [], [], 0
        for image, count in enumerate(tiles):
            own = features[first:first + count].reshape(count * per_tile, -1)
            own_scores = None if scores is None else scores[first:first + count].reshape(-1)
            blocks.append(VisualBlock(token_id=self.image_token_id(), size=count * per_tile))
            split = self.settings["tile_budget"] == "tile" and count > 1
            spans = [(t * per_tile, (t + 1) * per_tile) for t in range(count)] if split else [(0, count * per_tile)]
            budgets = self._tile_budgets(count, per_tile) if split else [None]
            for (lo, hi), budget in zip(spans, budgets):
                units.append(VisualUnit(
                    block=image, features=own[lo:hi], grid=(side, side) if hi - lo == per_tile else None,
                    index=torch.arange(lo, hi, device=features.device), budget=budget,
                    signals={} if own_scores is None else {"cls_attn": own_scores[lo:hi]},
                ))
            first += count
        return Encoded(blocks=blocks, units=units, scoring_seconds=seconds)

    def _tile_budgets(self, count: int, per_tile: int) -> list[int | None]:
        """Equal integer shares of an int keep per image (largest remainder); a fraction applies per tile."""
        keep = self.pipeline.site_keep(next(s for s in self.pipeline.sites if s.kind == "projector"))
        if isinstance(keep, float):
            return [None] * count
        from vtoken.budget import resolve_keep

        budget = resolve_keep(keep, count * per_tile, 1, "keep per image")
        return split_budget(budget, [1.0] * count, [per_tile] * count)

    def _shuffled(self, patch_scores: Tensor) -> Tensor:
        """Per tile, per token after the pixel shuffle: the mean score of its 2 x 2 block of patches, the
        blocks gathered by the model's own ``pixel_shuffle`` (a 1-channel map becomes 4 channels)."""
        tiles, patches = patch_scores.shape
        side = int(round(patches ** 0.5))
        grid = patch_scores.reshape(tiles, side, side, 1)
        shuffled = self.model.model.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        return shuffled.reshape(tiles, -1, shuffled.shape[-1]).mean(-1)

    def _cls_layers(self, signals: dict[str, dict], feature_layer: int) -> list[int]:
        """Encoder blocks whose [CLS] row is needed (hidden state h comes out of block h-1)."""
        if "cls_attn" not in signals:
            return []
        requested = signals["cls_attn"].get("layers") or [feature_layer]
        count = len(self.vision_layers())
        indices = []
        for hidden in requested:
            absolute = hidden if hidden >= 0 else count + 1 + hidden
            if not 1 <= absolute <= count:
                raise ValueError(f"cls_attn layer {hidden} is not a vision hidden state with an attention block; "
                                 f"accepted: 1..{count} or -{count}..-1 (as vision_feature_layer counts)")
            indices.append(absolute - 1)
        return indices

    def _cls_row(self, block: torch.nn.Module, hidden: Tensor) -> Tensor:
        """[CLS] attention over all tokens in an InternViT block, mean over heads: ``[tiles, 1 + N]``."""
        attention = block.attention
        normed = block.layernorm_before(hidden)
        batch, length, _ = normed.shape
        q = attention.q_norm(attention.q_proj(normed[:, :1]))
        k = attention.k_norm(attention.k_proj(normed))
        q = q.view(batch, 1, -1, attention.head_dim).transpose(1, 2)
        k = k.view(batch, length, -1, attention.head_dim).transpose(1, 2)
        return kernels.attention_rows(q, k, scale=attention.scale)[:, 0]

    # --- what bench, FLOPs and the demo ask a family ---
    def tokens_per_image(self) -> int | None:
        """None: an image's tile count depends on its size."""
        return None

    def tile_tokens(self) -> int:
        """Tokens a tile gives after the shuffle: (448 / 14 * 0.5)^2 = 256 for InternVL 2.5 / 3 / 3.5."""
        vision = self.model.config.vision_config
        side = _first(vision.image_size) // _first(vision.patch_size)
        return int(side * self.model.config.downsample_ratio) ** 2

    def model_dims(self) -> ModelDims:
        """InternViT ([CLS] + patches), the projector on each 2 x 2 shuffle group (LayerNorm, then an MLP from
        4x the tower's width) and the decoder."""
        config = self.model.config
        vision = config.vision_config
        llm = llm_dims_from_config(config.text_config)
        tower = VisionDims(layers=int(vision.num_hidden_layers), hidden=int(vision.hidden_size),
                           intermediate=int(vision.intermediate_size),
                           patch_dim=int(vision.num_channels) * _first(vision.patch_size) ** 2, prefix=1)
        group = int(round(1 / config.downsample_ratio)) ** 2
        return ModelDims(tower, ProjectorDims(in_dim=tower.hidden, hidden=llm.hidden, out_dim=llm.hidden, group=group),
                         llm)

    def synthetic_inputs(self, text_tokens: int, batch: int, seed: int, device: Any, dtype: Any,
                         visual_tokens: int | None = None) -> dict[str, Any]:
        """``<bos>``, half the text, one image of ``visual_tokens / 256`` tiles (default one tile: 256
        tokens), the rest of the text."""
        config = self.model.config
        per_tile = self.tile_tokens()
        tiles = 1 if visual_tokens is None else visual_tokens // per_tile
        if tiles < 1 or tiles * per_tile != (visual_tokens or per_tile):
            raise ValueError(f"{self.family} images give {per_tile} visual tokens a tile; visual_tokens="
                             f"{visual_tokens} cannot be made, accepted: a positive multiple of {per_tile} or None")
        generator = torch.Generator().manual_seed(seed)
        image = self.image_token_id()
        bos = getattr(config.text_config, "bos_token_id", None)
        bos = 1 if bos is None else int(bos)
        text = self.random_text_ids(int(config.text_config.vocab_size), text_tokens - 1, generator, avoid=[image, bos])
        ids = [bos] + text[:len(text) // 2] + [image] * (tiles * per_tile) + text[len(text) // 2:]
        input_ids = torch.tensor([ids] * batch, device=device)
        size = _first(config.vision_config.image_size)
        pixels = torch.randn(batch * tiles, 3, size, size, generator=generator).to(device=device, dtype=dtype)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}

    def visual_counts(self, inputs: dict[str, Any]) -> VisualCounts:
        """Row 0's images (all of one tile count, as the bench makes them)."""
        runs = _placeholder_runs(inputs["input_ids"][:1], self.image_token_id())
        vision = self.model.config.vision_config
        patches = (_first(vision.image_size) // _first(vision.patch_size)) ** 2
        tiles = runs[0] // self.tile_tokens()
        return VisualCounts(images=len(runs), patches=tiles * patches, tokens=runs[0])

    def run_vision(self, inputs: dict[str, Any]) -> Any:
        config = self.model.config
        with torch.no_grad():
            return self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output


def _first(value: Any) -> int:
    """An int config field that may be given per axis (``image_size=[448, 448]``): its first value."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _placeholder_runs(input_ids: Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id`` in the batch, row by row, left to right."""
    runs = []
    for row in (input_ids == token_id).tolist():
        length = 0
        for hit in row + [False]:
            if hit:
                length += 1
            elif length:
                runs.append(length)
                length = 0
    return runs
