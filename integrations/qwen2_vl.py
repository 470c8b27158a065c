"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Map of the model:
- ``model.model.visual``: a ViT over all images (and video clips) of the batch concatenated into one
  unbatched sequence of patches; ``cu_seqlens`` delimit the images. Qwen2.5-VL permutes the patches
  into windows (``get_vision_window_index``) and only its ``fullatt_block_indexes`` blocks attend over
  whole images; the others attend within windows.
- The PatchMerger merges each 2x2 patch block (4 consecutive patches) into one token: an image with a
  (t, h, w) patch grid gives t * (h/2) * (w/2) tokens, row-major on the (h/2, w/2) grid. The
  ``projector`` site is the merger's output, per image, on that merged grid.
- Placeholders: ``<|image_pad|>`` (``config.image_token_id``) and ``<|video_pad|>``
  (``config.video_token_id``); ``mm_token_type_ids`` marks them (1 image, 2 video) and shrinks with them.
- Positions: M-RoPE. The full 3-D position ids are computed first with the model's own
  ``get_rope_index``; with ``positions='original'`` (the default) each kept token keeps its 3-D
  position, so the language model sees every kept patch where it was. ``generate`` gets them as its
  4-row position ids (text row + 3-D rows) and continues after the original last position.
  ``positions='compact'`` is refused: an image's M-RoPE extent is max(h, w)/2 whatever its token
  count, so removing tokens leaves no gap to close, and renumbering 1-D would destroy the 2-D layout.
- ``cls_attn``: Qwen's vision tower has no [CLS]. The substitute is the mean attention each patch
  receives in the chosen vision block (default: the last full-attention block), recomputed from
  that block's own ``qkv`` projection and 2-D rotary embedding, within the segments the block itself
  attends over (whole images, or windows at a Qwen2.5-VL window block), then averaged over each 2x2
  merge group, as the PatchMerger merges the patches.
- Video: one unit per clip by default (an int budget is per clip, spread over all its frames);
  ``video_budget='frame'`` gives each frame its own budget and grid.
- ``model.model.language_model``: Qwen2 decoder with M-RoPE; the ``llm(K)`` site lives there.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken import signals
from vtoken.registry import register_integration
from vtoken.sites import Site
from vtoken.stats import clock

from .hf_vlm import Encoded, HFVisionLanguage, VisualBlock, VisualUnit
from .qwen_vision import QwenVisionSites, received_attention

VIDEO_BUDGETS = ("clip", "frame")


