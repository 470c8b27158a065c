"""LLaVA-1.5 in vLLM with vtoken's projector-site pruning (imported by vLLM, never by ``import vtoken``).

vLLM's own classes with two parts replaced: the processor gives each image exactly K placeholders (K =
what the plan keeps of the fixed patch grid, image_size / patch_size on a side) with cache keys per plan
(``vllm_common``), and ``embed_multimodal`` returns the K features vtoken's stages keep of vLLM's
projector output. Positions: LLaVA's are 1-D and vLLM numbers the shortened prompt itself, without gaps,
which is vtoken's ``positions="compact"`` (the LLaVA integration's default, the way published LLaVA
pruning results were produced); ``"original"`` positions are refused, the server has no way to give the
kept tokens their old numbers. Precomputed image embeddings are refused: their grid is unknown.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from .plan import LLAVA_POSITIONS
from .vllm_common import PlanKeyedProcessor, plan_of, select_kept

NO_EMBEDDINGS = "vtoken's LLaVA architecture prunes images it encodes; precomputed image embeddings cannot be pruned"


def _side(hf_config: Any) -> int:
    vision = hf_config.vision_config
    return vision.image_size // vision.patch_size


class VtokenLlavaProcessor(PlanKeyedProcessor, LlavaMultiModalProcessor):
    positions = LLAVA_POSITIONS

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Any:
        config = self.info.get_hf_config()
        side = _side(config)
        kept = self.plan().tokens_per_image((side, side))
        token = config.image_token_index

        def kept_placeholders(item_idx: int) -> list[int]:
            if not isinstance(mm_items["image"], ImageProcessorItems):
                raise ValueError(NO_EMBEDDINGS)
            return [token] * kept

        return [PromptReplacement(modality="image", target=[token], replacement=kept_placeholders)]


@MULTIMODAL_REGISTRY.register_processor(VtokenLlavaProcessor, info=LlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtokenLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtoken_plan = plan_of(self.config, LLAVA_POSITIONS)
        #: per image of the last embed_multimodal call: the kept slots on its patch grid (for tests)
        self.last_kept: list[torch.Tensor] = []

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return ()
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise ValueError(NO_EMBEDDINGS)
        features = list(self._process_image_input(image_input))
        side = _side(self.config)
        kept = select_kept(self.vtoken_plan, features, [(side, side)] * len(features), self.config.image_token_index)
        self.last_kept = [slots for _, slots in kept]
        return tuple(values for values, _ in kept)
