"""The embedded scenes model: a small LLaVA-1.5-architecture model, its word-level tokenizer and processor.

Everything here is built offline from configs (no downloads):

- ``build_tokenizer()``: a ``PreTrainedTokenizerFast`` over the scenes vocabulary (``tokenizers`` WordLevel
  model, whitespace/punctuation pre-tokenizer), with ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` and the
  special ``<image>`` token; it prepends ``<s>`` like Llama's tokenizer and pads on the left.
- ``build_processor()``: a ``LlavaProcessor`` (``CLIPImageProcessor`` at 336 px with CLIP's normalisation
  + that tokenizer, patch 14, one additional image token, the "default" feature strategy), so
  ``processor(images=img, text=prompt(question))`` expands ``<image>`` into 576 tokens as LLaVA-1.5 does.
- ``build_model(ModelSize(...))``: a random-init ``LlavaForConditionalGeneration``: CLIP ViT at 336 px,
  patch 14 (576 patches + [CLS]), features from hidden state -2 without [CLS], a 2-layer GELU MLP
  projector and a Llama decoder.

``load(path)`` loads the shipped checkpoint (``vtoken/assets/scenes-llava`` by default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import scenes

PROMPT = "USER: <image>\n{question} ASSISTANT:"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_TOKEN_ID = range(5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBEDDED_MODEL = "scenes-llava"
#: the prompt format as a chat template (what lmms-eval's llava_hf class applies); no system prompt,
#: since the model was trained on this exact format
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_hidden: int = 192
    text_layers: int = 3
    text_heads: int = 6
    text_kv_heads: int = 6
    text_mlp: int = 512

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def of(cls, model) -> ModelSize:
        """The size of a built or loaded scenes model, read from its config."""
        vision, text = model.config.vision_config, model.config.text_config
        return cls(vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads,
                   vision.intermediate_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
                   text.num_key_value_heads, text.intermediate_size)


def prompt(question: str) -> str:
    """The LLaVA-1.5 prompt for one question about one image."""
    return PROMPT.format(question=question)


def vocabulary() -> list[str]:
    return list(SPECIAL_TOKENS) + scenes.vocabulary()


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = None
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation; drops whitespace
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left", model_max_length=1024,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": scenes.IMAGE_SIZE}, crop_size={"height": scenes.IMAGE_SIZE, "width": scenes.IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )


def build_processor(tokenizer=None):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=tokenizer or build_tokenizer(),
        patch_size=scenes.PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE,
    )


def build_model(size: ModelSize | None = None, seed: int = 0, vocab_size: int | None = None):
    """A random-init LLaVA-1.5-shaped model of ``size`` (float32, eval mode)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    size = size or ModelSize()
    vocab_size = vocab_size or len(vocabulary())
    vocab_size = (vocab_size + 7) // 8 * 8
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=size.vision_mlp, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, image_size=scenes.IMAGE_SIZE, patch_size=scenes.PATCH,
        projection_dim=size.vision_hidden, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=size.text_hidden, intermediate_size=size.text_mlp, num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads, num_key_value_heads=size.text_kv_heads, vocab_size=vocab_size,
        max_position_embeddings=1024, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=scenes.GRID ** 2,
        pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.do_sample = False
    return model.eval()


def embedded_model_path() -> Path:
    """Where the shipped checkpoint lives inside the installed package (it may be absent)."""
    return Path(str(resources.files("vtoken.assets"))) / EMBEDDED_MODEL


def load(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model, processor) from ``path`` (default: the embedded checkpoint), offline, in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else embedded_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no scenes model at {path} (no config.json); train one with "
            "`python scripts/train_scenes.py --out <dir>` (in a source checkout) or pass model_path"
        )
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, processor


def answer_words() -> list[str]:
    """Every one-word answer the scenes questions have."""
    return sorted(set(scenes.COLOR_NAMES) | set(scenes.SHAPES) | set(scenes.NUMBERS)
                  | {"yes", "no", "left", "right"})


def parameter_counts(model) -> dict[str, int]:
    inner = model.model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"vision_tower": count(inner.vision_tower), "projector": count(inner.multi_modal_projector),
            "language_model": count(inner.language_model) + count(model.lm_head), "total": count(model)}


@torch.no_grad()
def next_token_logits(model, processor, images: list, questions: list[str]) -> torch.Tensor:
    """Logits of the first answer token for each (image, question), one padded batch (left padding)."""
    inputs = processor(images=images, text=[prompt(q) for q in questions], return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    out = model(**inputs, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1].float()


def predict(model, processor, images: list, questions: list[str]) -> list[str]:
    """Greedy one-word answers: the argmax over the whole vocabulary of the first answer token's logits
    (every answer is a single token, so this is greedy decoding's first token)."""
    ids = next_token_logits(model, processor, images, questions).argmax(-1).tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    return [t.lower() for t in tokens]