@register_integration("qwen2_vl")
class Qwen2VLIntegration(HFVisionLanguage):
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl", "qwen2_5_vl")
    options: ClassVar[dict[str, Any]] = {"positions": "original", "video_budget": "clip"}
    image_inputs: ClassVar[tuple[str, ...]] = (
        "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
    )

    def install(self) -> None:
        if self.settings["positions"] != "original":
            raise ValueError(
                f"positions={self.settings['positions']!r}: {self.family} keeps M-RoPE positions; accepted: 'original' "
                "(an image's 3-D positions span max(h, w)/2 whatever its token count, so there is nothing to compact)"
            )
        if self.settings["video_budget"] not in VIDEO_BUDGETS:
            raise ValueError(f"video_budget={self.settings['video_budget']!r}; accepted: {', '.join(VIDEO_BUDGETS)}")
        super().install()

    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    site_signals: ClassVar[dict[str, frozenset[str]]] = {
        "vision": signals.VISION, "projector": frozenset({signals.CLS_ATTN}), "llm": signals.LLM,
    }

    def site_layers(self) -> dict[str, int]:
        return {"llm": len(self.language_model().layers), "vision": len(self.vision().blocks)}

    def supported_site_kinds(self) -> tuple[str, ...]:
        if hasattr(self.vision(), "window_size"):  # Qwen2.5-VL: see qwen_vision.py for why not inside
            return ("projector", "llm")
        return ("vision", "projector", "llm")

    def make_encoder_sites(self, sites: list) -> QwenVisionSites:
        if "cls_attn" in self.pipeline.signals_at(Site("projector")):
            raise ValueError(f"on {self.family}, cls_attn at the projector cannot follow vision(L) pruning; "
                             "run cls_attn at a vision(L) site instead")
        return QwenVisionSites(self.pipeline, self.vision(), sites, self._vision_rotary(), self.key, self.end_call)

    def vision(self) -> torch.nn.Module:
        return self.model.model.visual

    def extra_sequence_inputs(self) -> tuple[str, ...]:
        return ("mm_token_type_ids",)

    # --- visual features -------------------------------------------------------------------------
    def encode_images(self, inputs: dict[str, Any], signals: dict[str, dict]) -> Encoded:
        config = self.model.config
        merge = self.vision().spatial_merge_size
        units: list[VisualUnit] = []
        blocks: list[VisualBlock] = []
        scoring = 0.0
        for kind, pixels_key, grid_key, token_id in (
            ("image", "pixel_values", "image_grid_thw", config.image_token_id),
            ("video", "pixel_values_videos", "video_grid_thw", config.video_token_id),
        ):
            pixels = inputs.get(pixels_key)
            if pixels is None:
                continue
            grid_thw = inputs[grid_key]
            block = self._score_block(signals)
            captured: dict[str, Any] = {}
            handle = None
            if block is not None:
                handle = self.vision().blocks[block].register_forward_pre_hook(_capture_call(captured),
                                                                               with_kwargs=True)
            try:
                features, pruned = self._visual_features(kind, pixels, grid_thw)
            finally:
                if handle is not None:
                    handle.remove()
            scores = [None] * len(features)
            if block is not None:
                start = clock(pixels.device)
                scores = self._received_attention(block, captured, grid_thw)
                scoring += clock(pixels.device) - start
            if pruned is not None:  # pruned inside the tower: one unit per image or clip
                for item, (index, grid) in enumerate(pruned):
                    blocks.append(VisualBlock(token_id=token_id, size=int(grid_thw[item].prod()) // merge**2))
                    units.append(VisualUnit(block=len(blocks) - 1, features=features[item], grid=grid, index=index))
                continue
            for item, (t, h, w) in enumerate(grid_thw.tolist()):
                grid = (h // merge, w // merge)
                per_frame = grid[0] * grid[1]
                frames = t if kind == "video" and self.settings["video_budget"] == "frame" else 1
                blocks.append(VisualBlock(token_id=token_id, size=features[item].shape[0]))
                for frame in range(frames):
                    span = slice(frame * per_frame, (frame + 1) * per_frame) if frames > 1 else slice(None)
                    signal = {} if scores[item] is None else {"cls_attn": scores[item][span]}
                    slots = torch.arange(features[item].shape[0], device=features[item].device)[span]
                    units.append(VisualUnit(
                        block=len(blocks) - 1, features=features[item][span],
                        grid=grid if (t == 1 or frames > 1) else None, signals=signal, index=slots,
                    ))
        return Encoded(blocks=blocks, units=units, scoring_seconds=scoring)

    def _visual_features(self, kind: str, pixels: Tensor, grid_thw: Tensor) -> tuple[list[Tensor], list | None]:
        """Merged features per image or clip, and, after vision(L) pruning, each one's surviving merge
        groups (original index, grid). The tower is called directly then: the model's own helper
        splits its output by the unpruned sizes."""
        if self.encoder_sites is None:
            output = getattr(self.model.model, f"get_{kind}_features")(pixels, grid_thw, return_dict=True)
            return list(output.pooler_output), None
        output = self.vision()(pixels.type(self.vision().dtype), grid_thw=grid_thw)
        pruned = self.encoder_sites.image_results()
        return list(torch.split(output.pooler_output, [index.numel() for index, _ in pruned])), pruned

    def _score_block(self, signals: dict[str, dict]) -> int | None:
        """The vision block whose attention scores ``cls_attn`` (None when no stage needs it)."""
        if "cls_attn" not in signals:
            return None
        blocks = len(self.vision().blocks)
        requested = signals["cls_attn"].get("layers")
        full = list(getattr(self.vision().config, "fullatt_block_indexes", None) or range(blocks))
        if requested is None:
            return full[-1]
        if len(requested) != 1:
            raise ValueError(f"cls_attn on {self.family} scores one vision block; pass layers=(L,) with a single block")
        block = requested[0] if requested[0] >= 0 else blocks + requested[0]
        if not 0 <= block < blocks:
            raise ValueError(f"cls_attn layer {requested[0]} is not a vision block; accepted: 0..{blocks - 1} "
                             f"(full-attention blocks: {full})")
        return block

    def _received_attention(self, index: int, captured: dict[str, Any], grid_thw: Tensor) -> list[Tensor]:
        """Mean attention each merged token's patches receive in block ``index``, per image, in the
        merger's output order."""
        block = self.vision().blocks[index]
        args, kwargs = captured["args"], captured["kwargs"]
        hidden = args[0] if args else kwargs["hidden_states"]
        cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        received = received_attention(block, hidden, cu_seqlens, kwargs["position_embeddings"],
                                      self._vision_rotary())
        unit = self.vision().spatial_merge_size ** 2
        merged = received.view(-1, unit).mean(1)
        window_index = self._window_index(grid_thw)
        if window_index is not None:
            merged = merged[torch.argsort(window_index)]
        sizes = (grid_thw.prod(-1) // unit).tolist()
        return list(torch.split(merged, sizes))

    def _vision_rotary(self):
        return sys.modules[type(self.vision().blocks[0].attn).__module__].apply_rotary_pos_emb_vision

    def _window_index(self, grid_thw: Tensor) -> Tensor | None:
        """Qwen2.5-VL's window permutation of merge groups (None for Qwen2-VL, which keeps order)."""
        vision = self.vision()
        if not hasattr(vision, "window_size"):
            return None
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size,
            patch_size=vision.patch_size, kwargs={},
        )
        return window_index

    # --- positions -------------------------------------------------------------------------------
    def default_positions(self, inputs: dict[str, Any], for_generate: bool) -> Tensor:
        """The M-RoPE positions the unwrapped model would use: ``[3, B, L]`` for a forward pass,
        ``[4, B, L]`` (text row first) for generate."""
        if inputs.get("mm_token_type_ids") is None:
            raise ValueError(f"{self.family} needs mm_token_type_ids (the processor returns them) to place "
                             "image tokens")
        extra = {}
        if inputs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs.get("attention_mask"), **extra,
        )
        if not for_generate:
            return positions
        text = super().default_positions(inputs, for_generate=True)
        return torch.cat([text[None], positions], dim=0)

    def after_prepare(self, prepared: dict[str, Any]) -> None:
        """Keep ``rope_deltas`` (next position minus sequence length) right for the shrunk prompt."""
        positions = prepared.get("position_ids")
        mask = prepared.get("attention_mask")
        if positions is None or mask is None:
            return
        spatial = positions[-3:].masked_fill(mask[None] == 0, -1)
        next_position = spatial.amax(dim=(0, 2)) + 1
        self.model.model.rope_deltas = (next_position - mask.sum(-1)).unsqueeze(1)


def _capture_call(store: dict[str, Any]):
    """A forward pre-hook that records the block's arguments into ``store``."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        store.update(args=args, kwargs=kwargs)

    return hook
