"""Qwen3-VL in vLLM with vtoken's projector-site pruning (imported by vLLM, never by ``import vtoken``).

vLLM's own classes with the mixins of ``vllm_qwen`` in front (what they replace and why: that module).
DeepStack: vLLM's tower returns, per merged token, the merger's output followed by every DeepStack
level; the stages score the merger's output (as vtoken's transformers integration does) and each kept
row keeps its levels, which vLLM then adds after the first decoder layers at the kept tokens only.
Videos are refused: vLLM writes a Qwen3-VL video frame by frame with timestamps between the frames,
which the plugin does not lay out; serve with ``--limit-mm-per-prompt '{"video": 0}'``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .vllm_qwen import PruningModel, PruningProcessor

NO_VIDEO = ("vtoken's Qwen3-VL architecture serves images only (videos are written frame by frame with "
            "timestamps, which it does not lay out); start the server with --limit-mm-per-prompt '{\"video\": 0}'")


class VtokenQwen3VLProcessor(PruningProcessor, Qwen3VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Any:
        if mm_items.get_count("video", strict=False):
            raise ValueError(NO_VIDEO)
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)


@MULTIMODAL_REGISTRY.register_processor(VtokenQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtokenQwen3VLForConditionalGeneration(PruningModel, Qwen3VLForConditionalGeneration):
    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if "video" in inputs:
            raise ValueError(NO_VIDEO)
        if "image" not in inputs:
            return ()
        image = inputs["image"]
        features = self._process_image_input(image)
        return tuple(self._prune_images(features, image["image_grid_thw"].tolist(), scored_width=self.visual_dim))

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        merge = self.config.vision_config.spatial_merge_size
        items = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(NO_VIDEO)
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            items.append((feature.mm_position.offset, feature.mm_position.length, t, h // merge, w // merge, 1.0))
        return self.lay_out(input_tokens, items)
