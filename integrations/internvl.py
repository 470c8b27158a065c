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
  (an int keep stays exact per image); ``guided`` (GlobalCom^2, "Compression with Global Guidance"): the
  thumbnail keeps its proportional share and the crops share the rest in proportion to the thumbnail's
  scores (the [CLS] attention when a stage asks for it, else feature norms) over the region each crop
  covers. The model's inputs do not carry the crop grid (rows x cols) the processor chose; ``crop_grid``
  recovers it from the pixels: laid out right and shrunk to a tile, the crops are the thumbnail again.
  A video's frames are separate images here, so its budget is per frame.
- The language model (Qwen2/Qwen3 or Llama-style) gets 1-D positions: ``projector`` and ``llm(K)`` sites.
  ``vision(L)`` is refused: see ``unsupported_sites``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken import kernels
from vtoken.flops import ModelDims, ProjectorDims, VisionDims, VisualCounts, llm_dims_from_config
from vtoken.registry import register_integration
from vtoken.sites import Site
from vtoken.stats import clock

from .base import captured_inputs
from .hf_vlm import Encoded, HFVisionLanguage, VisualBlock, VisualUnit
from .llava_next import split_budget
from .projector_signals import RECEIVED_ATTENTION_SITES, hidden_state_blocks

TILE_BUDGETS = ("global", "tile", "guided")


@register_integration("internvl")
class InternVLIntegration(HFVisionLanguage):
    model_types: ClassVar[tuple[str, ...]] = ("internvl",)
    options: ClassVar[dict[str, Any]] = {"positions": "compact", "tile_budget": "global"}
    unsupported_sites: ClassVar[dict[str, str]] = {
        "vision": "the tower's patch grid is read whole by pixel_shuffle, which folds every 2 x 2 block of patches "
                  "into one token, so tokens dropped inside the tower leave no grid to shuffle; prune at the "
                  "projector or in the LLM",
    }
    site_signals = RECEIVED_ATTENTION_SITES

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
        with captured_inputs(self.vision_layers(), wanted) as captured:
            output = self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True)
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
            split = self.settings["tile_budget"] != "global" and count > 1
            spans = [(t * per_tile, (t + 1) * per_tile) for t in range(count)] if split else [(0, count * per_tile)]
            budgets = [None]
            if split and self.settings["tile_budget"] == "guided" and count > 2:
                thumbnail = own_scores[-per_tile:] if own_scores is not None else own[-per_tile:].norm(dim=-1)
                pixels = inputs["pixel_values"][first:first + count]
                grid = crop_grid(pixels[:-1], pixels[-1])
                budgets = self._guided_budgets(thumbnail.float().view(side, side), grid, per_tile)
            elif split:
                budgets = self._tile_budgets(count, per_tile)
            for (lo, hi), budget in zip(spans, budgets):
                units.append(VisualUnit(
                    block=image, features=own[lo:hi], grid=(side, side) if hi - lo == per_tile else None,
                    index=torch.arange(lo, hi, device=features.device), budget=budget,
                    signals={} if own_scores is None else {"cls_attn": own_scores[lo:hi]},
                ))
            first += count
        return Encoded(blocks=blocks, units=units, scoring_seconds=seconds)

    def _image_budget(self, count: int, per_tile: int) -> int:
        """An image's budget: an int keep, or a fraction of its tokens (all tiles together)."""
        from vtoken.budget import resolve_keep

        keep = self.pipeline.site_keep(next(s for s in self.pipeline.sites if s.kind == "projector"))
        return resolve_keep(keep, count * per_tile, 1, "keep per image")

    def _tile_budgets(self, count: int, per_tile: int) -> list[int | None]:
        """Equal integer shares of an int keep per image (largest remainder); a fraction applies per tile."""
        keep = self.pipeline.site_keep(next(s for s in self.pipeline.sites if s.kind == "projector"))
        if isinstance(keep, float):
            return [None] * count
        return split_budget(self._image_budget(count, per_tile), [1.0] * count, [per_tile] * count)

    def _guided_budgets(self, thumbnail: Tensor, grid: tuple[int, int], per_tile: int) -> list[int]:
        """GlobalCom^2's split: the thumbnail keeps its proportional share; the crops share the rest in
        proportion to the thumbnail's score mass over the region each covers (crops row by row)."""
        rows, cols = grid
        count = rows * cols + 1
        budget = self._image_budget(count, per_tile)
        side = thumbnail.shape[0]
        mass = [float(thumbnail[r * side // rows:(r + 1) * side // rows, c * side // cols:(c + 1) * side // cols].sum())
                for r in range(rows) for c in range(cols)]
        share = budget / count
        weights = [w * (budget - share) / max(sum(mass), 1e-12) for w in mass] + [share]
        return split_budget(budget, weights, [per_tile] * count)

    def _shuffled(self, patch_scores: Tensor) -> Tensor:
        """Per tile, per token after the pixel shuffle: the mean score of its 2 x 2 block of patches, the
        blocks gathered by the model's own ``pixel_shuffle`` (a 1-channel map becomes 4 channels)."""
        tiles, patches = patch_scores.shape
        side = int(round(patches ** 0.5))
        grid = patch_scores.reshape(tiles, side, side, 1)
        shuffled = self.model.model.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        return shuffled.reshape(tiles, -1, shuffled.shape[-1]).mean(-1)

    def check_signal_options(self, site: Site, wanted: dict[str, dict]) -> None:
        if site.kind == "projector":  # the [CLS] layers exist (the same check the call makes)
            self._cls_layers(wanted, self.model.config.vision_feature_layer)

    def _cls_layers(self, signals: dict[str, dict], feature_layer: int) -> list[int]:
        """Encoder blocks whose [CLS] row is needed (hidden state h comes out of block h-1)."""
        if "cls_attn" not in signals:
            return []
        requested = signals["cls_attn"].get("layers") or [feature_layer]
        return hidden_state_blocks(requested, len(self.vision_layers()))

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
        input_ids = self.placeholder_prompt(tiles * per_tile, text_tokens, batch, generator, device)
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


def crop_grid(crops: Tensor, thumbnail: Tensor) -> tuple[int, int]:
    """The (rows, cols) of an image's crops, which the model's inputs do not carry: the processor resized
    the image to rows x cols tiles and cut them row by row, and the thumbnail is the whole image at one
    tile's size, so the right layout of the crops, shrunk to a tile, is the thumbnail again (up to
    resampling). Of the layouts with rows x cols = crops, the one closest to the thumbnail (mean squared
    difference after area shrinking); ties go to fewer rows."""
    count, channels, height, width = crops.shape
    best, best_error = (1, count), float("inf")
    for rows in range(1, count + 1):
        if count % rows:
            continue
        cols = count // rows
        canvas = crops.float().view(rows, cols, channels, height, width).permute(2, 0, 3, 1, 4)
        canvas = canvas.reshape(1, channels, rows * height, cols * width)
        shrunk = torch.nn.functional.interpolate(canvas, size=(height, width), mode="area")[0]
        error = float((shrunk - thumbnail.float()).pow(2).mean())
        if error < best_error:
            best, best_error = (rows, cols), error
    return best


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
