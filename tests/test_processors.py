"""End to end from images and text through processors built offline and saved to disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vtoken
from tiny_models import TOKENS_PER_IMAGE, tiny_llava, tiny_qwen
from tiny_processors import tiny_llava_processor, tiny_qwen_processor


def image(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_word_tokenizer_keeps_words_and_placeholders_apart():
    from tiny_processors import word_tokenizer

    tokenizer = word_tokenizer()
    ids = tokenizer("<|vision_start|><|image_pad|><|vision_end|> what is the color", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids["input_ids"]) == [
        "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "what", "is", "the", "color"]


def test_llava_processor_from_disk_end_to_end(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tiny_llava_processor().save_pretrained(tmp_path)
    tiny_llava().save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    model.generation_config.eos_token_id = None
    prompts = ["<image> what is the color of the object", "<image> how many"]
    inputs = processor(images=[image(200, 180, 0), image(170, 230, 1)], text=prompts, padding=True,
                       return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * TOKENS_PER_IMAGE
    with vtoken.wrapped(model, "cls_attn+kcenter", keep=0.25):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_processor_from_disk_end_to_end(tmp_path, version):
    from transformers import AutoProcessor

    tiny_qwen_processor().save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = tiny_qwen(version)
    text = ["<|vision_start|><|image_pad|><|vision_end|> what is the color",
            "<|vision_start|><|image_pad|><|vision_end|> how many <|vision_start|><|image_pad|><|vision_end|>"]
    inputs = processor(images=[image(24, 16, 0), image(16, 16, 1), image(28, 20, 2)], text=text,
                       padding=True, return_tensors="pt")
    assert "mm_token_type_ids" in inputs and inputs["image_grid_thw"].shape[0] == 3
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with vtoken.wrapped(model, "dart", keep=1.0):
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), expected)
    with vtoken.wrapped(model, "kcenter", keep=0.5):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == expected.shape
