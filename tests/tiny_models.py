"""Tiny random-init models and inputs for tests (importable helpers, no downloads)."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 3
PAD = 0
BOS = 1
GRID = 12  # 168px / patch 14 -> 12 x 12 = 144 patch tokens per image
TOKENS_PER_IMAGE = GRID * GRID


def tiny_llava(attn_implementation: str = "sdpa", seed: int = 0, text_layers: int = 4):
    """A LLaVA-1.5-shaped model: CLIP ViT (3 layers) + 2-layer MLP projector + Llama (GQA)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=GRID * 14, patch_size=14, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=TOKENS_PER_IMAGE, pad_token_id=PAD,
    )
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # generate the full requested length in tests
    return model.eval()


def prompt_ids(before: list[int], images: int, after: list[int]) -> list[int]:
    ids = [BOS] + before
    for _ in range(images):
        ids += [IMAGE_TOKEN] * TOKENS_PER_IMAGE + [10]
    return ids + after


def llava_batch(prompts: list[list[int]], images: int = 1, side: str = "left", seed: int = 0) -> dict:
    """Pad token-id prompts into a batch and add random pixel values for every image."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        if side == "left":
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        else:
            ids[row, : len(prompt)] = torch.tensor(prompt)
            mask[row, : len(prompt)] = 1
    n_images = int((ids == IMAGE_TOKEN).sum()) // TOKENS_PER_IMAGE
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_images, 3, GRID * 14, GRID * 14, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
