"""Qwen2.5-VL in vLLM with vtoken's projector-site pruning (imported by vLLM, never by ``import vtoken``).

vLLM's own classes with the mixins of ``vllm_qwen`` in front (what they replace and why: that module).
Videos pass through unpruned, their full positions carried the same way (vLLM's EVS formulas).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .vllm_qwen import PruningModel, PruningProcessor, with_positions


class VtokenQwen2_5_VLProcessor(PruningProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtokenQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtokenQwen2_5_VLForConditionalGeneration(PruningModel, Qwen2_5_VLForConditionalGeneration):
    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, item in inputs.items():  # in the order vLLM received them
            grids = item[f"{modality}_grid_thw"].tolist()
            if modality == "image":
                embeddings += tuple(self._prune_images(self._process_image_input(item), grids))
                continue
            # seconds per temporal patch, cast to an integer as vLLM's EVS does for these positions
            seconds = item.get("second_per_grid_ts")
            for i, (features, grid) in enumerate(zip(self._process_video_input(item), grids)):
                positions = self.full_positions(grid, None if seconds is None else int(seconds[i]))
                embeddings += (with_positions(features, positions),)
        return embeddings

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        items = ((offset, feature.mm_position.length, t, h, w, t_factor)
                 for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(features)))
        return self.lay_out(input_tokens, items)
