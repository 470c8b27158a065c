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
- Video: one unit per clip by default (an int budget is per clip, spread over all its frames), handed
  to the projector stages with its (t, h, w) layout (``TokenSet.layout``: temporal stages such as
  dycoke and holitom compare frames); ``video_budget='frame'`` gives each frame its own budget and grid.
- ``model.model.language_model``: Qwen2 decoder with M-RoPE; the ``llm(K)`` site lives there.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken import signals
from vtoken.flops import ModelDims, ProjectorDims, VisionDims, VisualCounts, llm_dims_from_config
from vtoken.registry import register_integration
from vtoken.sites import Site
from vtoken.stats import clock

from .hf_vlm import Encoded, HFVisionLanguage, VisualBlock, VisualUnit
from .projector_signals import encoder_attn_blocks
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

    def plain_prompt(self) -> tuple[str, str] | None:
        name = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}.get(self.family, self.family)
        return (f"{name}'s plain format",
                "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")

    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    chat_content: ClassVar[str] = "<|vision_start|>{image}<|vision_end|>{question}"
    site_signals: ClassVar[dict[str, frozenset[str]]] = {
        "vision": signals.VISION, "llm": signals.LLM,
        "projector": frozenset({signals.CLS_ATTN, signals.ENCODER_ATTN, signals.PROMPT_TEXT}),
    }

    def site_layers(self) -> dict[str, int]:
        return {"llm": len(self.language_model().layers), "vision": len(self.vision().blocks)}

    def supported_site_kinds(self) -> tuple[str, ...]:
        return ("vision", "projector", "llm")  # Qwen2.5-VL's windows: qwen25_windows.py

    def make_encoder_sites(self, sites: list) -> QwenVisionSites:
        if "cls_attn" in self.pipeline.signals_at(Site("projector")):
            raise ValueError(f"on {self.family}, cls_attn at the projector cannot follow vision(L) pruning; "
                             "run cls_attn at a vision(L) site instead")
        return QwenVisionSites(self.pipeline, sites, self.key, self.end_call, visual=self.vision(),
                               apply_rotary=self._vision_rotary())

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
            attn_blocks = self._encoder_attn_blocks(signals)  # HiPrune's object and deep blocks
            attn_captured: list[dict[str, Any]] = [{} for _ in attn_blocks]
            attn_handles = [self.vision().blocks[b].register_forward_pre_hook(_capture_call(store), with_kwargs=True)
                            for b, store in zip(attn_blocks, attn_captured)]
            try:
                features, pruned = self._visual_features(kind, pixels, grid_thw)
            finally:
                for one in [handle, *attn_handles]:
                    if one is not None:
                        one.remove()
            scores = [None] * len(features)
            start = clock(pixels.device)
            if block is not None:
                scores = self._received_attention(block, captured, grid_thw)
            attn = [torch.stack(columns, -1) for columns in zip(*[
                self._received_attention(b, store, grid_thw) for b, store in zip(attn_blocks, attn_captured)])]
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
                    if attn:
                        signal["encoder_attn"] = attn[item][span]
                    slots = torch.arange(features[item].shape[0], device=features[item].device)[span]
                    units.append(VisualUnit(
                        block=len(blocks) - 1, features=features[item][span],
                        grid=self._unit_grid(kind, t, grid, frames), signals=signal, index=slots,
                    ))
        return Encoded(blocks=blocks, units=units, scoring_seconds=scoring)

    @staticmethod
    def _unit_grid(kind: str, t: int, grid: tuple[int, int], frames: int) -> tuple[int, ...] | None:
        """An image's or a frame's (h, w); a whole clip's (t, h, w), which the TokenSet takes as its clip
        layout (temporal stages compare each token with the same place in other frames)."""
        if kind == "video" and frames == 1:
            return (t, *grid)
        return grid if (t == 1 or frames > 1) else None

    def _visual_features(self, kind: str, pixels: Tensor, grid_thw: Tensor) -> tuple[list[Tensor], list | None]:
        """Merged features per image or clip, and, after vision(L) pruning, each one's surviving merge
        groups (original index, grid). The tower is called directly then: the model's own helper
        splits its output by the unpruned sizes."""
        if getattr(self, "encoder_sites", None) is None:  # unwrapped (Integration.for_model) or no vision(L)
            output = getattr(self.model.model, f"get_{kind}_features")(pixels, grid_thw, return_dict=True)
            return list(output.pooler_output), None
        output = self.vision()(pixels.type(self.vision().dtype), grid_thw=grid_thw)
        pruned = self.encoder_sites.image_results()
        return list(torch.split(output.pooler_output, [index.numel() for index, _ in pruned])), pruned

    def check_signal_options(self, site: Site, wanted: dict[str, dict]) -> None:
        if site.kind == "projector":  # the scored block exists (the same check the call makes)
            self._score_block(wanted)

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

    def _encoder_attn_blocks(self, signals: dict[str, dict]) -> list[int]:
        """The blocks of ``encoder_attn`` (HiPrune): by default layer 16 of Qwen2.5-VL's 32 (half the depth)
        and the last block, whose output the merger reads."""
        if "encoder_attn" not in signals:
            return []
        depth = len(self.vision().blocks)
        return encoder_attn_blocks(signals["encoder_attn"], depth, 1 / 2, depth - 1, self.family)

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

    # --- what bench, FLOPs and the demo ask a family ---
    #: the bench's image when no count is asked for: 48 x 48 patches (672 px at 14 px), 576 tokens after
    #: the 2x2 merge, as many as LLaVA-1.5's 336 px image gives
    synthetic_visual_tokens: ClassVar[int] = 576

    def model_dims(self) -> ModelDims:
        """The ViT over patches (no [CLS]; Qwen2.5-VL: SwiGLU MLP, windowed attention outside its
        full-attention blocks), the PatchMerger (``merge`` x ``merge`` patches per token) and the decoder."""
        config = self.model.config
        vision = config.vision_config
        llm = llm_dims_from_config(config.text_config)
        merge = int(vision.spatial_merge_size) ** 2
        patch_dim = int(getattr(vision, "in_channels", 3)) * vision.temporal_patch_size * vision.patch_size ** 2
        if config.model_type == "qwen2_vl":
            width = int(vision.embed_dim)
            tower = VisionDims(layers=int(vision.depth), hidden=width, intermediate=int(width * vision.mlp_ratio),
                               patch_dim=patch_dim, prefix=0)
            out = int(vision.hidden_size)
        else:
            width = int(vision.hidden_size)
            window_side = vision.window_size // vision.patch_size  # patches per window side
            tower = VisionDims(
                layers=int(vision.depth), hidden=width, intermediate=int(vision.intermediate_size),
                patch_dim=patch_dim, prefix=0, gated_mlp=True, window=window_side * window_side,
                full_attention_layers=tuple(int(i) for i in vision.fullatt_block_indexes),
            )
            out = int(vision.out_hidden_size)
        projector = ProjectorDims(in_dim=width, hidden=width * merge, out_dim=out, group=merge)
        return ModelDims(tower, projector, llm)

    def tokens_per_image(self) -> int | None:
        """None: the token count follows the image's size (native resolution)."""
        return None

    def synthetic_inputs(self, text_tokens: int, batch: int, seed: int, device: Any, dtype: Any,
                         visual_tokens: int | None = None) -> dict[str, Any]:
        """Half the text, ``<|vision_start|>``, the image's placeholders, ``<|vision_end|>``, the rest; the
        image's merged grid is the most nearly square one of ``visual_tokens`` tokens (default 576: 24 x 24
        tokens, 48 x 48 patches)."""
        count = self.synthetic_visual_tokens if visual_tokens is None else visual_tokens
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"visual_tokens={visual_tokens!r}; accepted: an int >= 1 or None")
        rows = max(r for r in range(1, math.isqrt(count) + 1) if count % r == 0)
        merge = int(self.vision().spatial_merge_size)
        grid = (rows * merge, count // rows * merge)  # patches
        generator = torch.Generator().manual_seed(seed)
        config = self.model.config
        special = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
                   config.vision_end_token_id]
        text = self.random_text_ids(int(config.text_config.vocab_size), text_tokens - 2, generator, avoid=special)
        before = len(text) // 2
        ids = (text[:before] + [config.vision_start_token_id] + [config.image_token_id] * count
               + [config.vision_end_token_id] + text[before:])
        types = [1 if i == config.image_token_id else 0 for i in ids]
        vision = config.vision_config
        values = 3 * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(batch * grid[0] * grid[1], values, generator=generator)
        input_ids = torch.tensor([ids] * batch, device=device)
        return {
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": torch.tensor([types] * batch, dtype=torch.int, device=device),
            "pixel_values": pixels.to(device=device, dtype=dtype),
            "image_grid_thw": torch.tensor([[1, *grid]] * batch, device=device),
        }

    #: the bench's video frames (``synthetic_video_inputs``): 112 x 112 px, 8 x 8 patches of 14 px, 16 tokens
    #: per pair of frames after the 2x2 merge; a 32-frame clip is 256 tokens, a few minutes' bench on 2 CPU cores
    synthetic_frame_patches: ClassVar[int] = 8

    def synthetic_video_inputs(self, text_tokens: int, batch: int, seed: int, device: Any, dtype: Any,
                               frames: int) -> dict[str, Any]:
        """As ``synthetic_inputs`` with a clip of ``frames`` frames (``synthetic_frame_patches`` square) in the
        image's place: one random scene, each pair of frames (one temporal patch) the first with a little
        noise and a quarter of its places, moving, of new content, so the clip has static and changing places."""
        vision = self.model.config.vision_config
        step = int(vision.temporal_patch_size)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < step or frames % step:
            raise ValueError(f"video_frames={frames!r}; accepted: a multiple of {step} (the temporal patch), e.g. 32")
        side, t, config = self.synthetic_frame_patches, frames // step, self.model.config
        per_frame = side * side // int(self.vision().spatial_merge_size) ** 2
        generator = torch.Generator().manual_seed(seed)
        special = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
                   config.vision_end_token_id]
        text = self.random_text_ids(int(config.text_config.vocab_size), text_tokens - 2, generator, avoid=special)
        ids = text[:len(text) // 2] + self.clip_prompt(t, per_frame, text[0]) + text[len(text) // 2:]
        values = 3 * step * vision.patch_size ** 2
        scene = torch.randn(side * side, values, generator=generator)
        clip = []
        for frame in range(t):
            pair = scene + 0.05 * torch.randn(scene.shape, generator=generator)
            moved = (torch.arange(side * side) + frame) % 4 == 0
            pair[moved] = torch.randn(int(moved.sum()), values, generator=generator)
            clip.append(pair)
        input_ids = torch.tensor([ids] * batch, device=device)
        return {
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": torch.tensor([[2 * (i == config.video_token_id) for i in ids]] * batch,
                                              dtype=torch.int, device=device),
            "pixel_values_videos": torch.cat(clip * batch).to(device=device, dtype=dtype),
            "video_grid_thw": torch.tensor([[t, side, side]] * batch, device=device),
        }

    def clip_prompt(self, t: int, per_frame: int, timestamp: int) -> list[int]:
        """A clip's ids in the prompt as the processor writes them: one run of placeholders (Qwen3-VL: per
        frame, ``timestamp`` standing for its time text, then the frame's own run)."""
        config = self.model.config
        return [config.vision_start_token_id] + [config.video_token_id] * t * per_frame + [config.vision_end_token_id]

    def visual_counts(self, inputs: dict[str, Any]) -> VisualCounts:
        """From the first image's ``image_grid_thw`` (the images of a sample alike); for a sample of one clip
        (no images), each temporal patch counts as an image (the tower attends within it)."""
        key, token = ("image_grid_thw", self.image_token_id())
        if inputs.get(key) is None and inputs.get("video_grid_thw") is not None:
            key, token = "video_grid_thw", self.model.config.video_token_id
        if inputs.get(key) is None:
            raise NotImplementedError(f"visual counts for {self.family} need image_grid_thw or video_grid_thw")
        patches = int(inputs[key][0][1:].prod())
        tokens = patches // int(self.vision().spatial_merge_size) ** 2
        images = int((inputs["input_ids"][0] == token).sum()) // tokens
        return VisualCounts(images=images, patches=patches, tokens=tokens)

    def run_vision(self, inputs: dict[str, Any]) -> Any:
        """The tower and merger on the images and the clips, as the wrapped forward runs them (vision(L)
        sites included, in a call of their own): their features, images first."""
        features: list[Tensor] = []
        call = self.begin_call("vision") if getattr(self, "encoder_sites", None) is not None else None
        try:
            with torch.no_grad():
                for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                                   ("video", "pixel_values_videos", "video_grid_thw")):
                    if inputs.get(pixels_key) is not None:
                        features += self._visual_features(kind, inputs[pixels_key], inputs[grid_key])[0]
        finally:
            if call is not None:
                self.end_call(call)
        return features

    def unit_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int] | None]:
        """Each image's merged (h/2, w/2) grid; a clip is one unit with no single grid unless it has one
        frame, or, with ``video_budget='frame'``, one unit per frame on that grid."""
        merge = int(self.vision().spatial_merge_size)
        grids: list[tuple[int, int] | None] = []
        for key in ("image_grid_thw", "video_grid_thw"):
            if inputs.get(key) is None:
                continue
            for t, h, w in inputs[key].tolist():
                grid = (h // merge, w // merge)
                if key == "video_grid_thw" and self.settings["video_budget"] == "frame" and t > 1:
                    grids += [grid] * t
                else:
                    grids.append(grid if t == 1 else None)
        return grids

    def overlay_view(self, image: Any, processor: Any) -> Any:
        """The whole image: the processor resizes it whole to whole merged patches (no crop)."""
        return image


def _capture_call(store: dict[str, Any]):
    """A forward pre-hook that records the block's arguments into ``store``, only for forwards of the thread
    that made it: the block is shared by every thread, and another thread's images must not land here."""
    owner = threading.get_ident()

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() == owner:
            store.update(args=args, kwargs=kwargs)

    return hook
