"""LLaVA-OneVision (transformers' ``LlavaOnevisionForConditionalGeneration``): SigLIP, AnyRes-max, video.

Map of the model:
- ``model.model.vision_tower``: SigLIP. It has no [CLS] token: with the 'full' feature strategy (the
  released checkpoints') hidden state ``vision_feature_layer`` gives every patch, 27 x 27 = 729 for
  384 px / patch 14. ``cls_attn`` therefore scores each patch by the attention it *receives* in the
  encoder layer that produces that hidden state (mean over heads and query patches), recomputed from the
  layer's input (a temporary forward pre-hook), ``layer_norm1``, ``q_proj`` and ``k_proj`` by
  ``vtoken.kernels.attention_received``, which never builds the N x N map.
- Images, one per prompt: a base view plus the crops of an ``image_grid_pinpoints`` canvas (LLaVA-NeXT's
  AnyRes). ``pack_image_features`` lays out the base view's tokens, then the crop canvas row by row,
  unpadded to the image's aspect ratio and, when it holds more than ``anyres_max_<n>`` views' worth of
  tokens, bilinearly shrunk ("AnyRes-max"); each canvas row ends with ``image_newline``.
  vtoken learns the layout from the model itself: it runs the model's own packing on a few channels
  (newline marker, crop row, crop column, patch score). Packing is linear, so after the shrink each
  token's score is the same bilinear blend of patch scores that its feature is of patch features, and
  its view is the crop its (blended) crop row and column round to.
- Several images in one prompt (``batch_num_images`` > 1): each image is the base view alone, followed
  by one newline.
- Videos: every frame's base view, projected, then ``apply_pooling`` (bilinear to ceil(h/2) x ceil(w/2):
  2 x 2 pooling for even grids), frames one after another, and one newline at the end of the clip. The
  per-patch scores are pooled by the same ``apply_pooling``.
- Budgets: ``anyres_budget`` splits an image's budget as LLaVA-NeXT does (``global`` one budget over
  base and crops, ``view`` proportional shares, ``guided`` crops weighted by the base view's scores over
  the region they cover, GlobalCom^2); ``video_budget`` gives a clip one budget (``clip``) or each frame
  its own (``frame``). An int keep is per image (per clip or frame for videos) in every mode. A clip's
  unit is its frames' pooled tokens with their (frames, h, w) layout (``TokenSet.layout``: ``dycoke`` and
  ``holitom`` compare each place across frames); its final newline is not in the unit.
- Newlines are structure, not budget: an image's row-end newline stays while its row keeps a token
  (a lone base view is one row, so its newline always stays); a clip's final newline always stays.
  With ``keep=64`` the language model receives 64 visual tokens per image, plus one newline per kept
  canvas row (one in all for a base view alone), or per clip 64 plus one newline.
- The language model (Qwen2) is LLaVA's kind: the ``llm(K)`` site works as for LLaVA.
- ``vision(L)`` is refused: see ``unsupported_sites``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken.flops import ModelDims, VisualCounts
from vtoken.registry import register_integration
from vtoken.stats import clock

from .base import captured_inputs
from .hf_vlm import Encoded, VisualBlock, VisualUnit
from .llava import LlavaIntegration
from .llava_next import ANYRES_BUDGETS, LlavaNextIntegration, _newline_rule
from .projector_signals import RECEIVED_ATTENTION_SITES, clip_received_attention, projection_hooks

VIDEO_BUDGETS = ("clip", "frame")
_NO_VISION_SITE = ("the AnyRes-max packing unpads and bilinearly shrinks every view's full patch grid, and video "
                   "frames are pooled from the full grid, so a view with tokens dropped inside the tower has no "
                   "layout the model's own packing accepts; prune at the projector or in the LLM")


@register_integration("llava_onevision")
class LlavaOnevisionIntegration(LlavaNextIntegration):
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    options: ClassVar[dict[str, Any]] = {"positions": "compact", "anyres_budget": "global", "video_budget": "clip"}
    image_inputs: ClassVar[tuple[str, ...]] = (
        "pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos", "batch_num_images",
    )
    unsupported_sites: ClassVar[dict[str, str]] = {"vision": _NO_VISION_SITE}
    site_signals = RECEIVED_ATTENTION_SITES

    def install(self) -> None:
        if self.settings["video_budget"] not in VIDEO_BUDGETS:
            raise ValueError(f"video_budget={self.settings['video_budget']!r}; accepted: {', '.join(VIDEO_BUDGETS)}")
        gridded = [stage for stage in self.pipeline.stages if stage.needs_grid and stage.site.kind == "projector"]
        if gridded and all(getattr(stage, "needs_clip", False) for stage in gridded):
            # clip stages (dycoke, holitom) take a clip's (frames, h, w) layout and refuse images at call time,
            # so LLaVA-NeXT's check that an image's views each form a grid does not concern them
            if self.settings["anyres_budget"] not in ANYRES_BUDGETS:
                raise ValueError(f"anyres_budget={self.settings['anyres_budget']!r}; accepted: "
                                 f"{', '.join(ANYRES_BUDGETS)}")
            LlavaIntegration.install(self)
            return
        super().install()

    def supported_site_kinds(self) -> tuple[str, ...]:
        return ("projector", "llm")  # not LLaVA-NeXT's: see unsupported_sites for vision(L)

    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    def _has_images(self, inputs: dict[str, Any]) -> bool:
        return inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None

    def encode_images(self, inputs: dict[str, Any], signals: dict[str, dict]) -> Encoded:
        config = self.model.config
        layer = inputs.get("vision_feature_layer") or config.vision_feature_layer
        strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(f"vtoken supports {self.family} with vision_feature_select_strategy='full' (its SigLIP "
                             f"tower has no [CLS] to drop); got {strategy!r}")
        wanted = self._cls_layers(signals, layer)
        blocks: list[VisualBlock] = []
        units: list[VisualUnit] = []
        seconds = 0.0
        if inputs.get("pixel_values") is not None:
            seconds += self._encode_stills(inputs, layer, wanted, blocks, units)
        if inputs.get("pixel_values_videos") is not None:
            seconds += self._encode_videos(inputs, layer, wanted, blocks, units)
        return _in_placeholder_order(Encoded(blocks=blocks, units=units, scoring_seconds=seconds),
                                     inputs["input_ids"])

    # --- scoring ---------------------------------------------------------------------------------
    def _run_tower(self, wanted: list[int], run: Any) -> tuple[Any, tuple[dict, dict]]:
        """``run()`` with the wanted layers' inputs and query and key projections captured."""
        projected, hooks = projection_hooks(self.vision_layers(), wanted)
        with captured_inputs(self.vision_layers(), wanted, *hooks) as captured:
            return run(), (captured, projected)

    def _received(self, wanted: list[int], captured: tuple[dict, dict]) -> Tensor | None:
        """Per view (or frame), per patch: the attention it receives, mean over the wanted layers ``[V, N]``."""
        if not wanted:
            return None
        inputs, projected = captured
        return torch.stack([clip_received_attention(self.vision_layers()[i], inputs[i], projected.get(i))
                            for i in wanted]).mean(0)

    # --- images ----------------------------------------------------------------------------------
    def _encode_stills(self, inputs: dict[str, Any], layer: Any, wanted: list[int], blocks: list[VisualBlock],
                       units: list[VisualUnit]) -> float:
        config = self.model.config
        image_sizes = inputs.get("image_sizes")
        if image_sizes is None:
            raise ValueError(f"{self.family} needs image_sizes with pixel_values (the processor returns them)")
        batch_num_images = inputs.get("batch_num_images")
        output, captured = self._run_tower(wanted, lambda: self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=image_sizes, vision_feature_layer=layer,
            vision_feature_select_strategy="full", batch_num_images=batch_num_images, return_dict=True))
        packed = list(output.pooler_output)
        start = clock(packed[0].device)
        scores = self._received(wanted, captured)
        side = config.vision_config.image_size // config.vision_config.patch_size
        views = self._views_per_image(image_sizes, batch_num_images)
        layouts = self._stills_layout(views, image_sizes, scores, side)
        seconds = clock(packed[0].device) - start
        mode = self.settings["anyres_budget"]
        for features, (layout, token_score, canvas) in zip(packed, layouts):
            if layout.numel() != features.shape[0]:
                raise RuntimeError(f"{self.family} packing layout does not match the packed features")
            layout, token_score = layout.to(features.device), token_score.to(features.device)
            block = len(blocks)
            blocks.append(VisualBlock(token_id=self.image_token_id(), size=features.shape[0], fill=features,
                                      finalize=_newline_rule(layout, side)))
            tokens = (layout >= 0).nonzero()[:, 0]
            view_of = layout[tokens] // (side * side)
            signal = token_score[tokens] if scores is not None else None
            groups = [tokens] if mode == "global" else [
                tokens[view_of == v] for v in range(int(view_of.max()) + 1) if bool((view_of == v).any())]
            budgets = [None]
            if len(groups) > 1:
                basis = signal if signal is not None else features[tokens].norm(dim=-1)
                budgets = self._split(groups, layout, side, basis, tokens, mode == "guided", canvas)
            for slots, budget in zip(groups, budgets):
                base_alone = int(slots.numel()) == side * side and bool((layout[slots] < side * side).all())
                units.append(VisualUnit(
                    block=block, features=features[slots], grid=(side, side) if base_alone else None, index=slots,
                    budget=budget,
                    signals={} if signal is None else {"cls_attn": signal[torch.searchsorted(tokens, slots)]},
                ))
        return seconds

    def _views_per_image(self, image_sizes: Tensor, batch_num_images: Any) -> list[int]:
        """Base view + crops for a prompt's only image, the base view alone for several (the model's rule)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        config = self.model.config
        patching = [True] * len(image_sizes) if batch_num_images is None else [
            int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                if patch else 1 for size, patch in zip(image_sizes, patching)]

    def _stills_layout(self, views: list[int], image_sizes: Tensor, scores: Tensor | None,
                       side: int) -> list[tuple[Tensor, Tensor, tuple[int, int] | None]]:
        """Per image: each packed slot's view * side^2 + patch (base view) or view * side^2 (crop), -1 for a
        newline; each slot's score; the crop canvas (rows, cols). Read from the model's own packing of four
        channels: newline marker, crop row, crop column, score."""
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        config = self.model.config
        channels, canvases, offset = [], [], 0
        for size, count in zip(image_sizes, views):
            values = torch.zeros(count, side * side, 4, dtype=torch.float64)
            canvas = None
            if count > 1:
                canvas = tuple(get_anyres_image_grid_shape(size, config.image_grid_pinpoints,
                                                           config.vision_config.image_size))
                crop = torch.arange(count - 1, dtype=torch.float64)
                values[1:, :, 1] = (crop // canvas[1])[:, None]
                values[1:, :, 2] = (crop % canvas[1])[:, None]
            if scores is not None:
                values[:, :, 3] = scores[offset:offset + count].double().cpu()
            channels.append(values)
            canvases.append(canvas)
            offset += count
        newline = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        packed, _ = self.model.model.pack_image_features(channels, image_sizes.cpu(), image_newline=newline,
                                                         vision_aspect_ratio=config.vision_aspect_ratio)
        out = []
        for values, canvas, count in zip(packed, canvases, views):
            is_newline = values[:, 0] > 0.5
            layout = torch.arange(values.shape[0], dtype=torch.long)  # base view alone: patch = slot
            if count > 1:
                view = 1 + values[:, 1].round().long() * canvas[1] + values[:, 2].round().long()
                layout = torch.where(layout < side * side, layout, view * side * side)
            out.append((layout.masked_fill(is_newline, -1), values[:, 3].float(), canvas))
        return out

    # --- videos ----------------------------------------------------------------------------------
    def _encode_videos(self, inputs: dict[str, Any], layer: Any, wanted: list[int], blocks: list[VisualBlock],
                       units: list[VisualUnit]) -> float:
        videos = inputs["pixel_values_videos"]
        clips, frames = videos.shape[:2]
        output, captured = self._run_tower(wanted, lambda: self.model.model.get_video_features(
            pixel_values_videos=videos, vision_feature_layer=layer, vision_feature_select_strategy="full",
            return_dict=True))
        features = output.pooler_output  # [clips, frames * pooled + 1, D]: the clip's newline last
        start = clock(features.device)
        scores = self._received(wanted, captured)
        if scores is not None:  # pooled exactly as the features are
            scores = self.model.model.apply_pooling(scores[..., None]).reshape(clips, -1).to(features.device)
        seconds = clock(features.device) - start
        tokens = features.shape[1] - 1
        pooled = tokens // frames
        height = -(-(self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size) // 2)
        grid = (height, pooled // height)
        per_frame = self.settings["video_budget"] == "frame"
        for clip in range(clips):
            block = len(blocks)
            blocks.append(VisualBlock(token_id=self.video_token_id(), size=tokens + 1, fill=features[clip],
                                      finalize=_keep_last))
            spans = [(f * pooled, (f + 1) * pooled) for f in range(frames)] if per_frame else [(0, tokens)]
            for lo, hi in spans:
                slots = torch.arange(lo, hi, device=features.device)
                # a whole clip's (frames, h, w) is its layout (temporal stages compare each place across frames)
                units.append(VisualUnit(
                    block=block, features=features[clip, lo:hi], grid=grid if per_frame else (frames, *grid),
                    index=slots,
                    signals={} if scores is None else {"cls_attn": scores[clip, lo:hi]},
                ))
        return seconds

    # --- what bench, FLOPs and the demo ask a family ---
    def synthetic_inputs(self, text_tokens: int, batch: int, seed: int, device: Any, dtype: Any,
                         visual_tokens: int | None = None) -> dict[str, Any]:
        """``<bos>``, half the text, one square image of the tower's size (a base view and one crop: 2 x 729
        patches and 729 + 27 x 28 = 1,485 placeholders, newlines included, for the 7B), the rest of the text."""
        config = self.model.config
        size = config.vision_config.image_size
        side = size // config.vision_config.patch_size
        image_sizes = torch.tensor([[size, size]] * batch)
        views = self._views_per_image(image_sizes[:1], None)[0]
        tokens = self._stills_layout([views], image_sizes[:1], None, side)[0][0].numel()
        if visual_tokens is not None and visual_tokens != tokens:
            raise ValueError(f"{self.family} bench images are the tower's square size and give {tokens} visual "
                             f"tokens each; visual_tokens={visual_tokens} cannot be made, accepted: {tokens} or None")
        generator = torch.Generator().manual_seed(seed)
        input_ids = self.placeholder_prompt(tokens, text_tokens, batch, generator, device,
                                            avoid=[self.video_token_id()])
        pixels = torch.randn(batch, views, 3, size, size, generator=generator).to(device=device, dtype=dtype)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels,
                "image_sizes": image_sizes.to(device), "batch_num_images": torch.ones(batch, dtype=torch.long)}

    def synthetic_video_inputs(self, text_tokens: int, batch: int, seed: int, device: Any, dtype: Any,
                               frames: int) -> dict[str, Any]:
        """As ``synthetic_inputs`` with a clip of ``frames`` frames of the tower's square size in the image's
        place (each pooled to ceil(side/2)^2 tokens, 14 x 14 = 196 for the 7B, and one newline after the
        clip): one random scene, each frame it with a little noise and a moving band of new content."""
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"video_frames={frames!r}; accepted: an int >= 1, e.g. 8")
        config = self.model.config
        size = config.vision_config.image_size
        pooled = (-(-(size // config.vision_config.patch_size) // 2)) ** 2
        generator = torch.Generator().manual_seed(seed)
        bos = getattr(config.text_config, "bos_token_id", None)
        bos = 1 if bos is None else int(bos)
        text = self.random_text_ids(int(config.text_config.vocab_size), text_tokens - 1, generator,
                                    avoid=[self.image_token_id(), self.video_token_id(), bos])
        ids = [bos] + text[:len(text) // 2] + [self.video_token_id()] * (frames * pooled + 1) + text[len(text) // 2:]
        scene = torch.randn(3, size, size, generator=generator)
        clip = scene + 0.05 * torch.randn(frames, 3, size, size, generator=generator)
        band = size // 4
        for frame in range(frames):
            top = frame * band % (size - band + 1)
            clip[frame, :, top:top + band] = torch.randn(3, band, size, generator=generator)
        input_ids = torch.tensor([ids] * batch, device=device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values_videos": clip.repeat(batch, 1, 1, 1, 1).to(device=device, dtype=dtype)}

    def visual_counts(self, inputs: dict[str, Any]) -> VisualCounts:
        """Row 0's images (all of one size, as the bench makes them): the tower sees every view's patches,
        the language model the packed placeholders (newlines included). A sample of one clip (no images):
        each frame counts as an image of its pooled tokens (the clip's one newline is left to the text)."""
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        videos = inputs.get("pixel_values_videos")
        if videos is not None and inputs.get("pixel_values") is None:
            return VisualCounts(images=int(videos.shape[1]), patches=side * side, tokens=(-(-side // 2)) ** 2)
        if videos is not None or inputs.get("pixel_values") is None:
            raise NotImplementedError(f"visual counts for {self.family} cover images or one clip, not both")
        per_row = inputs.get("batch_num_images")
        images = 1 if per_row is None else int(per_row[0])
        views = self._views_per_image(inputs["image_sizes"][:images], per_row[:1] if per_row is not None else None)
        tokens = int((inputs["input_ids"][0] == self.image_token_id()).sum()) // images
        return VisualCounts(images=images, patches=views[0] * side * side, tokens=tokens)

    def run_vision(self, inputs: dict[str, Any]) -> Any:
        config = self.model.config
        with torch.no_grad():
            if inputs.get("pixel_values") is None and inputs.get("pixel_values_videos") is not None:
                return self.model.model.get_video_features(
                    pixel_values_videos=inputs["pixel_values_videos"], vision_feature_layer=config.vision_feature_layer,
                    vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True,
                ).pooler_output
            return self.model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                batch_num_images=inputs.get("batch_num_images"), vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output

    def model_dims(self) -> ModelDims:
        """LLaVA's, with no [CLS] token in the SigLIP tower."""
        dims = super().model_dims()
        return dataclasses.replace(dims, vision=dataclasses.replace(dims.vision, prefix=0))

    def unit_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int] | None]:
        raise NotImplementedError(f"unit grids for {self.family} are not implemented: an image's units depend on "
                                  "its views, the AnyRes-max shrink and batch_num_images")


def _in_placeholder_order(encoded: Encoded, input_ids: Tensor) -> Encoded:
    """Blocks and units reordered as their placeholders come in the batch (row by row): images and videos
    interleave there, while the model encodes all images, then all videos. Blocks of one kind keep their
    order, which is what fills that kind's placeholders."""
    start = [0] * len(encoded.blocks)
    for token_id in dict.fromkeys(block.token_id for block in encoded.blocks):
        positions = (input_ids == token_id).flatten().nonzero()[:, 0].tolist()
        offset = 0
        for b, block in enumerate(encoded.blocks):
            if block.token_id == token_id:  # too few placeholders: prepare() names the mismatch
                start[b] = positions[offset] if offset < len(positions) else input_ids.numel()
                offset += block.size
    order = sorted(range(len(encoded.blocks)), key=start.__getitem__)
    new_index = {old: new for new, old in enumerate(order)}
    for unit in encoded.units:
        unit.block = new_index[unit.block]
    encoded.blocks = [encoded.blocks[b] for b in order]
    encoded.units.sort(key=lambda unit: unit.block)  # stable: a block's units keep their order
    return encoded


def _keep_last(mask: Tensor) -> Tensor:
    """A clip's final newline always stays."""
    mask = mask.clone()
    mask[-1] = True
    return mask
