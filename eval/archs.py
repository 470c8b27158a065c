"""Real vision-language architectures with random weights, for speed-only benchmarks.

``build_arch("llava-1.5-7b", depth_scale=1/8)`` gives LLaVA-1.5-7B's exact widths, head counts,
vocabulary and image size with 1/8 of its layers (3 ViT-L/14-336 blocks + 4 Llama-7B layers), so that
a CPU can run it while the vision:LLM cost split stays that of the full model. Depth is the only
thing scaled. Weights are random (std 0.02, norms at 1): timings are meaningful, outputs are not.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: HF config dictionaries of the published checkpoints (llava-hf/llava-1.5-7b-hf,
#: llava-hf/llava-1.5-13b-hf, Qwen/Qwen2.5-VL-7B-Instruct), the fields that set speed and shapes.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                pad_token_id=32001, bos_token_id=1, eos_token_id=2)
LLAMA_13B = dict(LLAMA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40)
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3,
                           tokens_per_second=2)
QWEN25_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]})


QWEN3_VL_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                          patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                          num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
                          deepstack_visual_indexes=[8, 16, 24])
QWEN3_VL_8B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                        rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True})


#: llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m/14-384 with its last block dropped (26 blocks, no
#: head), Qwen2-7B-Instruct with the vocabulary grown by <image> and <video> and padded to a multiple of 64
SIGLIP_SO400M_OV = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                        num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
QWEN2_7B_OV_TEXT = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, vocab_size=152128,
                        max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
#: AnyRes-max canvases of 1x1 up to 6x6 views of 384 px
OV_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]


#: OpenGVLab/InternVL3-8B-hf: InternViT-300M-448px-V2.5 and Qwen2.5-7B
INTERNVIT_300M = dict(model_type="internvl_vision", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14], use_qk_norm=False,
                      norm_type="layer_norm", layer_norm_eps=1e-6, hidden_act="gelu", use_mean_pooling=True)
QWEN25_7B_INTERNVL3_TEXT = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, vocab_size=151674,
                                max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643,
                                eos_token_id=151645, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def scaled(layers: int, depth_scale: float) -> int:
    """``layers * depth_scale`` rounded, at least 1 (32 at 1/8 -> 4; 24 -> 3; 28 -> 4 (3.5 rounds up))."""
    if not 0 < depth_scale <= 1:
        raise ValueError(f"depth_scale must be in (0, 1]; got {depth_scale}")
    return max(1, int(layers * depth_scale + 0.5))


def llava_config(text: dict, depth_scale: float = 1.0) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(**dict(CLIP_L_336, num_hidden_layers=scaled(24, depth_scale)))
    llm = LlamaConfig(**dict(text, num_hidden_layers=scaled(text["num_hidden_layers"], depth_scale)))
    config = LlavaConfig(
        vision_config=vision, text_config=llm, image_token_id=32000, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576, projector_hidden_act="gelu",
        pad_token_id=32001,
    )
    return config


def qwen25_vl_config(depth_scale: float = 1.0) -> Any:
    from transformers import Qwen2_5_VLConfig

    depth = scaled(32, depth_scale)
    # full-attention blocks end each group of 8 windowed blocks; scaled, they keep ending the groups
    full = sorted({min(depth - 1, max(0, int((i + 1) * depth_scale + 0.5) - 1)) for i in (7, 15, 23, 31)})
    vision = dict(QWEN25_VL_7B_VISION, depth=depth, fullatt_block_indexes=full)
    text = dict(QWEN25_VL_7B_TEXT, num_hidden_layers=scaled(28, depth_scale))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, bos_token_id=151643,
                            eos_token_id=151645, tie_word_embeddings=False)


def qwen3_vl_config(depth_scale: float = 1.0) -> Any:
    from transformers import Qwen3VLConfig

    depth = scaled(27, depth_scale)
    # the DeepStack taps keep their relative places in the shorter tower (distinct, before its last block)
    taps = sorted({min(depth - 1, max(0, int(i * depth_scale + 0.5))) for i in (8, 16, 24)})
    vision = dict(QWEN3_VL_8B_VISION, depth=depth, deepstack_visual_indexes=taps)
    text = dict(QWEN3_VL_8B_TEXT, num_hidden_layers=max(scaled(36, depth_scale), len(taps)))
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


def llava_onevision_config(depth_scale: float = 1.0) -> Any:
    from transformers import LlavaOnevisionConfig

    vision = dict(SIGLIP_SO400M_OV, num_hidden_layers=scaled(26, depth_scale))
    text = dict(QWEN2_7B_OV_TEXT, num_hidden_layers=scaled(28, depth_scale))
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                video_token_index=151647, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", image_grid_pinpoints=OV_PINPOINTS,
                                vision_aspect_ratio="anyres_max_9", projector_hidden_act="gelu",
                                tie_word_embeddings=False)


def internvl3_config(depth_scale: float = 1.0) -> Any:
    from transformers import InternVLConfig

    vision = dict(INTERNVIT_300M, num_hidden_layers=scaled(24, depth_scale))
    text = dict(QWEN25_7B_INTERNVL3_TEXT, num_hidden_layers=scaled(28, depth_scale))
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667, image_seq_length=256,
                          downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=False)


ARCHS: dict[str, Callable[[float], Any]] = {
    "llava-1.5-7b": lambda scale: llava_config(LLAMA_7B, scale),
    "llava-1.5-13b": lambda scale: llava_config(LLAMA_13B, scale),
    "qwen2.5-vl-7b": qwen25_vl_config,
    "qwen3-vl-8b": qwen3_vl_config,
    "llava-onevision-7b": llava_onevision_config,
    "internvl3-8b": internvl3_config,
}


def arch_config(name: str, depth_scale: float = 1.0) -> Any:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; accepted: {', '.join(ARCHS)}")
    return ARCHS[name](depth_scale)


def build_arch(name: str, depth_scale: float = 1.0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", attn_implementation: str = "sdpa", seed: int = 0) -> Any:
    """The architecture ``name`` with random weights, in eval mode, on ``device``."""
    config = arch_config(name, depth_scale)
    return build_random(config, dtype=dtype, device=device, attn_implementation=attn_implementation, seed=seed)


def build_random(config: Any, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa", seed: int = 0) -> Any:
    """A model for ``config`` with random weights. The library's initialisers are skipped (they take
    half a minute for a billion parameters on one core); every parameter is filled here instead."""
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    config._attn_implementation = attn_implementation
    for name in ("text_config", "vision_config"):
        sub = getattr(config, name, None)
        if sub is not None:
            sub._attn_implementation = attn_implementation
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(config)
    fill_random(model, seed)
    model = model.to(device=device, dtype=dtype).eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = getattr(config, "pad_token_id", None) or 0
    return model


def fill_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Weights ~ N(0, std), biases 0, normalisation weights 1, in place.

    The values come from one pool of a few million normal samples, copied at a random offset per
    tensor (drawing a billion samples one by one takes longer than the benchmark's warm-up); the pool
    length is not a power of two, so rows of a matrix do not repeat."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=generator) * std
    with torch.no_grad():
        for module_name, module in model.named_modules():
            is_norm = "norm" in type(module).__name__.lower() or module_name.rsplit(".", 1)[-1].startswith(
                ("ln", "layer_norm", "layernorm", "norm"))
            for name, param in module.named_parameters(recurse=False):
                if name == "bias":
                    param.zero_()
                elif is_norm:
                    param.fill_(1.0)
                else:
                    _fill_from_pool(param.data.view(-1), pool, generator)


#: a prime number of samples: tensors filled from it do not repeat with a power-of-two period
POOL = 4_194_301


def _fill_from_pool(flat: torch.Tensor, pool: torch.Tensor, generator: torch.Generator) -> None:
    start = int(torch.randint(0, pool.numel(), (1,), generator=generator))
    done = 0
    while done < flat.numel():
        take = min(flat.numel() - done, pool.numel() - start)
        flat[done:done + take].copy_(pool[start:start + take])
        done += take
        start = 0
