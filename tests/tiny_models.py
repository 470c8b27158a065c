"""Tiny random-init models and inputs for tests (importable helpers, no downloads)."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 3
PAD = 0
BOS = 1
GRID = 12  # 168px / patch 14 -> 12 x 12 = 144 patch tokens per image
TOKENS_PER_IMAGE = GRID * GRID


def eval_model(cls, config, attn_implementation: str, sub_configs=()):
    """``cls(config)`` in eval mode with ``attn_implementation`` (on ``sub_configs`` too), the pad id set and no
    end-of-sequence token, so that generate always produces the full requested length in tests."""
    config._attn_implementation = attn_implementation
    for sub in sub_configs:
        sub._attn_implementation = attn_implementation
    model = cls(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model.eval()


def tiny_llava(attn_implementation: str = "sdpa", seed: int = 0, text_layers: int = 4, vision_layers: int = 3):
    """A LLaVA-1.5-shaped model: CLIP ViT + 2-layer MLP projector + Llama (GQA)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
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
    return eval_model(LlavaForConditionalGeneration, config, attn_implementation)


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


# --- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------
Q_IMAGE, Q_VIDEO, Q_START, Q_END = 5, 6, 7, 8
Q_PATCH = 2  # tiny patches: pixel rows are 3 * 2 (temporal) * 2 * 2 = 24 values


def tiny_qwen(version: str = "2", attn_implementation: str = "sdpa", seed: int = 0):
    """A Qwen2-VL (version '2') or Qwen2.5-VL (version '2.5') shaped model with 2x2 merging."""
    torch.manual_seed(seed)
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    if version == "2":
        from transformers import Qwen2VLConfig
        from transformers import Qwen2VLForConditionalGeneration as cls

        vision = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=Q_PATCH,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=Q_IMAGE,
                               video_token_id=Q_VIDEO, vision_start_token_id=Q_START, vision_end_token_id=Q_END,
                               bos_token_id=BOS, eos_token_id=2)
    else:
        from transformers import Qwen2_5_VLConfig
        from transformers import Qwen2_5_VLForConditionalGeneration as cls

        vision = dict(depth=4, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                      patch_size=Q_PATCH, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                      window_size=8, fullatt_block_indexes=[1, 3])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=Q_IMAGE,
                                  video_token_id=Q_VIDEO, vision_start_token_id=Q_START, vision_end_token_id=Q_END,
                                  bos_token_id=BOS, eos_token_id=2)
    return eval_model(cls, config, attn_implementation, (config.text_config, config.vision_config))


def qwen_batch(rows: list[list], side: str = "left", seed: int = 0) -> dict:
    """Build Qwen inputs. Each row is a list of items: ints (text tokens), ("image", h, w) with h, w in
    patches (multiples of 2), or ("video", t, h, w)."""
    generator = torch.Generator().manual_seed(seed)
    sequences, types, image_grids, video_grids, image_pixels, video_pixels = [], [], [], [], [], []
    for row in rows:
        ids, kinds = [BOS], [0]
        for item in row:
            if isinstance(item, int):
                ids.append(item)
                kinds.append(0)
                continue
            if item[0] == "image":
                t, h, w = 1, item[1], item[2]
                image_grids.append([t, h, w])
                image_pixels.append(torch.randn(t * h * w, 3 * 2 * Q_PATCH * Q_PATCH, generator=generator))
                token, kind = Q_IMAGE, 1
            else:
                t, h, w = item[1], item[2], item[3]
                video_grids.append([t, h, w])
                video_pixels.append(torch.randn(t * h * w, 3 * 2 * Q_PATCH * Q_PATCH, generator=generator))
                token, kind = Q_VIDEO, 2
            count = t * h * w // 4
            ids += [Q_START] + [token] * count + [Q_END]
            kinds += [0] + [kind] * count + [0]
        sequences.append(ids)
        types.append(kinds)
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mm_types = torch.zeros_like(input_ids, dtype=torch.int)
    mask = torch.zeros_like(input_ids)
    for r, (ids, kinds) in enumerate(zip(sequences, types)):
        span = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[r, span] = torch.tensor(ids)
        mm_types[r, span] = torch.tensor(kinds, dtype=torch.int)
        mask[r, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm_types}
    if image_grids:
        batch["pixel_values"] = torch.cat(image_pixels)
        batch["image_grid_thw"] = torch.tensor(image_grids)
    if video_grids:
        batch["pixel_values_videos"] = torch.cat(video_pixels)
        batch["video_grid_thw"] = torch.tensor(video_grids)
    return batch


