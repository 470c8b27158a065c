"""The contract suite's table: one case per registered integration and model type.

A case says how to build a tiny random-init model of the family (fp32, "eager" or "sdpa" attention), how
to build a padded batch of rows with different prompt lengths (left or right padding) and each row alone,
how to run the model, and the representative stages at every site the family offers (``SiteStage``).
A stage gives two sets of ``vtoken.wrap`` options: ``prune`` drops tokens, ``keep_all`` keeps every one.

A new integration gets every clause of ``tests/test_contract.py`` by adding its case(s) to ``CASES``;
``test_every_registered_integration_has_a_contract_case`` fails until it does.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tiny_models import (
    BOS,
    IMAGE_TOKEN,
    IVL_END,
    IVL_START,
    IVL_TILE,
    IVL_TOKENS,
    OV_PINPOINTS,
    OV_SIDE,
    OV_VIDEO,
    PAD,
    Q3_TIME,
    Q_END,
    Q_IMAGE,
    Q_PATCH,
    Q_START,
    Q_VIDEO,
    tiny_internvl,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen,
    tiny_qwen3_5,
    tiny_qwen3_vl,
)

ATTENTION = ("eager", "sdpa")
SIDES = ("left", "right")


@dataclass(frozen=True)
class SiteStage:
    """One representative stage at one site: wrap options that prune, and options that keep every token."""

    site: str
    method: str
    prune: dict
    keep_all: dict

    @property
    def id(self) -> str:
        return f"{self.site}:{self.method}"


@dataclass
class Case:
    """A model family (one integration, one model type) with tiny models and inputs for the contract."""

    name: str
    integration: str  # the name in vtoken.registry.INTEGRATIONS
    model_type: str  # one of that integration's model_types
    vlm: bool  # a vision-language model (generate, labels) or a standalone vision encoder
    build_model: Callable[[str], torch.nn.Module]  # attn_implementation -> fp32 eval model
    rows: list  # row specs, each with its own image(s); prompt lengths differ
    build_inputs: Callable[[torch.nn.Module, list, str], dict]  # (model, rows, side) -> model kwargs
    stages: list[SiteStage]
    #: a weight of the model whose change changes the outputs (zeroed in place by the deepcopy clause)
    weight: Callable[[torch.nn.Module], torch.Tensor]
    #: (model, inputs) -> every output tensor; VLMs: (logits,)
    run: Callable[[torch.nn.Module, dict], tuple] = None  # type: ignore[assignment]
    sides: tuple[str, ...] = SIDES
    notes: str = ""
    _inputs: dict = field(default_factory=dict, repr=False)

    def model(self, attn: str = "sdpa") -> torch.nn.Module:
        """A fresh copy of the pristine tiny model (built once per attention implementation)."""
        return copy.deepcopy(_pristine(self.name, attn))

    def batch(self, side: str = "left") -> dict:
        """The padded batch of every row."""
        return self._cached(("batch", side), lambda: self.build_inputs(self.model(), self.rows, side))

    def singles(self) -> list[dict]:
        """Each row alone (no padding), with the same images it has in the batch."""
        return self._cached(("singles",), lambda: [
            self.build_inputs(self.model(), [row], "left") for row in self.rows])

    def _cached(self, key, make):
        """Inputs are built once (with a copy of the model: the pristine one never runs); callers get
        shallow copies they may change."""
        if key not in self._inputs:
            self._inputs[key] = make()
        value = self._inputs[key]
        return dict(value) if isinstance(value, dict) else [dict(item) for item in value]


@functools.cache
def _pristine(name: str, attn: str) -> torch.nn.Module:
    """The unwrapped model every test copies; nothing ever wraps or changes it."""
    return CASES_BY_NAME[name].build_model(attn)


def vlm_logits(model, inputs: dict) -> tuple:
    with torch.no_grad():
        return (model(**inputs).logits,)


# --- LLaVA-1.5 -------------------------------------------------------------------------------------
L_GRID, L_PATCH = 6, 14  # 84px / patch 14: 6 x 6 = 36 image tokens
L_TOKENS = L_GRID * L_GRID


def contract_llava(attn: str = "sdpa", seed: int = 0):
    """LLaVA-1.5 shape: CLIP ViT (4 blocks, feature layer -2) + MLP projector + Llama (GQA, 4 layers)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              image_size=L_GRID * L_PATCH, patch_size=L_PATCH, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024, pad_token_id=PAD,
                       bos_token_id=BOS, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=L_TOKENS, pad_token_id=PAD)
    config._attn_implementation = attn
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = attn
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # always the full requested length
    return model.eval()


