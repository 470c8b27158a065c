"""InternVL: tiles + thumbnail, units after the 0.5 pixel shuffle, [CLS] scores grouped 2x2, several images,
video frames."""

from __future__ import annotations

import pytest
import torch

import vtoken
from integrations_helpers import lm_image_tokens
from tiny_models import IVL_TILE, IVL_TOKENS, tiny_internvl

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "InternVLForConditionalGeneration"):
    pytest.skip("InternVL needs a transformers with InternVLForConditionalGeneration", allow_module_level=True)

import test_contract as contract  # noqa: E402
from contract_models import INTERNVL_MULTI_CASES, internvl_inputs  # noqa: E402

PATCH_SIDE = IVL_TILE // 14  # 8 x 8 patches a tile, 4 x 4 tokens after the shuffle
MODES = ["global", "tile", "guided"]


def rows_of(*tiles):
    return [[20 + i, ("image", count, 90 + i), 30] for i, count in enumerate(tiles)]


def test_cls_attn_scores_each_token_by_its_2x2_patches_cls_attention():
    """Per tile, the [CLS] row of the eager attention map in the feature block, [CLS] column dropped, each
    token scored by the mean over its 2 x 2 block of patches; keep=5 on a one-tile image keeps the top 5."""
    model = tiny_internvl("eager")
    inputs = internvl_inputs(model, [[20, ("image", 1, 7), 30]], "left")
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
        row = out.attentions[-1][0].float().mean(0)[0, 1:].view(PATCH_SIDE, PATCH_SIDE)  # heads averaged
        blocks = row.view(PATCH_SIDE // 2, 2, PATCH_SIDE // 2, 2).mean(dim=(1, 3)).flatten()
        with vtoken.wrapped(model, "cls_attn", keep=5):
            model(**inputs)
            kept = model.vtoken.stats.kept["projector"][0]
    assert torch.equal(kept, blocks.topk(5).indices.sort().values)


def test_pixel_shuffle_grouping_is_2x2_blocks():
    """The model's pixel_shuffle puts patches (2i + a, 2j + b) into token (i, j): the grouping the scores use."""
    model = tiny_internvl()
    patches = torch.arange(PATCH_SIDE * PATCH_SIDE, dtype=torch.float32).view(1, PATCH_SIDE, PATCH_SIDE, 1)
    shuffled = model.model.pixel_shuffle(patches, scale_factor=0.5).reshape(-1, 4)
    for token, members in enumerate(shuffled.tolist()):
        i, j = divmod(token, PATCH_SIDE // 2)
        expected = {(2 * i + a) * PATCH_SIDE + 2 * j + b for a in (0, 1) for b in (0, 1)}
        assert set(int(m) for m in members) == expected, f"token {token}"


@pytest.mark.parametrize("mode", MODES)
def test_keep_all_matches_unwrapped_logits(mode):
    model = tiny_internvl()
    inputs = internvl_inputs(model, rows_of(3, 1), "left")
    with torch.no_grad():
        expected = model(**inputs).logits
        with vtoken.wrapped(model, "cls_attn+kcenter", keep=1.0, tile_budget=mode):
            got = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_int_keep_is_exact_per_image(mode):
    """keep=10: the language model receives exactly 10 visual tokens per image, whatever its tile count; with
    tile_budget='tile' the tiles share them equally (3 tiles: 4, 3, 3) and each keeps tokens of its own tile."""
    model = tiny_internvl()
    rows = [[20, ("image", 3, 1), 30, ("image", 1, 2), 31]]
    inputs = internvl_inputs(model, rows, "left")
    with vtoken.wrapped(model, "cls_attn", keep=10, tile_budget=mode), torch.no_grad():
        received = lm_image_tokens(model, inputs)[0]
        kept = model.vtoken.stats.kept["projector"]
    assert received == 20
    if mode == "global":
        assert [k.numel() for k in kept] == [10, 10]
    elif mode == "tile":
        assert [k.numel() for k in kept] == [4, 3, 3, 10]
    else:  # two crops share what the thumbnail (10 / 3 -> 3 or 4) leaves, by its scores over their halves
        assert len(kept) == 4 and sum(k.numel() for k in kept[:3]) == 10 and kept[3].numel() == 10
        assert kept[2].numel() in (3, 4)
        for tile, slots in enumerate(kept[:3]):
            assert ((slots >= tile * IVL_TOKENS) & (slots < (tile + 1) * IVL_TOKENS)).all()


def scene(height: int, width: int):
    """A smooth picture (gradients and a few discs), as the crop-grid matching expects of real images."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin(x / 9.0) * np.cos(y / 7.0)], -1)
    for cy, cx, r in ((0.3, 0.2, 0.15), (0.7, 0.8, 0.2), (0.5, 0.5, 0.1)):
        disc = (y - cy * height) ** 2 + (x - cx * width) ** 2 < (r * min(height, width)) ** 2
        picture[disc] = (240, 30, 30)
    return Image.fromarray(picture.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("height,width,expected", [(120, 230, (1, 2)), (230, 120, (2, 1)), (120, 340, (1, 3)),
                                                   (230, 230, (2, 2))])
def test_crop_grid_recovers_the_processors_layout(height, width, expected):
    """The processor's crops (row by row) and thumbnail, from its own resizing: crop_grid finds its rows x cols."""
    from tiny_processors import tiny_internvl_processor
    from vtoken.integrations.internvl import crop_grid

    processor = tiny_internvl_processor()
    pixels = processor.image_processor(images=[scene(height, width)], return_tensors="pt")["pixel_values"]
    assert pixels.shape[0] == expected[0] * expected[1] + 1
    assert crop_grid(pixels[:-1], pixels[-1]) == expected


def test_guided_budget_follows_the_thumbnail_scores():
    """With the thumbnail's scores all on its right half, the right crop of a 1 x 2 layout gets the crops' share."""
    model = tiny_internvl()
    with vtoken.wrapped(model, "kcenter", keep=12, tile_budget="guided"):
        family = model.vtoken.integration
        side = PATCH_SIDE // 2
        thumbnail = torch.zeros(side, side)
        thumbnail[:, side // 2:] = 1.0
        assert family._guided_budgets(thumbnail, (1, 2), IVL_TOKENS) == [0, 8, 4]
        thumbnail[:, : side // 2] = 1.0  # even scores: the crops split evenly
        assert family._guided_budgets(thumbnail, (1, 2), IVL_TOKENS) == [4, 4, 4]


def test_tile_budget_fraction_applies_per_tile():
    model = tiny_internvl()
    inputs = internvl_inputs(model, rows_of(3), "left")
    with vtoken.wrapped(model, "kcenter", keep=0.25, tile_budget="tile"), torch.no_grad():
        model(**inputs)
        kept = model.vtoken.stats.kept["projector"]
    assert [k.numel() for k in kept] == [IVL_TOKENS // 4] * 3


def test_vision_site_and_bad_options_are_refused():
    model = tiny_internvl()
    with pytest.raises(ValueError, match="no vision site .*pixel_shuffle"):
        vtoken.wrap(model, "cls_attn", keep=4, site="vision(1)")
    with pytest.raises(ValueError, match="tile_budget='view'; accepted: global, tile, guided"):
        vtoken.wrap(model, "kcenter", keep=4, tile_budget="view")
    assert not model._forward_pre_hooks


def test_placeholders_that_do_not_fit_the_tiles_are_named():
    model = tiny_internvl()
    inputs = internvl_inputs(model, rows_of(2), "left")
    inputs["pixel_values"] = inputs["pixel_values"][:1]
    with vtoken.wrapped(model, "kcenter", keep=4), pytest.raises(ValueError, match="placeholder runs"):
        model(**inputs)


# --- several images and videos through the contract clauses ---------------------------------------------
MULTI_STAGES = [pytest.param(case, stage, id=f"{case.name}-{stage.id}") for case in INTERNVL_MULTI_CASES
                for stage in case.stages]


@pytest.mark.parametrize("case,stage", MULTI_STAGES)
def test_multi_visual_contract(case, stage):
    contract.run_clauses_without_labels(case, stage)


# --- a processor saved and reloaded ----------------------------------------------------------------------
@pytest.mark.parametrize("visual", ["image", "video"])
def test_processor_from_disk_drives_generate_with_pruning(tmp_path, visual):
    """InternVL's processor (tiles + thumbnail; a video as FrameN: <img>...</img> frames), saved and reloaded,
    drives generate(): keep=1.0 equals the unwrapped model, keep=6 keeps 6 tokens per image (per frame)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from tiny_processors import LLAVA_CHAT_TEMPLATE, save_tiny_checkpoint, tiny_internvl_processor

    model = tiny_internvl()
    folder = save_tiny_checkpoint(model, tiny_internvl_processor(), tmp_path / "internvl", LLAVA_CHAT_TEMPLATE)
    processor = AutoProcessor.from_pretrained(folder)
    model = type(model).from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None
    rng = np.random.RandomState(0)
    if visual == "image":
        image = Image.fromarray(rng.randint(0, 255, (120, 230, 3), dtype=np.uint8))
        inputs = processor(images=[image], text="what is in the <image> image", return_tensors="pt")
        assert inputs["pixel_values"].shape[0] == 3, "two crops and the thumbnail"
        images = 1
    else:
        video = rng.randint(0, 255, (3, 90, 90, 3), dtype=np.uint8)
        inputs = processor(videos=[video], text="<|video_pad|> what is red", return_tensors="pt")
        images = 3  # one per frame
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vtoken.wrapped(model, "cls_attn", keep=1.0):
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), expected)
    with vtoken.wrapped(model, "cls_attn", keep=6):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        kept = model.vtoken.stats.kept["projector"]
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert [k.numel() for k in kept] == [6] * images


# --- the bench ---------------------------------------------------------------------------------------------
def test_bench_inputs_counts_and_dims():
    from vtoken.integrations.base import Integration

    model = tiny_internvl()
    family = Integration.for_model(model)
    inputs = family.synthetic_inputs(8, 2, 0, "cpu", torch.float32, visual_tokens=3 * IVL_TOKENS)
    counts = family.visual_counts(inputs)
    assert (counts.images, counts.patches, counts.tokens) == (1, 3 * PATCH_SIDE ** 2, 3 * IVL_TOKENS)
    assert inputs["pixel_values"].shape[0] == 2 * 3 and inputs["input_ids"].shape[1] == 8 + 3 * IVL_TOKENS
    assert tuple(family.run_vision(inputs).shape[:2]) == (6, IVL_TOKENS)
    dims = family.model_dims()
    assert (dims.vision.prefix, dims.projector.group, dims.projector.in_dim) == (1, 4, 32)
    with pytest.raises(ValueError, match=f"accepted: a positive multiple of {IVL_TOKENS}"):
        family.synthetic_inputs(8, 1, 0, "cpu", torch.float32, visual_tokens=IVL_TOKENS + 1)


def test_bench_runs_an_internvl_model():
    from vtoken.eval import bench

    result = bench.run_bench(tiny_internvl(), methods=["cls_attn"], budgets=[4], runs=1, warmup=0, decode_tokens=1,
                             text_tokens=8, out=None, progress=False)
    assert result["model_type"] == "internvl" and result["visual_tokens_per_image"] == IVL_TOKENS
    base, pruned = result["rows"]
    assert (base["visual_tokens"], pruned["visual_tokens"]) == (IVL_TOKENS, 4)
    assert pruned["gflops_llm"] < base["gflops_llm"]


def test_internvl3_8b_architecture_has_the_published_widths():
    from transformers import AutoModelForImageTextToText

    from vtoken.eval.archs import arch_config

    config = arch_config("internvl3-8b")
    text, vision = config.text_config, config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, text.hidden_size, text.num_hidden_layers) == (
        1024, 24, 3584, 28)
    assert (text.vocab_size, config.image_token_id, config.downsample_ratio) == (151674, 151667, 0.5)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 7.94  # InternVL3-8B's count
    scaled = arch_config("internvl3-8b", 1 / 8)
    assert (scaled.vision_config.num_hidden_layers, scaled.text_config.num_hidden_layers) == (3, 4)


# --- lmms-eval ---------------------------------------------------------------------------------------------
def test_lmms_eval_plugin_evaluates_a_tiny_internvl_checkpoint(tmp_path, monkeypatch):
    """lmms-eval's own simple_evaluate runs vtoken_internvl (a chat model: lmms-eval builds the messages from
    the task; declared as an entry point in pyproject.toml, registered here when the installed metadata
    predates it) on a tiny checkpoint, and the model it evaluated was wrapped and pruned (lmms-eval's loop
    logs a failed generate() and goes on, so this is checked)."""
    pytest.importorskip("lmms_eval")
    pytest.importorskip("datasets")
    from pathlib import Path

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    from tiny_processors import LLAVA_CHAT_TEMPLATE, save_tiny_checkpoint, tiny_internvl_processor
    from vtoken.eval import lmms_task
    from vtoken.integrations import lmms_eval_plugin

    project = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    entry = 'vtoken_internvl = "vtoken.integrations.lmms_eval_plugin:internvl_manifest"'
    assert entry in project.split('[project.entry-points."lmms_eval.models"]')[1].split("\n[")[0]
    if "vtoken_internvl" not in MODEL_REGISTRY_V2.list_model_names():
        MODEL_REGISTRY_V2.register_manifest(lmms_eval_plugin.internvl_manifest())
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = save_tiny_checkpoint(tiny_internvl(), tiny_internvl_processor(), tmp_path / "internvl",
                                  LLAVA_CHAT_TEMPLATE)
    task_dir = lmms_task.export_task(tmp_path / "task", n_questions=2)
    seen = []
    original = lmms_eval_plugin._wrap

    def wrap_and_remember(model, options):
        original(model, options)
        seen.append(model)

    monkeypatch.setattr(lmms_eval_plugin, "_wrap", wrap_and_remember)
    out = simple_evaluate(model="vtoken_internvl",
                          model_args=f"pretrained={folder},method=cls_attn,keep=8,max_patches=4",
                          tasks=["vtoken_scenes"], task_manager=TaskManager(include_path=str(task_dir)),
                          batch_size=1, device="cpu", limit=2, gen_kwargs="max_new_tokens=2")
    assert out["n-samples"]["vtoken_scenes"]["effective"] == 2
    assert 0.0 <= out["results"]["vtoken_scenes"]["accuracy,none"] <= 1.0
    (model,) = seen
    assert [k.numel() for k in model.vtoken.stats.kept["projector"]] == [8], "the last question's image kept 8"


def test_keep_64_gives_64_visual_tokens_per_image():
    """keep=64 on images of 5 and 7 tiles (80 and 112 tokens): the language model receives 64 of each."""
    model = tiny_internvl()
    inputs = internvl_inputs(model, [[20, ("image", 5, 3), 30, ("image", 7, 4), 31]], "left")
    for mode in MODES:
        with vtoken.wrapped(model, "cls_attn", keep=64, tile_budget=mode), torch.no_grad():
            assert lm_image_tokens(model, inputs) == [128], mode


# --- labels with several images per row --------------------------------------------------------------------
def internvl_blocks(model, batch: dict, rows: list, records: dict) -> list:
    """Per image in placeholder order: (token id, size, slots kept at the projector); no structural slots."""
    from tiny_models import IMAGE_TOKEN

    selected = iter(records.get("projector") or [])
    blocks = []
    for row in rows:
        for item in row:
            if isinstance(item, tuple):
                size = item[1] * IVL_TOKENS
                slots = set(range(size)) if "projector" not in records else set(next(selected).tolist())
                blocks.append((IMAGE_TOKEN, size, slots))
    return blocks


@pytest.mark.parametrize("case,stage", MULTI_STAGES)
def test_multi_visual_labels_give_the_loss_of_the_returned_logits(case, stage):
    from test_llava_onevision import check_multi_labels
    from tiny_models import IMAGE_TOKEN

    check_multi_labels(case, stage, internvl_blocks, [IMAGE_TOKEN])
