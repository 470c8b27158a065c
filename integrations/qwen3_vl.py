"""Qwen3-VL and Qwen3-VL-MoE (``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``).

Map of the model (what differs from Qwen2-VL, whose integration this one extends):
- ``model.model.visual``: the same unbatched ViT over every image and clip (full attention in every
  block, no windows) with a learned position table resampled to each grid and a 2x2 PatchMerger. The
  ``projector`` site is the merger's output, per image, on the merged grid.
- DeepStack: the outputs of the blocks ``deepstack_visual_indexes`` go through mergers of their own,
  giving one more feature per visual token for each level; the language model adds level ``i`` to the
  hidden states at the visual positions after decoder layer ``i`` (``visual_pos_masks``,
  ``deepstack_visual_embeds``, arguments of its forward that the outer model fills from the images).
  vtoken's prefill hands the outer model ``inputs_embeds`` instead of images, so a forward pre-hook on
  the language model gives it those two arguments itself: the visual positions of the shrunk sequence
  and, for every level, the features of exactly the visual tokens the projector stages kept (the token
  at the same placeholder slot; a merging stage's token carries its own slot's DeepStack features).
- Positions: interleaved M-RoPE, computed with the model's own ``get_rope_index`` as for Qwen2-VL;
  kept tokens keep their original (t, h, w) positions. A video is written frame by frame (a timestamp
  and its own ``<|vision_start|>``...``<|vision_end|>`` run per frame); a clip is still one budget unit
  (``video_budget='clip'``) or one per frame (``'frame'``).
- ``llm(K)`` at any K >= 1. The language model adds level ``i`` after layer ``i`` inside its own loop,
  through one full-length visual mask, which a sequence shortened at layer K no longer matches: it is
  handed only the levels before the first site (over the whole sequence), and a forward hook on each
  layer ``i`` >= K adds level ``i`` itself, the same way, at the visual positions still present (the
  kept tokens; dead filler slots get none). Decode steps add nothing, as in the model.
- ``cls_attn``: as Qwen2-VL's, recomputed from the vision block's own ``norm1``, ``qkv`` and 2-D rotary
  table; the default block is the last one (every block attends over whole images).
- No ``vision(L)`` site: the DeepStack mergers read full-length hidden states of intermediate blocks,
  and the learned position table is resampled per full grid inside the tower's own forward.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from vtoken.flops import ModelDims, ProjectorDims, VisionDims, llm_dims_from_config
from vtoken.registry import register_integration

from .decoder_tensors import cache_of
from .hf_vlm import Encoded
from .qwen2_vl import Qwen2VLIntegration

#: a per-position input of the prepared prefill: each visual position's row in the DeepStack features
DEEPSTACK_INDEX = "_vtoken_deepstack_index"
#: per call: the current language-model pass's visual positions, rows and DeepStack levels (None: none)
DEEPSTACK_PASS = "deepstack_pass"

#: why Qwen3-VL's tower offers no vision(L) site
_NO_VISION_SITE = ("its DeepStack mergers read the full-length hidden states of intermediate vision blocks and its "
                   "learned position table is resampled to each full grid inside the tower's forward")


@register_integration("qwen3_vl")
class Qwen3VLIntegration(Qwen2VLIntegration):
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl", "qwen3_vl_moe")
    image_inputs: ClassVar[tuple[str, ...]] = (
        "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw",
    )

    unsupported_sites: ClassVar[dict[str, str]] = {"vision": _NO_VISION_SITE}

    # --- sites -----------------------------------------------------------------------------------
    def deepstack_levels(self) -> int:
        return len(getattr(self.vision(), "deepstack_visual_indexes", None) or ())

    def supported_site_kinds(self) -> tuple[str, ...]:
        return ("projector", "llm")

    def first_llm_site(self) -> int | None:
        return min((site.layer for site in self.pipeline.sites if site.kind == "llm"), default=None)

    def _install_hooks(self) -> None:
        super()._install_hooks()
        if self.deepstack_levels():
            self.hooks.add(self.language_model().register_forward_pre_hook(self._deepstack_kwargs, with_kwargs=True))
        first = self.first_llm_site()
        if first is not None:  # the levels from the first llm(K) site on are added here, at the kept positions
            for layer in range(first, self.deepstack_levels()):
                self.hooks.add(self.language_model().layers[layer].register_forward_hook(
                    partial(self._deepstack_after, layer)))

    def extra_sequence_inputs(self) -> tuple[str, ...]:
        return ("mm_token_type_ids", DEEPSTACK_INDEX)

    def encode_images(self, inputs: dict[str, Any], signals: dict[str, dict]) -> Encoded:
        """Qwen2-VL's units (every image, then every clip or frame), put in placeholder order: row by row,
        in the order the images and clips appear, so that a row's selections are recorded the same in a
        batch and alone when a prompt mixes images and videos."""
        encoded = super().encode_images(inputs, signals)
        ids = inputs.get("input_ids")
        if ids is None or len(encoded.units) < 2:
            return encoded
        flat = ids.flatten()
        start_of: dict[int, int] = {}  # each block's first placeholder, row-major over the batch
        for token_id in dict.fromkeys(block.token_id for block in encoded.blocks):
            positions = (flat == token_id).nonzero()[:, 0].tolist()
            offset = 0
            for b, block in enumerate(encoded.blocks):
                if block.token_id == token_id:
                    start_of[b] = positions[offset] if offset < len(positions) else flat.numel()
                    offset += block.size
        order = sorted(range(len(encoded.units)), key=lambda i: (start_of[encoded.units[i].block], i))
        encoded.units = [encoded.units[i] for i in order]
        return encoded

    # --- DeepStack -------------------------------------------------------------------------------
    def _visual_features(self, kind: str, pixels: Tensor, grid_thw: Tensor) -> tuple[list[Tensor], list | None]:
        output = getattr(self.model.model, f"get_{kind}_features")(pixels, grid_thw, return_dict=True)
        call = self.current_call()
        if call is not None:
            levels = getattr(output, "deepstack_features", None) or []
            call.parts[f"deepstack_{kind}"] = [torch.cat(level) for level in levels]
        return list(output.pooler_output), None

    def prepare(self, inputs: dict[str, Any], for_generate: bool, call: Any) -> dict[str, Any]:
        """The prepared prefill, plus what the language model's DeepStack step needs for it: the visual
        positions of the shrunk sequence and each level's features at the tokens kept there."""
        inputs = dict(inputs)  # the caller's dict stays as it was
        ids = inputs.get("input_ids")
        if ids is None or not self.deepstack_levels():
            out = super().prepare(inputs, for_generate, call)
            out.pop(DEEPSTACK_INDEX, None)
            return out
        config = self.model.config
        is_image, is_video = ids == config.image_token_id, ids == config.video_token_id
        visual = is_image | is_video
        index = torch.full_like(ids, -1)
        index[visual] = torch.arange(int(visual.sum()), device=ids.device)
        inputs[DEEPSTACK_INDEX] = index
        out = super().prepare(inputs, for_generate, call)
        kept_index = out.pop(DEEPSTACK_INDEX)
        images, videos = call.parts.pop("deepstack_image", None), call.parts.pop("deepstack_video", None)
        levels = []
        for level in range(self.deepstack_levels()):
            # in the unwrapped model's order: every visual position of the batch, row-major
            some = images[level] if images is not None else videos[level]
            joint = some.new_zeros(int(visual.sum()), some.shape[-1])
            if images is not None:
                joint[is_image[visual]] = images[level]
            if videos is not None:
                joint[is_video[visual]] = videos[level]
            levels.append(joint)
        present = kept_index >= 0
        if out.get("attention_mask") is not None:
            present &= out["attention_mask"].bool()
        call.parts["deepstack"] = (present, kept_index.clamp(min=0), levels)
        return out

    def _deepstack_kwargs(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The language model's DeepStack arguments for a prefill (or a no-cache pass over the prompt
        and the tokens generated since): the kept visual positions and their features per level."""
        call = self.current_call()
        state = None if call is None else call.parts.get("deepstack")
        embeds = kwargs.get("inputs_embeds")
        if call is not None:
            call.parts[DEEPSTACK_PASS] = None
        if state is None or embeds is None:
            return None
        cache = cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:  # a decode step: DeepStack ran in the prefill
            return None
        present, index, levels = state
        rows = embeds.shape[0] // present.shape[0]  # beams / returned sequences per prompt
        present, index = present.repeat_interleave(rows, 0), index.repeat_interleave(rows, 0)
        extra = embeds.shape[1] - present.shape[1]
        if extra < 0:
            raise RuntimeError(f"the language model received {embeds.shape[1]} positions for a prefill prepared "
                               f"with {present.shape[1]}")
        if extra:
            present = torch.nn.functional.pad(present, (0, extra), value=False)
            index = torch.nn.functional.pad(index, (0, extra))
        rows_index = index[present]
        kwargs["visual_pos_masks"] = present
        # the language model adds the levels before the first llm(K) site itself, over the whole sequence;
        # _deepstack_after adds the others to the shortened one
        own = len(levels) if self.first_llm_site() is None else min(len(levels), self.first_llm_site())
        kwargs["deepstack_visual_embeds"] = [level[rows_index] for level in levels[:own]]
        call.parts[DEEPSTACK_PASS] = (present, index, levels)
        return args, kwargs

    def _deepstack_after(self, layer: int, module: Any, args: tuple, output: Any) -> Any:
        """DeepStack level ``layer`` after an llm(K) site at or before it: added, as the language model
        adds it, to the hidden states of the visual positions still present (the kept ones, in the
        prefill; then the same in a no-cache pass, whose generated positions follow them)."""
        call = self.current_call()
        deepstack = None if call is None else call.parts.get(DEEPSTACK_PASS)
        decoder = None if call is None else call.parts.get("decoder")  # DecoderSites' DecoderCall
        if deepstack is None or decoder is None:
            return None
        sites = [entry for entry in decoder.layers if entry[0] <= layer]  # (K, kept positions, dead, _)
        if not sites:
            return None
        present, index, levels = deepstack
        _, kept, dead, _ = sites[-1]
        visual = present.gather(1, kept)
        if dead is not None:
            visual &= ~dead
        hidden = output[0] if isinstance(output, tuple) else output
        mask = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask[:, : kept.shape[1]] = visual
        embeds = levels[layer][index.gather(1, kept)[visual]].to(hidden.device, hidden.dtype)
        hidden = hidden.clone()
        hidden[mask, :] = hidden[mask, :] + embeds
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    # --- what bench, FLOPs and the demo ask a family ---
    def clip_prompt(self, t: int, per_frame: int, timestamp: int) -> list[int]:
        config = self.model.config
        run = [config.vision_start_token_id] + [config.video_token_id] * per_frame + [config.vision_end_token_id]
        return ([timestamp] + run) * t

    def model_dims(self) -> ModelDims:
        """The ViT over patches (no [CLS], full attention, GELU MLP), the PatchMerger and the decoder;
        the DeepStack mergers (one per level, the size of the PatchMerger) count with the projector."""
        config = self.model.config
        vision = config.vision_config
        merge = int(vision.spatial_merge_size) ** 2
        width = int(vision.hidden_size)
        patch_dim = int(getattr(vision, "in_channels", 3)) * vision.temporal_patch_size * vision.patch_size ** 2
        tower = VisionDims(layers=int(vision.depth), hidden=width, intermediate=int(vision.intermediate_size),
                           patch_dim=patch_dim, prefix=0)
        projector = ProjectorDims(in_dim=width, hidden=width * merge * (1 + self.deepstack_levels()),
                                  out_dim=int(vision.out_hidden_size), group=merge)
        return ModelDims(tower, projector, llm_dims_from_config(config.text_config))
