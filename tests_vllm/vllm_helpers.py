"""Helpers of the vLLM plugin's tests: model configs, test images, vLLM's processor on a prompt."""

from __future__ import annotations

#: per family: the plugin's architecture and vLLM's own
FAMILIES = {
    "qwen2_5_vl": {"arch": "VtokenQwen2_5_VLForConditionalGeneration", "stock": "Qwen2_5_VLForConditionalGeneration"},
    "qwen3_vl": {"arch": "VtokenQwen3VLForConditionalGeneration", "stock": "Qwen3VLForConditionalGeneration"},
    "llava": {"arch": "VtokenLlavaForConditionalGeneration", "stock": "LlavaForConditionalGeneration"},
}
QWEN_FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
IMAGE_PAD = 5  # tiny_models.Q_IMAGE
PROMPT = "what <|vision_start|><|image_pad|><|vision_end|> is in <|vision_start|><|image_pad|><|vision_end|> red"


def model_config(checkpoint, plan: dict | None, arch: str):
    """vLLM's ModelConfig for the checkpoint with ``--hf-overrides`` selecting ``arch`` and the plan."""
    from vllm.config import ModelConfig
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    overrides = {"architectures": [arch]}
    if plan is not None:
        overrides["vtoken"] = plan
    return ModelConfig(model=str(checkpoint), dtype="float32", hf_overrides=overrides)


def images(sizes: list[tuple[int, int]], seed: int = 0):
    """Random RGB pictures of the given (height, width) in pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


def vllm_process(config, prompt: str, pictures, **kwargs):
    """vLLM's multimodal processor for ``config`` on one prompt: its MultiModalInput."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    processor = MULTIMODAL_REGISTRY.create_processor(config)
    return processor(prompt, processor.info.parse_mm_data({"image": pictures}), **kwargs)
