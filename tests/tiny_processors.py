"""Tokenizers and processors built offline (no hub access), matching tiny_models' token ids."""

from __future__ import annotations

WORDS = "what is the color of object left right red green blue yes no how many a an in image picture".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
            "<|vision_end|>"]


def word_tokenizer(extra_special_tokens: dict | None = None):
    """A whitespace word-level tokenizer whose special ids match tiny_models (pad 0, bos 1, <image> 3...);
    ``extra_special_tokens`` names some of them as processors ask (``tokenizer.start_image_token``...)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<\|[a-z_]+\|>|<image>"), behavior="isolated"),
        pre_tokenizers.WhitespaceSplit(),
    ])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIALS[3:], **({"extra_special_tokens": extra_special_tokens}
                                                   if extra_special_tokens else {}),
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llava_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    from tiny_models import GRID

    image_processor = CLIPImageProcessor(size={"shortest_edge": GRID * 14},
                                         crop_size={"height": GRID * 14, "width": GRID * 14})
    return LlavaProcessor(image_processor=image_processor, tokenizer=word_tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def tiny_qwen_processor():
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from tiny_models import Q_PATCH

    sizes = dict(patch_size=Q_PATCH, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8, max_pixels=32 * 32)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=word_tokenizer(),
                            video_processor=Qwen2VLVideoProcessor(**sizes))


# A minimal chat template for the tiny processors: lmms-eval's model classes build prompts with
# ``processor.apply_chat_template``. Images become the processor's placeholder, text is kept, roles drop.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)


def save_tiny_checkpoint(model, processor, folder, chat_template: str):
    """Save ``model`` with ``processor`` (given ``chat_template``) as a loadable checkpoint folder, the
    way a hub checkpoint is laid out; returns the folder."""
    from pathlib import Path

    processor.chat_template = chat_template
    processor.tokenizer.chat_template = chat_template
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def tiny_qwen3_vl_processor():
    """Qwen3-VL's processor (Qwen3-VL and Qwen3.5 share it) over the word tokenizer, with tiny patches."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from tiny_models import Q_PATCH

    sizes = dict(patch_size=Q_PATCH, temporal_patch_size=2, merge_size=2)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=8 * 8, max_pixels=32 * 32, **sizes),
        tokenizer=word_tokenizer(),
        video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32 * 4}, **sizes),
    )


def tiny_llava_onevision_processor():
    """LLaVA-OneVision's processor over the word tokenizer: 84 px views with tiny_models' pinpoints and
    AnyRes-max limit, 6 x 6 tokens per view, videos at 84 px; <|video_pad|> stands for <video>."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from tiny_models import OV_ASPECT, OV_PINPOINTS, OV_SIDE

    view = {"height": OV_SIDE * 14, "width": OV_SIDE * 14}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=view, image_grid_pinpoints=OV_PINPOINTS),
        tokenizer=word_tokenizer(), video_processor=LlavaOnevisionVideoProcessor(size=view),
        num_image_tokens=OV_SIDE * OV_SIDE, vision_feature_select_strategy="full", video_token="<|video_pad|>",
        vision_aspect_ratio=OV_ASPECT,
    )


def tiny_internvl_processor():
    """InternVL's processor over the word tokenizer: 112 px tiles (1 to 4 crops + a thumbnail), 16 tokens a
    tile; <|vision_start|>, <|vision_end|> and <image> stand for <img>, </img> and <IMG_CONTEXT>."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    from tiny_models import IVL_TILE, IVL_TOKENS

    tile = {"height": IVL_TILE, "width": IVL_TILE}
    tokenizer = word_tokenizer({"start_image_token": "<|vision_start|>", "end_image_token": "<|vision_end|>",
                                "context_image_token": "<image>", "video_token": "<|video_pad|>"})
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, min_patches=1, max_patches=4),
        tokenizer=tokenizer, video_processor=InternVLVideoProcessor(size=tile), image_seq_length=IVL_TOKENS,
    )