# --- LLaVA-NeXT ----------------------------------------------------------------------------------
NEXT_SIDE = 4  # 56px views / patch 14 -> 4 x 4 tokens per view


def tiny_llava_next(attn_implementation: str = "sdpa", seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=NEXT_SIDE * 14, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048, pad_token_id=PAD)
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
        pad_token_id=PAD,
    )
    return eval_model(LlavaNextForConditionalGeneration, config, attn_implementation)


def llava_next_batch(model, rows: list[tuple[list[int], tuple[int, int], list[int]]], seed: int = 0) -> dict:
    """Rows of (text before, image (height, width) in pixels, text after); one image per row, left padded.
    The number of <image> tokens per image comes from the model's own packing."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    generator = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([size for _, size, _ in rows])
    views = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, 56) for s in sizes]
    pixels = torch.zeros(len(rows), max(views), 3, 56, 56)
    for r, count in enumerate(views):
        pixels[r, :count] = torch.randn(count, 3, 56, 56, generator=generator)
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    prompts = [[BOS] + before + [IMAGE_TOKEN] * features.shape[0] + after
               for (before, _, after), features in zip(rows, packed)]
    batch = llava_batch_ids(prompts)
    batch.update(pixel_values=pixels, image_sizes=sizes)
    return batch


def llava_batch_ids(prompts: list[list[int]]) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return {"input_ids": ids, "attention_mask": mask}


# --- Qwen3-VL / Qwen3-VL-MoE -------------------------------------------------------------------------
Q3_TIME = 9  # stands for the timestamp text Qwen3-VL writes before each video frame
Q3_DEEPSTACK = (0, 1)  # vision blocks whose outputs DeepStack adds to decoder layers 0 and 1


def tiny_qwen3_vl(moe: bool = False, attn_implementation: str = "sdpa", seed: int = 0, text_layers: int = 4):
    """A Qwen3-VL (``moe=False``) or Qwen3-VL-MoE shaped model: 2x2 merging, two DeepStack levels,
    interleaved M-RoPE."""
    torch.manual_seed(seed)
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=4096, bos_token_id=BOS,
        eos_token_id=2, pad_token_id=PAD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
    )
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=Q_PATCH,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=list(Q3_DEEPSTACK))
    if moe:
        from transformers import Qwen3VLMoeConfig as config_cls
        from transformers import Qwen3VLMoeForConditionalGeneration as cls

        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    else:
        from transformers import Qwen3VLConfig as config_cls
        from transformers import Qwen3VLForConditionalGeneration as cls
    config = config_cls(text_config=text, vision_config=vision, image_token_id=Q_IMAGE, video_token_id=Q_VIDEO,
                        vision_start_token_id=Q_START, vision_end_token_id=Q_END)
    return eval_model(cls, config, attn_implementation, (config.text_config, config.vision_config))


def qwen3_batch(rows: list[list], side: str = "left", seed: int = 0) -> dict:
    """Qwen3-VL inputs: as ``qwen_batch``, but a ("video", t, h, w) item is written as Qwen3-VL's
    processor writes it: each frame its own <vision_start> run <vision_end>, after a timestamp token."""
    spread = []
    for row in rows:
        items = []
        for item in row:
            if not isinstance(item, int) and item[0] == "video":
                items.append(("video", *item[1:]))
            else:
                items.append(item)
        spread.append(items)
    batch = qwen_batch(spread, side=side, seed=seed)
    if "video_grid_thw" not in batch:
        return batch
    # rewrite each clip's one run of t * h * w / 4 placeholders as t runs of h * w / 4, one per frame
    width_rows, type_rows = [], []
    grids = iter(batch["video_grid_thw"].tolist())
    for ids, types, mask in zip(batch["input_ids"], batch["mm_token_type_ids"], batch["attention_mask"]):
        ids, types = ids[mask.bool()].tolist(), types[mask.bool()].tolist()
        out_ids, out_types, i = [], [], 0
        while i < len(ids):
            if ids[i] == Q_START and i + 1 < len(ids) and ids[i + 1] == Q_VIDEO:
                t, h, w = next(grids)
                per_frame = h * w // 4
                for _ in range(t):
                    out_ids += [Q3_TIME, Q_START] + [Q_VIDEO] * per_frame + [Q_END]
                    out_types += [0, 0] + [2] * per_frame + [0]
                i += 2 + t * per_frame
                continue
            out_ids.append(ids[i])
            out_types.append(types[i])
            i += 1
        width_rows.append(out_ids)
        type_rows.append(out_types)
    width = max(len(r) for r in width_rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mm_types = torch.zeros_like(input_ids, dtype=torch.int)
    mask = torch.zeros_like(input_ids)
    for r, (ids, kinds) in enumerate(zip(width_rows, type_rows)):
        span = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
        input_ids[r, span] = torch.tensor(ids)
        mm_types[r, span] = torch.tensor(kinds, dtype=torch.int)
        mask[r, span] = 1
    batch.update(input_ids=input_ids, mm_token_type_ids=mm_types, attention_mask=mask)
    return batch


def tiny_qwen3_5(moe: bool = False, attn_implementation: str = "sdpa", seed: int = 0):
    """A Qwen3.5 (``moe=False``) or Qwen3.5-MoE shaped model: Qwen3-VL's vision side without DeepStack and a
    hybrid decoder (linear-attention, full-attention, linear-attention, full-attention)."""
    torch.manual_seed(seed)
    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=2,
        pad_token_id=PAD, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True, "partial_rotary_factor": 1.0},
    )
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=Q_PATCH,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, out_hidden_size=64,
                  num_position_embeddings=16)
    if moe:
        from transformers import Qwen3_5MoeConfig as config_cls
        from transformers import Qwen3_5MoeForConditionalGeneration as cls

        text.update(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                    num_experts_per_tok=2)
        text.pop("intermediate_size")
    else:
        from transformers import Qwen3_5Config as config_cls
        from transformers import Qwen3_5ForConditionalGeneration as cls
    config = config_cls(text_config=text, vision_config=vision, image_token_id=Q_IMAGE, video_token_id=Q_VIDEO,
                        vision_start_token_id=Q_START, vision_end_token_id=Q_END)
    return eval_model(cls, config, attn_implementation, (config.text_config, config.vision_config))


# --- LLaVA-OneVision -----------------------------------------------------------------------------
OV_SIDE = 6  # 84px views / patch 14 -> 6 x 6 tokens per view (SigLIP: no [CLS]); video frames pool to 3 x 3
OV_VIDEO = 6  # the word tokenizer's <|video_pad|>, standing for OneVision's <video>
OV_PINPOINTS = [[84, 168], [168, 84], [168, 168]]  # 1x2, 2x1 and 2x2 crops of 84 px
OV_ASPECT = "anyres_max_2"  # a 2x2 canvas (12 x 12 = 144 tokens) is more than 2 views: bilinearly shrunk to 8 x 8


def tiny_llava_onevision(attn_implementation: str = "sdpa", seed: int = 0):
    """A LLaVA-OneVision-shaped model: SigLIP tower (last hidden state, 'full' strategy: every patch), 2-layer
    MLP projector, AnyRes-max packing with row-end newlines, Qwen2 decoder (GQA)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=OV_SIDE * 14, patch_size=14, vision_use_head=False)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=2)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, video_token_index=OV_VIDEO,
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio=OV_ASPECT, pad_token_id=PAD,
    )
    return eval_model(LlavaOnevisionForConditionalGeneration, config, attn_implementation,
                      (config.text_config, config.vision_config))


# --- InternVL ------------------------------------------------------------------------------------
IVL_TILE = 112  # 112px tiles / patch 14 -> 8 x 8 patches (+ [CLS]), pixel-shuffled to 4 x 4 = 16 tokens
IVL_TOKENS = (IVL_TILE // 14 // 2) ** 2
IVL_START, IVL_END = 7, 8  # the word tokenizer's <|vision_start|> / <|vision_end|>, standing for <img> / </img>


def tiny_internvl(attn_implementation: str = "sdpa", seed: int = 0):
    """An InternVL-shaped model: InternViT (with [CLS], q/k norms), pixel shuffle 0.5, MLP projector, Qwen2."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(model_type="internvl_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=[IVL_TILE, IVL_TILE], patch_size=[14, 14], use_qk_norm=True,
                  norm_type="rms_norm", use_mean_pooling=True)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=2)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                            image_seq_length=IVL_TOKENS, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", pad_token_id=PAD, tie_word_embeddings=False)
    return eval_model(InternVLForConditionalGeneration, config, attn_implementation,
                      (config.text_config, config.vision_config))