def _pad(prompts: list[list[int]], side: str, extra: list[list[int]] | None = None) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, span] = torch.tensor(prompt)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def llava_inputs(model, rows: list, side: str) -> dict:
    """Rows of (text before, text after, pixel seed): one image each."""
    prompts = [[BOS] + before + [IMAGE_TOKEN] * L_TOKENS + [10] + after for before, after, _ in rows]
    batch = _pad(prompts, side)
    batch["pixel_values"] = torch.cat([_pixels(seed, 1, 3, L_GRID * L_PATCH, L_GRID * L_PATCH)
                                       for _, _, seed in rows])
    return batch


# --- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------------
def qwen_inputs(model, rows: list, side: str) -> dict:
    """Rows of (text before, (h, w) in patches, text after, pixel seed): one image each."""
    sequences, kinds = [], []
    grids, pixels = [], []
    for before, (h, w), after, seed in rows:
        count = h * w // 4
        sequences.append([BOS] + before + [Q_START] + [Q_IMAGE] * count + [Q_END] + after)
        kinds.append([0] * (2 + len(before)) + [1] * count + [0] * (1 + len(after)))
        grids.append([1, h, w])
        pixels.append(_pixels(seed, h * w, 3 * 2 * Q_PATCH * Q_PATCH))
    batch = _pad(sequences, side)
    types = torch.zeros_like(batch["input_ids"], dtype=torch.int)
    width = types.shape[1]
    for row, row_kinds in enumerate(kinds):
        span = slice(width - len(row_kinds), width) if side == "left" else slice(0, len(row_kinds))
        types[row, span] = torch.tensor(row_kinds, dtype=torch.int)
    batch.update(mm_token_type_ids=types, pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
    return batch


# --- Qwen3-VL / Qwen3.5: several images and videos per prompt -----------------------------------------
def qwen3_inputs(model, rows: list, side: str) -> dict:
    """Rows of items: an int (a text token), ("image", h, w, seed) or ("video", t, h, w, seed), sizes in
    patches. A video is written as Qwen3-VL's processor writes it: per frame (temporal patch) a timestamp
    token and its own <vision_start> run <vision_end>."""
    sequences, kinds = [], []
    image_grids, video_grids, image_pixels, video_pixels = [], [], [], []
    for row in rows:
        ids, types = [BOS], [0]
        for item in row:
            if isinstance(item, int):
                ids.append(item)
                types.append(0)
            elif item[0] == "image":
                _, h, w, seed = item
                image_grids.append([1, h, w])
                image_pixels.append(_pixels(seed, h * w, 3 * 2 * Q_PATCH * Q_PATCH))
                ids += [Q_START] + [Q_IMAGE] * (h * w // 4) + [Q_END]
                types += [0] + [1] * (h * w // 4) + [0]
            else:
                _, t, h, w, seed = item
                video_grids.append([t, h, w])
                video_pixels.append(_pixels(seed, t * h * w, 3 * 2 * Q_PATCH * Q_PATCH))
                for _ in range(t):
                    ids += [Q3_TIME, Q_START] + [Q_VIDEO] * (h * w // 4) + [Q_END]
                    types += [0, 0] + [2] * (h * w // 4) + [0]
        sequences.append(ids)
        kinds.append(types)
    batch = _pad(sequences, side)
    types = torch.zeros_like(batch["input_ids"], dtype=torch.int)
    width = types.shape[1]
    for row, row_kinds in enumerate(kinds):
        span = slice(width - len(row_kinds), width) if side == "left" else slice(0, len(row_kinds))
        types[row, span] = torch.tensor(row_kinds, dtype=torch.int)
    batch["mm_token_type_ids"] = types
    if image_grids:
        batch.update(pixel_values=torch.cat(image_pixels), image_grid_thw=torch.tensor(image_grids))
    if video_grids:
        batch.update(pixel_values_videos=torch.cat(video_pixels), video_grid_thw=torch.tensor(video_grids))
    return batch


# --- LLaVA-NeXT --------------------------------------------------------------------------------------
NEXT_VIEW = 56


def next_inputs(model, rows: list, side: str) -> dict:
    """Rows of (text before, image (height, width) in pixels, text after, pixel seed): one image each.
    The placeholder count per image comes from the model's own AnyRes packing."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = torch.tensor([size for _, size, _, _ in rows])
    views = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, NEXT_VIEW) for s in sizes]
    pixels = torch.zeros(len(rows), max(views), 3, NEXT_VIEW, NEXT_VIEW)
    for r, (count, (_, _, _, seed)) in enumerate(zip(views, rows)):
        pixels[r, :count] = _pixels(seed, count, 3, NEXT_VIEW, NEXT_VIEW)
    counts = _next_counts(model, tuple(tuple(s) for s in sizes.tolist()))
    prompts = [[BOS] + before + [IMAGE_TOKEN] * n + after for (before, _, after, _), n in zip(rows, counts)]
    batch = _pad(prompts, side)
    batch.update(pixel_values=pixels, image_sizes=sizes)
    return batch


def _next_counts(model, sizes: tuple) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    counts = []
    for size in sizes:
        views = image_size_to_num_patches(torch.tensor(size), model.config.image_grid_pinpoints, NEXT_VIEW)
        with torch.no_grad():
            packed = model.model.get_image_features(pixel_values=torch.zeros(1, views, 3, NEXT_VIEW, NEXT_VIEW),
                                                    image_sizes=torch.tensor([size])).pooler_output
        counts.append(int(packed[0].shape[0]))
    return counts


def contract_llava_next(attn: str = "sdpa"):
    model = tiny_llava_next(attn)
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn
    return model


# --- LLaVA-OneVision -----------------------------------------------------------------------------------
OV_VIEW = OV_SIDE * 14


def onevision_inputs(model, rows: list, side: str) -> dict:
    """Rows of text ids, ("image", (height, width) in pixels, seed) and ("video", frames, seed) items. A row's
    only image gets AnyRes-max views, several images their base view each (``batch_num_images``); placeholder
    counts come from the model's own packing."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    images = [item for row in rows for item in row if isinstance(item, tuple) and item[0] == "image"]
    per_row = [sum(isinstance(i, tuple) and i[0] == "image" for i in row) for row in rows]
    patched = [n == 1 for n in per_row for _ in range(n)]
    views = [image_size_to_num_patches(torch.tensor(size), OV_PINPOINTS, OV_VIEW) if one else 1
             for (_, size, _), one in zip(images, patched)]
    batch: dict = {}
    counts = iter([])
    if images:
        pixels = torch.zeros(len(images), max(views), 3, OV_VIEW, OV_VIEW)
        for i, (count, (_, _, seed)) in enumerate(zip(views, images)):
            pixels[i, :count] = _pixels(seed, count, 3, OV_VIEW, OV_VIEW)
        sizes = torch.tensor([size for _, size, _ in images])
        with torch.no_grad():
            packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes,
                                                    batch_num_images=torch.tensor(per_row)).pooler_output
        counts = iter([int(p.shape[0]) for p in packed])
        batch.update(pixel_values=pixels, image_sizes=sizes, batch_num_images=torch.tensor(per_row))
    videos = [item for row in rows for item in row if isinstance(item, tuple) and item[0] == "video"]
    if videos:
        batch["pixel_values_videos"] = torch.stack([_pixels(seed, frames, 3, OV_VIEW, OV_VIEW)
                                                    for _, frames, seed in videos])
    pooled = (-(-OV_SIDE // 2)) ** 2
    prompts = []
    for row in rows:
        prompt = [BOS]
        for item in row:
            if not isinstance(item, tuple):
                prompt.append(item)
            elif item[0] == "image":
                prompt += [IMAGE_TOKEN] * next(counts)
            else:
                prompt += [OV_VIDEO] * (item[1] * pooled + 1)
        prompts.append(prompt)
    return {**_pad(prompts, side), **batch}


# --- InternVL --------------------------------------------------------------------------------------------
def internvl_inputs(model, rows: list, side: str) -> dict:
    """Rows of text ids and ("image", tiles, seed) items, each image ``<img>`` + 16 placeholders a tile +
    ``</img>``; a video is written as its frames, one-tile images (the processor's ``FrameN: <img>...``)."""
    prompts, pixels = [], []
    for row in rows:
        prompt = [BOS]
        for item in row:
            if isinstance(item, tuple):
                _, tiles, seed = item
                prompt += [IVL_START] + [IMAGE_TOKEN] * (IVL_TOKENS * tiles) + [IVL_END]
                pixels.append(_pixels(seed, tiles, 3, IVL_TILE, IVL_TILE))
            else:
                prompt.append(item)
        prompts.append(prompt)
    return {**_pad(prompts, side), "pixel_values": torch.cat(pixels)}


# --- standalone ViTs ---------------------------------------------------------------------------------
V_SIZE, V_PATCH = 32, 8  # 4 x 4 = 16 patches
V_DEPTH = 4


def contract_timm(attn: str = "sdpa"):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=V_SIZE, patch_size=V_PATCH, embed_dim=32, depth=V_DEPTH, num_heads=4,
                              num_classes=10).eval()
    for block in model.blocks:
        block.attn.fused_attn = attn == "sdpa"
    return model


def contract_open_clip_vit(attn: str = "sdpa"):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    # nn.MultiheadAttention has one attention path: "eager" and "sdpa" build the same model
    return VisionTransformer(image_size=V_SIZE, patch_size=V_PATCH, width=32, layers=V_DEPTH, heads=4, mlp_ratio=2,
                             output_dim=16, output_tokens=True).eval()


def contract_open_clip_clip(attn: str = "sdpa"):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=V_DEPTH, width=32, head_width=8, mlp_ratio=2, patch_size=V_PATCH, image_size=V_SIZE)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=4, layers=1)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def vit_inputs(model, rows: list, side: str) -> dict:
    """Rows are pixel seeds: one image each (a ViT batch has no padding)."""
    return {"x": torch.cat([_pixels(seed, 1, 3, V_SIZE, V_SIZE) for seed in rows])}


def timm_run(model, inputs: dict) -> tuple:
    with torch.no_grad():
        features = model.forward_features(inputs["x"])
        return model.forward_head(features), features


def open_clip_vit_run(model, inputs: dict) -> tuple:
    with torch.no_grad():
        return tuple(model(inputs["x"]))


def open_clip_clip_run(model, inputs: dict) -> tuple:
    with torch.no_grad():
        return (model.encode_image(inputs["x"]),)


# --- the stages ---------------------------------------------------------------------------------------
def projector(keep: int) -> SiteStage:
    return SiteStage("projector", "kcenter", dict(keep=keep), dict(keep=1.0))


def llm(method: str, keep: float) -> SiteStage:
    return SiteStage("llm(2)", method, dict(keep=keep, site="llm(2)"), dict(keep=1.0, site="llm(2)"))


def llm_pyramid() -> SiteStage:
    """Two llm(K) sites in one pass: FastV keeps 75 % at llm(2), DART half of those at llm(3)."""
    options = dict(keep=0.5, fastv={"keep": 0.75})
    return SiteStage("pyramid", "fastv@llm(2)+dart@llm(3)", options, dict(keep=1.0, fastv={"keep": 1.0}))


def vscan(keep: int = 3, **integration: Any) -> SiteStage:
    """The named pipeline ``vscan``: the scan keeps 3 x keep at the projector, FastV keep at llm(2)."""
    at = {"fastv": {"site": "llm(2)"}, **integration}
    return SiteStage("vscan", "vscan", dict(keep=keep, window=2, **at), dict(keep=1.0, window=2, **at))


def front(keep: int, **integration: Any) -> list[SiteStage]:
    """The pre-LLM methods from the field's front at the projector: VisionZip, HiPrune, CDPruner and the
    long-tail budget (adaptive: each image keeps up to ``keep``; keep-all is its exact form at every token).
    ``integration``: wrap options they need on this family (LLaVA-NeXT: each view on its grid)."""
    stages = [SiteStage("projector", method, dict(keep=keep, **integration), dict(keep=1.0, **integration))
              for method in ("visionzip", "hiprune", "cdpruner")]
    return stages + [SiteStage("projector", "longtail", dict(keep=keep, **integration),
                               dict(keep=1.0, exact=True, **integration))]


def decode_site() -> SiteStage:
    """decode_topk after every decoding step, one visual entry per image left after the first choice."""
    return SiteStage("decode", "decode_topk", dict(keep=1, site="decode"), dict(keep=1.0, site="decode"))


def llm_transprune() -> SiteStage:
    """TransPrune at llm(2) with the transitions of layers 0 and 1 and layer 2's instruction attention."""
    options = dict(site="llm(2)", from_layer=0)
    return SiteStage("llm(2)", "transprune", dict(keep=0.5, **options), dict(keep=1.0, **options))


def vision_cls_attn(keep: int) -> SiteStage:
    return SiteStage("vision(1)", "cls_attn", dict(keep=keep, site="vision(1)"), dict(keep=1.0, site="vision(1)"))


def vision_pixel_shuffle() -> SiteStage:
    return SiteStage("vision(1)", "pixel_shuffle", dict(layer=1), dict(layer=1, ratio=1))


def lm_head(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


LLAVA_ROWS = [([20, 21], [30, 31, 32, 33], 11), ([22], [34, 35], 12), ([23, 24, 25], [36], 13)]
QWEN_ROWS = [([20], (4, 4), [30, 31], 21), ([21, 22], (8, 4), [32], 22), ([23], (4, 8), [33, 34, 35], 23)]
NEXT_ROWS = [([20], (60, 110), [30, 31], 31), ([21, 22], (100, 40), [32], 32), ([23], (56, 56), [33, 34, 35], 33)]
#: one image a row; (160, 170) fills a 2x2 canvas that AnyRes-max shrinks bilinearly
ONEVISION_ROWS = [[20, ("image", (60, 110), 61), 30, 31], [21, 22, ("image", (160, 170), 62), 32],
                  [23, ("image", (84, 84), 63), 33, 34, 35]]
#: two images of different sizes in one prompt (base views), a 2-frame video, an image and a video together
ONEVISION_MULTI_ROWS = [[20, ("image", (60, 110), 64), 30, ("image", (100, 40), 65), 31],
                        [21, 22, ("video", 2, 66), 32],
                        [23, ("image", (160, 170), 67), ("video", 2, 68), 33, 34]]
#: one image a row: 3 tiles (2 crops + thumbnail), 1 tile, 5 tiles
INTERNVL_ROWS = [[20, ("image", 3, 81), 30, 31], [21, 22, ("image", 1, 82), 32], [23, ("image", 5, 83), 33, 34, 35]]
#: two images of different tile counts in one prompt; a 3-frame video (FrameN text before each frame); an
#: image and a 2-frame video
INTERNVL_MULTI_ROWS = [[20, ("image", 3, 84), 30, ("image", 1, 85), 31],
                       [21, 11, ("image", 1, 86), 12, ("image", 1, 87), 13, ("image", 1, 88), 32],
                       [23, ("image", 2, 89), 11, ("image", 1, 90), 12, ("image", 1, 91), 33, 34]]
VIT_ROWS = [41, 42, 43]

#: tiny Qwen3-VL adds DeepStack levels after decoder layers 0 and 1: at llm(1), level 1 goes to the kept tokens
QWEN3_VL_INSIDE_DEEPSTACK = SiteStage("llm(1)", "fastv", dict(keep=3, site="llm(1)"), dict(keep=1.0, site="llm(1)"))
QWEN3_VL_NOTES = "DeepStack (2 levels; at llm(1) the second goes to the kept tokens); no vision(L) site"
#: tiny Qwen3.5 layers: linear, full, linear, full attention. llm(2) follows the first full-attention layer
#: (FastV and DART read it); kcenter needs no signal, so llm(3) after a linear-attention layer serves it
QWEN3_5_STAGES = [projector(3), llm("dart", 3), llm("fastv", 3),
                  SiteStage("llm(3)", "kcenter", dict(keep=3, site="llm(3)"), dict(keep=1.0, site="llm(3)"))]
QWEN3_5_NOTES = "hybrid decoder: llm(K) after the first full-attention layer; signals where layer K-1 is one"

CASES: list[Case] = [
    Case("llava", "llava", "llava", True, contract_llava, LLAVA_ROWS, llava_inputs,
         [projector(8), llm("dart", 8), llm("fastv", 8), llm_pyramid(), decode_site(), llm_transprune(),
          llm("sparsevlm", 8), llm("mustdrop_filter", 8),
          SiteStage("projector", "mustdrop_merge", dict(keep=8), dict(keep=1.0)),
          vision_cls_attn(8), vision_pixel_shuffle(), *front(8), vscan()],
         lm_head),
    Case("llava_next", "llava_next", "llava_next", True, contract_llava_next, NEXT_ROWS, next_inputs,
         [projector(10), SiteStage("projector", "cls_attn", dict(keep=10), dict(keep=1.0)), llm("dart", 10),
          llm("fastv", 10), llm_pyramid(), decode_site(), llm_transprune(), llm("sparsevlm", 10),
          SiteStage("vision(0)", "cls_attn", dict(keep=5, site="vision(0)"), dict(keep=1.0, site="vision(0)")),
          SiteStage("vision(0)", "pixel_shuffle", dict(layer=0), dict(layer=0, ratio=1)),
          *front(10, anyres_budget="view"), vscan(anyres_budget="view")],
         lm_head,
         notes="vision(0) only (block 1 gives the feature layer): every view keeps the same count, packed in place"),
    Case("internvl", "internvl", "internvl", True, tiny_internvl, INTERNVL_ROWS, internvl_inputs,
         [projector(10), SiteStage("projector", "cls_attn", dict(keep=10), dict(keep=1.0)), llm("dart", 10),
          llm("fastv", 10), llm_pyramid(), decode_site(), llm_transprune()], lm_head,
         notes="no vision(L) site: pixel_shuffle folds the tower's whole patch grid"),
    Case("llava_onevision", "llava_onevision", "llava_onevision", True, tiny_llava_onevision, ONEVISION_ROWS,
         onevision_inputs, [projector(10), SiteStage("projector", "cls_attn", dict(keep=10), dict(keep=1.0)),
                            llm("dart", 10), llm("fastv", 10), llm_pyramid(), decode_site(), llm_transprune()], lm_head,
         notes="no vision(L) site: AnyRes-max packing and video pooling need every view's full grid"),
    Case("qwen2_vl", "qwen2_vl", "qwen2_vl", True, functools.partial(tiny_qwen, "2"), QWEN_ROWS, qwen_inputs,
         [projector(3), llm("dart", 3), llm("fastv", 3), llm_pyramid(), decode_site(), llm_transprune(),
          llm("sparsevlm", 3), llm("mustdrop_filter", 3),
          vision_cls_attn(3), vision_pixel_shuffle(), *front(3), vscan(1)], lm_head),
    Case("qwen2_5_vl", "qwen2_vl", "qwen2_5_vl", True, functools.partial(tiny_qwen, "2.5"), QWEN_ROWS, qwen_inputs,
         [projector(3), llm("dart", 3), llm("fastv", 3), llm_pyramid(), decode_site(), llm_transprune(),
          vision_cls_attn(3), vision_pixel_shuffle(),
          SiteStage("vision(0)", "kcenter", dict(keep=3, site="vision(0)"), dict(keep=1.0, site="vision(0)")),
          *front(3), vscan(1)],
         lm_head, notes="vision(L) keeps the window partition: vision(1) follows a full-attention block, "
         "vision(0) a window block"),
    Case("qwen3_vl", "qwen3_vl", "qwen3_vl", True, functools.partial(tiny_qwen3_vl, False), QWEN_ROWS, qwen_inputs,
         [projector(3), llm("dart", 3), llm("fastv", 3), QWEN3_VL_INSIDE_DEEPSTACK, llm_pyramid(), decode_site(),
          llm_transprune(), llm("sparsevlm", 3)], lm_head, notes=QWEN3_VL_NOTES),
    Case("qwen3_vl_moe", "qwen3_vl", "qwen3_vl_moe", True, functools.partial(tiny_qwen3_vl, True), QWEN_ROWS,
         qwen_inputs, [projector(3), llm("dart", 3), llm("fastv", 3), QWEN3_VL_INSIDE_DEEPSTACK, llm_pyramid(),
                       decode_site(), llm_transprune()], lm_head, notes=QWEN3_VL_NOTES),
    Case("qwen3_5", "qwen3_5", "qwen3_5", True, functools.partial(tiny_qwen3_5, False), QWEN_ROWS, qwen_inputs,
         QWEN3_5_STAGES, lm_head, notes=QWEN3_5_NOTES),
    Case("qwen3_5_moe", "qwen3_5", "qwen3_5_moe", True, functools.partial(tiny_qwen3_5, True), QWEN_ROWS,
         qwen_inputs, QWEN3_5_STAGES, lm_head, notes=QWEN3_5_NOTES),
    Case("timm_vit", "timm_vit", "timm.VisionTransformer", False, contract_timm, VIT_ROWS, vit_inputs,
         [vision_cls_attn(4), vision_pixel_shuffle()], lambda m: m.blocks[-1].mlp.fc2.weight, run=timm_run,
         sides=("none",)),
    Case("open_clip_vit", "open_clip_vit", "open_clip.VisionTransformer", False, contract_open_clip_vit, VIT_ROWS,
         vit_inputs, [vision_cls_attn(4), vision_pixel_shuffle()],
         lambda m: m.transformer.resblocks[-1].mlp.c_proj.weight, run=open_clip_vit_run, sides=("none",)),
    Case("open_clip_clip", "open_clip_vit", "open_clip.CLIP", False, contract_open_clip_clip, VIT_ROWS, vit_inputs,
         [vision_cls_attn(4), vision_pixel_shuffle()],
         lambda m: m.visual.transformer.resblocks[-1].mlp.c_proj.weight, run=open_clip_clip_run, sides=("none",)),
]
#: two images of different sizes in one prompt, a 2-frame video (timestamps between its frames), an image and
#: a video together; each row's prompt length differs
QWEN3_MULTI_ROWS = [
    [20, ("image", 4, 4, 51), 30, ("image", 8, 4, 52), 31],
    [21, 22, ("video", 2, 4, 4, 53), 32],
    [23, ("image", 4, 8, 54), ("video", 2, 4, 4, 55), 33, 34],
]
#: the Qwen3 families with several images and videos per prompt. Not in CASES: test_contract.py's labels
#: clause lays the labels out for one image per row; tests/test_qwen3_vl.py runs every other clause on
#: these and a labels clause that follows each kept visual run.
MULTI_VISUAL_CASES: list[Case] = [
    Case(f"{case.name}_multi", case.integration, case.model_type, True, case.build_model, QWEN3_MULTI_ROWS,
         qwen3_inputs, case.stages, lm_head, notes=f"{case.notes}; two images per prompt and videos")
    for case in CASES if case.integration in ("qwen3_vl", "qwen3_5")
]
for _case in CASES + MULTI_VISUAL_CASES:
    if _case.run is None:
        _case.run = vlm_logits
CASES_BY_NAME = {case.name: case for case in CASES + MULTI_VISUAL_CASES}
#: LLaVA-OneVision on rows with several images, videos, an image and a video; tests/test_llava_onevision.py
#: runs every clause of test_contract.py on it, labels with a reference that follows each block's kept slots
ONEVISION_MULTI_CASES: list[Case] = [
    Case("llava_onevision_multi", "llava_onevision", "llava_onevision", True, tiny_llava_onevision,
         ONEVISION_MULTI_ROWS, onevision_inputs, CASES_BY_NAME["llava_onevision"].stages, lm_head, run=vlm_logits,
         notes="several images per prompt (base views) and 2-frame videos")
]
CASES_BY_NAME.update({case.name: case for case in ONEVISION_MULTI_CASES})
#: InternVL on rows with two images of different tile counts and videos (frames as one-tile images);
#: tests/test_internvl.py runs every clause of test_contract.py on it (labels as for LLaVA-OneVision's)
INTERNVL_MULTI_CASES: list[Case] = [
    Case("internvl_multi", "internvl", "internvl", True, tiny_internvl, INTERNVL_MULTI_ROWS, internvl_inputs,
         CASES_BY_NAME["internvl"].stages, lm_head, run=vlm_logits,
         notes="several images per prompt and videos as frames")
]
CASES_BY_NAME.update({case.name: case for case in INTERNVL_MULTI_CASES})


# --- Qwen2-VL / Qwen2.5-VL video: temporal stages (dycoke, holitom) on clips ----------------------------
def qwen2_video_inputs(model, rows: list, side: str) -> dict:
    """Rows of text ids and ("video", t, h, w, seed, repeat) clips (sizes in patches), each clip one
    <vision_start> run as Qwen2-VL's processor writes it; ``repeat``: each temporal patch's pixels are
    repeated that many times in a row (plus a little noise), so the temporal stages find frames alike."""
    sequences, kinds, grids, pixels = [], [], [], []
    for row in rows:
        ids, types = [BOS], [0]
        for item in row:
            if isinstance(item, int):
                ids.append(item)
                types.append(0)
                continue
            _, t, h, w, seed, repeat = item
            frames = _pixels(seed, -(-t // repeat), h * w, 3 * 2 * Q_PATCH * Q_PATCH)
            clip = frames.repeat_interleave(repeat, dim=0)[:t]
            if repeat > 1:  # alike, not equal: equal frames tie every similarity, up to rounding
                clip = clip + 0.05 * _pixels(seed + 1, *clip.shape)
            pixels.append(clip.flatten(0, 1))
            grids.append([t, h, w])
            ids += [Q_START] + [Q_VIDEO] * (t * h * w // 4) + [Q_END]
            types += [0] + [2] * (t * h * w // 4) + [0]
        sequences.append(ids)
        kinds.append(types)
    batch = _pad(sequences, side)
    types = torch.zeros_like(batch["input_ids"], dtype=torch.int)
    width = types.shape[1]
    for row, row_kinds in enumerate(kinds):
        span = slice(width - len(row_kinds), width) if side == "left" else slice(0, len(row_kinds))
        types[row, span] = torch.tensor(row_kinds, dtype=torch.int)
    batch.update(mm_token_type_ids=types, pixel_values_videos=torch.cat(pixels), video_grid_thw=torch.tensor(grids))
    return batch


#: a clip of 4 frames (2 x 4 tokens each, frames 0-1 and 2-3 alike), one of 6 frames (each of 3 shown
#: twice), and a 4-frame clip of 4 different frames; prompt lengths differ
QWEN2_VIDEO_ROWS = [[20, ("video", 4, 4, 8, 71, 2), 30, 31], [21, 22, ("video", 6, 4, 8, 72, 2), 32],
                    [23, ("video", 4, 4, 8, 73, 1), 33, 34, 35]]
#: the temporal stages at the projector; 12 tokens per clip (a 4-frame clip has 32, a 6-frame one 48)
VIDEO_STAGES = [SiteStage("projector", method, dict(keep=12), dict(keep=1.0)) for method in ("dycoke", "holitom")]
#: Qwen2-VL and Qwen2.5-VL on clips. Not in CASES: their stages need clips, and test_contract.py's labels
#: clause lays the labels out for image rows; tests/test_video_stages.py runs every other clause on these.
QWEN2_VIDEO_CASES: list[Case] = [
    Case(f"{case.name}_video", case.integration, case.model_type, True, case.build_model, QWEN2_VIDEO_ROWS,
         qwen2_video_inputs, VIDEO_STAGES, lm_head, run=vlm_logits, notes="video clips with repeated frames")
    for case in CASES if case.integration == "qwen2_vl"
]
CASES_BY_NAME.update({case.name: case for case in QWEN2_VIDEO_CASES})
#: LLaVA-OneVision on clips of 4 frames (3 x 3 pooled tokens each, 36 per clip + its newline), prompt lengths
#: differ; tests/test_onevision_video.py runs the clauses test_video_stages.py runs on the Qwen clips
ONEVISION_VIDEO_CASES: list[Case] = [
    Case("llava_onevision_video", "llava_onevision", "llava_onevision", True, tiny_llava_onevision,
         [[20, ("video", 4, 81), 30, 31], [21, 22, ("video", 4, 82), 32], [23, ("video", 4, 83), 33, 34, 35]],
         onevision_inputs, VIDEO_STAGES, lm_head, run=vlm_logits, notes="4-frame video clips")
]
CASES_BY_NAME.update({case.name: case for case in ONEVISION_VIDEO_CASES})


def case_stages(vlm: bool | None = None) -> list:
    """``(case, stage)`` pairs for pytest parametrisation, with ids ``case-site:method``."""
    import pytest

    return [pytest.param(case, stage, id=f"{case.name}-{stage.id}")
            for case in CASES if vlm is None or case.vlm == vlm for stage in case.stages]
