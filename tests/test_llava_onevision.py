"""LLaVA-OneVision: SigLIP without [CLS] (received-attention score), AnyRes-max, several images, video."""

from __future__ import annotations

import pytest
import torch

import vtoken
from integrations_helpers import lm_image_tokens, lm_inputs
from tiny_models import BOS, IMAGE_TOKEN, OV_SIDE, OV_VIDEO, llava_batch_ids, tiny_llava_onevision

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LlavaOnevisionForConditionalGeneration"):
    pytest.skip("LLaVA-OneVision needs a transformers with LlavaOnevisionForConditionalGeneration",
                allow_module_level=True)

from contract_models import ONEVISION_MULTI_CASES, onevision_inputs  # noqa: E402

MODES = ["global", "view", "guided"]
BIG = (160, 170)  # 2x2 crops: a 12 x 12 canvas, shrunk by AnyRes-max to 8 x 8 (+ 8 newlines)
WIDE = (60, 110)  # 1x2 crops, unpadded, not shrunk
SIDE2 = OV_SIDE * OV_SIDE
POOLED = (-(-OV_SIDE // 2)) ** 2  # tokens per pooled video frame


def siglip_layers(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def image_rows(*sizes):
    return [[20 + i, ("image", size, 70 + i), 30] for i, size in enumerate(sizes)]


def batch(model, rows, side="left"):
    return onevision_inputs(model, rows, side)


def packed_image(model, inputs, image):
    """The model's own packed features of one image, with the positions of its newline tokens."""
    with torch.no_grad():
        packed = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            batch_num_images=inputs.get("batch_num_images")).pooler_output[image]
    newline = model.model.image_newline.detach()
    return packed, (packed == newline).all(-1).nonzero()[:, 0].tolist()


# --- the received-attention score ------------------------------------------------------------------------
def test_received_attention_equals_the_eager_attention_maps_column_means():
    """cls_attn on a tower without [CLS]: per patch, the mean over heads and queries of the attention map
    the eager SigLIP layer itself returns."""
    from vtoken.integrations.projector_signals import clip_received_attention as received_attention

    model = tiny_llava_onevision("eager")
    pixels = torch.randn(3, 3, OV_SIDE * 14, OV_SIDE * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        for index, layer in enumerate(siglip_layers(model)):
            got = received_attention(layer, out.hidden_states[index])
            expected = out.attentions[index].float().mean(dim=(1, 2))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def test_cls_attn_keeps_the_patches_that_receive_most_attention():
    """keep=10 with cls_attn on one base view: the 10 patches with the highest received attention in the
    feature layer's block (its input captured from the tower's hidden states), in order."""
    from vtoken.integrations.projector_signals import clip_received_attention as received_attention

    model = tiny_llava_onevision()
    rows = [[20, ("image", (60, 110), 71), 30, ("image", (84, 84), 72), 31]]  # two images: base views only
    inputs = batch(model, rows)
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"][:, 0], output_hidden_states=True).hidden_states
        scores = received_attention(siglip_layers(model)[-1], hidden[-2])
        with vtoken.wrapped(model, "cls_attn", keep=10):
            model(**inputs)
            kept = model.vtoken.stats.kept["projector"]
    for image, slots in enumerate(kept):
        expected = scores[image].topk(10).indices.sort().values
        assert torch.equal(slots, expected), f"image {image}: kept {slots.tolist()}, expected {expected.tolist()}"


# --- images ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_keep_all_matches_unwrapped_logits(mode):
    model = tiny_llava_onevision()
    inputs = batch(model, image_rows(WIDE, BIG))
    with torch.no_grad():
        expected = model(**inputs).logits
        with vtoken.wrapped(model, "cls_attn+kcenter", keep=1.0, anyres_budget=mode):
            got = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_keep_64_gives_64_visual_tokens_plus_the_newlines_of_kept_rows(mode):
    """The LM receives exactly 64 visual tokens of the image, plus the newline of every canvas row that
    keeps a token (the base view, first, has none when crops follow)."""
    model = tiny_llava_onevision()
    inputs = batch(model, image_rows(BIG))
    packed, newlines = packed_image(model, inputs, 0)
    with vtoken.wrapped(model, "cls_attn", keep=64, anyres_budget=mode), torch.no_grad():
        received = lm_image_tokens(model, inputs)[0]
        kept = torch.cat(model.vtoken.stats.kept["projector"])
    assert kept.numel() == 64 and len(set(kept.tolist())) == 64 and not set(kept.tolist()) & set(newlines)
    starts = [SIDE2] + [n + 1 for n in newlines[:-1]]
    kept_rows = sum(bool(((kept >= lo) & (kept < hi)).any()) for lo, hi in zip(starts, newlines))
    assert received == 64 + kept_rows, f"{received} image positions, expected 64 + {kept_rows} newlines"


def test_view_budgets_follow_the_models_crops():
    """'view' mode on an image AnyRes-max does not shrink: each unit is one view, and the view of every slot
    is the one the model's packing takes it from (packing view-tagged features through the model)."""
    model = tiny_llava_onevision()
    inputs = batch(model, image_rows(WIDE))
    views = inputs["pixel_values"].shape[1]
    tagged = [torch.arange(3, dtype=torch.float64).repeat_interleave(SIDE2).view(3, SIDE2, 1)[:views]]
    truth, _ = model.model.pack_image_features(tagged, inputs["image_sizes"],
                                               image_newline=torch.tensor([-1.0], dtype=torch.float64),
                                               vision_aspect_ratio=model.config.vision_aspect_ratio)
    truth = truth[0][:, 0]
    with vtoken.wrapped(model, "kcenter", keep=1.0, anyres_budget="view"), torch.no_grad():
        model(**inputs)
        kept = model.vtoken.stats.kept["projector"]
    assert len(kept) == 3
    for view, slots in enumerate(kept):
        assert (truth[slots] == view).all(), f"unit {view} holds slots of views {truth[slots].unique().tolist()}"
    assert sum(k.numel() for k in kept) == int((truth >= 0).sum())


def test_guided_budget_favours_the_crop_the_base_view_finds_important():
    """guided: crops share the rest of the budget in proportion to the base view's score mass over their
    region; raising the scores over one crop's region raises its share."""
    from vtoken.integrations.llava_next import _crop_importance

    layout = torch.tensor([0] * SIDE2 + [SIDE2, 2 * SIDE2, -1])  # base, crops 1 and 2 (1 x 2 canvas)
    base = torch.ones(OV_SIDE, OV_SIDE)
    base[:, OV_SIDE // 2:] = 5.0  # the right half matters
    crops = [torch.tensor([SIDE2]), torch.tensor([SIDE2 + 1])]
    left, right = _crop_importance(base, layout, crops, OV_SIDE, canvas=(1, 2))
    assert right == 5 * left


def test_several_images_each_keep_their_budget_and_newline():
    model = tiny_llava_onevision()
    rows = [[20, ("image", WIDE, 71), 30, ("image", BIG, 72), 31]]
    inputs = batch(model, rows)
    assert inputs["batch_num_images"].tolist() == [2]
    with torch.no_grad():
        expected = model(**inputs).logits
        with vtoken.wrapped(model, "cls_attn", keep=1.0):
            torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)
        with vtoken.wrapped(model, "cls_attn", keep=20):
            received = lm_image_tokens(model, inputs)[0]
            kept = model.vtoken.stats.kept["projector"]
    assert [k.numel() for k in kept] == [20, 20]
    assert received == 2 * (20 + 1), "each image: 20 tokens and its newline"


# --- video -------------------------------------------------------------------------------------------------
def video_batch(frames=3, seed=5):
    pixels = torch.randn(1, frames, 3, OV_SIDE * 14, OV_SIDE * 14, generator=torch.Generator().manual_seed(seed))
    inputs = llava_batch_ids([[BOS, 20] + [OV_VIDEO] * (frames * POOLED + 1) + [30, 31]])
    inputs["pixel_values_videos"] = pixels
    return inputs


def video_lm_tokens(model, inputs):
    """How many video positions (placeholders) the language model received."""
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    text = ((inputs["input_ids"] != OV_VIDEO) & inputs["attention_mask"].bool()).sum(1)
    return int(seen[0]["attention_mask"].sum(1)[0] - text[0])


@pytest.mark.parametrize("video_budget,keep,expected", [("clip", 10, [10]), ("frame", 4, [4, 4, 4])])
def test_video_budget_per_clip_or_frame(video_budget, keep, expected):
    model = tiny_llava_onevision()
    inputs = video_batch()
    with torch.no_grad():
        reference = model(**inputs).logits
        with vtoken.wrapped(model, "cls_attn", keep=1.0, video_budget=video_budget):
            torch.testing.assert_close(model(**inputs).logits, reference, atol=1e-5, rtol=0)
        with vtoken.wrapped(model, "cls_attn", keep=keep, video_budget=video_budget):
            received = video_lm_tokens(model, inputs)
            kept = model.vtoken.stats.kept["projector"]
    assert [k.numel() for k in kept] == expected
    assert received == sum(expected) + 1, "the clip's final newline stays"
    if video_budget == "frame":  # each frame's unit covers that frame's pooled grid only
        for frame, slots in enumerate(kept):
            assert ((slots >= frame * POOLED) & (slots < (frame + 1) * POOLED)).all()


def test_video_scores_are_pooled_like_the_features():
    """Per frame: received attention in the feature block, pooled by the model's own apply_pooling; the
    clip keeps the top tokens of those pooled scores."""
    from vtoken.integrations.projector_signals import clip_received_attention as received_attention

    model = tiny_llava_onevision()
    inputs = video_batch(frames=2)
    frames = inputs["pixel_values_videos"][0]
    with torch.no_grad():
        hidden = model.model.vision_tower(frames, output_hidden_states=True).hidden_states
        scores = received_attention(siglip_layers(model)[-1], hidden[-2])
        pooled = torch.nn.functional.interpolate(scores.view(2, 1, OV_SIDE, OV_SIDE), size=[3, 3], mode="bilinear")
        with vtoken.wrapped(model, "cls_attn", keep=5):
            model(**inputs)
            kept = model.vtoken.stats.kept["projector"][0]
    assert torch.equal(kept, pooled.flatten().topk(5).indices.sort().values)


# --- refusals --------------------------------------------------------------------------------------------
def test_vision_site_is_refused_with_the_reason():
    model = tiny_llava_onevision()
    with pytest.raises(ValueError, match="no vision site .*AnyRes-max packing"):
        vtoken.wrap(model, "cls_attn", keep=4, site="vision(1)")


@pytest.mark.parametrize("option,value", [("video_budget", "scene"), ("anyres_budget", "crop")])
def test_bad_budget_options_name_the_accepted_values(option, value):
    model = tiny_llava_onevision()
    with pytest.raises(ValueError, match="accepted"):
        vtoken.wrap(model, "kcenter", keep=4, **{option: value})
    assert not model._forward_pre_hooks


def test_default_feature_strategy_is_refused():
    model = tiny_llava_onevision()
    inputs = batch(model, image_rows(WIDE))
    with vtoken.wrapped(model, "kcenter", keep=4), pytest.raises(ValueError, match="'full'"):
        model(**inputs, vision_feature_select_strategy="default")


# --- several images and videos through the contract clauses ---------------------------------------------
import test_contract as contract  # noqa: E402

MULTI_STAGES = [pytest.param(case, stage, id=f"{case.name}-{stage.id}") for case in ONEVISION_MULTI_CASES
                for stage in case.stages]


@pytest.mark.parametrize("case,stage", MULTI_STAGES)
def test_multi_visual_contract(case, stage):
    contract.run_clauses_without_labels(case, stage)


# --- a processor saved and reloaded ----------------------------------------------------------------------
@pytest.mark.parametrize("visual", ["image", "video"])
def test_processor_from_disk_drives_generate_with_pruning(tmp_path, visual):
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from tiny_processors import LLAVA_CHAT_TEMPLATE, save_tiny_checkpoint, tiny_llava_onevision_processor

    model = tiny_llava_onevision()
    folder = save_tiny_checkpoint(model, tiny_llava_onevision_processor(), tmp_path / "ov", LLAVA_CHAT_TEMPLATE)
    processor = AutoProcessor.from_pretrained(folder)
    model = type(model).from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None
    rng = np.random.RandomState(0)
    if visual == "image":
        image = Image.fromarray(rng.randint(0, 255, (170, 160, 3), dtype=np.uint8))
        inputs = processor(images=image, text="what is in the <image> image", return_tensors="pt")
        token, keep = IMAGE_TOKEN, 40
    else:
        video = rng.randint(0, 255, (3, 90, 90, 3), dtype=np.uint8)
        inputs = processor(videos=[video], text="<|video_pad|> what is red", return_tensors="pt")
        token, keep = OV_VIDEO, 12
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vtoken.wrapped(model, "cls_attn", keep=1.0):
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), expected)
    with vtoken.wrapped(model, "cls_attn", keep=keep):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        kept = model.vtoken.stats.kept["projector"]
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert sum(k.numel() for k in kept) == keep
    assert int((inputs["input_ids"] == token).sum()) > keep


# --- the bench: synthetic inputs, counts and the full-size architecture ----------------------------------
def test_bench_inputs_counts_and_dims_come_from_the_model():
    from vtoken.integrations.base import Integration

    model = tiny_llava_onevision()
    family = Integration.for_model(model)
    inputs = family.synthetic_inputs(8, 2, 0, "cpu", torch.float32)
    with torch.no_grad():
        packed = family.run_vision(inputs)
    counts = family.visual_counts(inputs)
    # an image of the tower's size: the tower sees its base view and crops (tiny pinpoints: a 1x2 canvas),
    # the language model the base view and the canvas unpadded to 6 x 6, each row ended by a newline
    assert inputs["pixel_values"].shape[1] == 3
    assert (counts.images, counts.patches, counts.tokens) == (1, 3 * SIDE2, SIDE2 + OV_SIDE * (OV_SIDE + 1))
    assert [p.shape[0] for p in packed] == [counts.tokens] * 2
    assert int((inputs["input_ids"][0] == IMAGE_TOKEN).sum()) == counts.tokens
    assert inputs["input_ids"].shape[1] == 8 + counts.tokens
    assert family.model_dims().vision.prefix == 0  # SigLIP: no [CLS]
    with pytest.raises(ValueError, match="accepted: 78 or None"):
        family.synthetic_inputs(8, 1, 0, "cpu", torch.float32, visual_tokens=64)


def test_llava_onevision_7b_architecture_has_the_published_widths():
    from transformers import AutoModelForImageTextToText

    from vtoken.eval.archs import arch_config

    config = arch_config("llava-onevision-7b")
    text, vision = config.text_config, config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1152, 26, 384, 14)
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (
        3584, 28, 4, 152128)
    assert config.vision_feature_select_strategy == "full" and len(config.image_grid_pinpoints) == 36
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.03  # LLaVA-OneVision-7B's count
    scaled = arch_config("llava-onevision-7b", 1 / 8)
    assert (scaled.vision_config.num_hidden_layers, scaled.text_config.num_hidden_layers) == (3, 4)
    assert scaled.text_config.hidden_size == 3584 and scaled.vision_config.hidden_size == 1152


def test_bench_runs_a_onevision_model_through_its_integration():
    from vtoken.eval import bench

    result = bench.run_bench(tiny_llava_onevision(), methods=["cls_attn"], budgets=[10], runs=1, warmup=0,
                             decode_tokens=1, text_tokens=8, out=None, progress=False)
    assert result["model_type"] == "llava_onevision" and result["visual_tokens_per_image"] == 78
    base, pruned = result["rows"]
    # 10 tokens kept of the base view and the crop, plus the newline of every crop row that keeps one
    assert base["visual_tokens"] == 78 and 10 < pruned["visual_tokens"] <= 10 + OV_SIDE
    assert pruned["gflops_llm"] < base["gflops_llm"]


# --- lmms-eval ---------------------------------------------------------------------------------------------
def test_lmms_eval_plugin_evaluates_a_tiny_onevision_checkpoint(tmp_path, monkeypatch):
    """lmms-eval's own simple_evaluate runs vtoken_llava_onevision (declared as an entry point in pyproject.toml;
    registered here when the installed metadata predates it) on a tiny checkpoint, and the model it evaluated
    was wrapped and pruned (lmms-eval's llava_hf loop logs a failed generate() and goes on, so this is checked)."""
    pytest.importorskip("lmms_eval")
    pytest.importorskip("datasets")
    from pathlib import Path

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    from tiny_processors import LLAVA_CHAT_TEMPLATE, save_tiny_checkpoint, tiny_llava_onevision_processor
    from vtoken.eval import lmms_task
    from vtoken.integrations import lmms_eval_plugin

    project = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    entry = 'vtoken_llava_onevision = "vtoken.integrations.lmms_eval_plugin:llava_onevision_manifest"'
    assert entry in project.split('[project.entry-points."lmms_eval.models"]')[1].split("\n[")[0]
    if "vtoken_llava_onevision" not in MODEL_REGISTRY_V2.list_model_names():  # installed before the entry point
        MODEL_REGISTRY_V2.register_manifest(lmms_eval_plugin.llava_onevision_manifest())
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = save_tiny_checkpoint(tiny_llava_onevision(), tiny_llava_onevision_processor(), tmp_path / "ov",
                                  LLAVA_CHAT_TEMPLATE)
    task_dir = lmms_task.export_task(tmp_path / "task", n_questions=2)
    seen = []
    original = lmms_eval_plugin._wrap

    def wrap_and_remember(model, options):
        original(model, options)
        seen.append(model)

    monkeypatch.setattr(lmms_eval_plugin, "_wrap", wrap_and_remember)
    out = simple_evaluate(model="vtoken_llava_onevision", model_args=f"pretrained={folder},method=cls_attn,keep=16",
                          tasks=["vtoken_scenes"], task_manager=TaskManager(include_path=str(task_dir)),
                          batch_size=1, device="cpu", limit=2, gen_kwargs="max_new_tokens=2")
    assert out["n-samples"]["vtoken_scenes"]["effective"] == 2
    assert 0.0 <= out["results"]["vtoken_scenes"]["accuracy,none"] <= 1.0
    (model,) = seen
    stats = model.vtoken.stats
    assert sum(k.numel() for k in stats.kept["projector"]) == 16, "the last question's image kept 16 tokens"


# --- labels with several images and videos per row -------------------------------------------------------
def surviving_labels(batch: dict, labels: torch.Tensor, width: int, records: dict, blocks: list) -> torch.Tensor:
    """The labels at the positions the returned logits hold: each row's text, and of its placeholders those
    every site kept, together at the end of the row (left padding). ``blocks``: per visual block in
    placeholder order (row by row), its token id, size and the slots the projector site kept (structure
    included); the llm(K) records index each row's visual positions present at that layer."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    visual_ids = torch.tensor(sorted({token for token, _, _ in blocks}))
    visual = torch.isin(ids, visual_ids)
    walk = iter(blocks)
    size = slot = 0
    kept: set = set()
    for r, p in visual.nonzero().tolist():
        if slot == size:
            (token, size, kept), slot = next(walk), 0
            assert int(ids[r, p]) == token, "blocks are not in placeholder order"
        visual[r, p] = slot in kept
        slot += 1
    for site in sorted((s for s in records if s.startswith("llm(")), key=lambda s: int(s[4:-1])):
        for r, chosen in enumerate(records[site]):
            positions = visual[r].nonzero()[:, 0]
            visual[r] = False
            visual[r, positions[chosen]] = True
    present = (mask & ~torch.isin(ids, visual_ids)) | visual
    out = torch.full((ids.shape[0], width), -100, dtype=labels.dtype)
    for r in range(ids.shape[0]):
        values = labels[r][present[r]]
        out[r, width - values.numel():] = values
    return out


def onevision_blocks(model, batch: dict, rows: list, records: dict) -> list:
    """Per visual block in placeholder order: (token id, size, slots kept at the projector). An image keeps
    the newline of every canvas row (or of its lone base view) that keeps a token; a clip its last slot."""
    images = []
    if batch.get("pixel_values") is not None:
        with torch.no_grad():
            packed = model.model.get_image_features(
                pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                batch_num_images=batch["batch_num_images"]).pooler_output
        newline = model.model.image_newline.detach()
        images = [(len(p), (p == newline).all(-1).nonzero()[:, 0].tolist()) for p in packed]
    images, clips = iter(images), iter([item for row in rows for item in row
                                        if isinstance(item, tuple) and item[0] == "video"])
    selected = iter(records.get("projector") or [])
    blocks = []
    for row in rows:
        for item in row:
            if not isinstance(item, tuple):
                continue
            if item[0] == "image":
                size, newlines = next(images)
                slots = set(range(size)) if "projector" not in records else set(next(selected).tolist())
                starts = [0 if len(newlines) == 1 else SIDE2] + [n + 1 for n in newlines[:-1]]
                slots |= {n for lo, n in zip(starts, newlines) if any(lo <= s < n for s in slots)}
                blocks.append((IMAGE_TOKEN, size, slots))
            else:
                size = next(clips)[1] * POOLED + 1
                slots = set(range(size)) if "projector" not in records else set(next(selected).tolist())
                blocks.append((OV_VIDEO, size, slots | {size - 1}))
    return blocks


def check_multi_labels(case, stage, blocks_of, visual_ids):
    model = case.model()
    batch = case.batch("left")
    labels = batch["input_ids"].masked_fill(torch.isin(batch["input_ids"], torch.tensor(visual_ids)), -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
        with vtoken.wrapped(model, stage.method, **stage.keep_all):
            torch.testing.assert_close(model(**batch, labels=labels).loss, expected, atol=1e-5, rtol=0)
        with vtoken.wrapped(model, stage.method, **stage.prune):
            out = model(**batch, labels=labels)
            records = model.vtoken.stats.kept
            aligned = surviving_labels(batch, labels, out.logits.shape[1], records,
                                       blocks_of(model, batch, case.rows, records))
    if any(site == "projector" or site.startswith("llm(") for site in records):  # a decode site keeps the prompt
        assert aligned.shape[1] < labels.shape[1]
    reference = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), aligned[:, 1:].flatten(),
                                                  ignore_index=-100)
    torch.testing.assert_close(out.loss, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case,stage", MULTI_STAGES)
def test_multi_visual_labels_give_the_loss_of_the_returned_logits(case, stage):
    check_multi_labels(case, stage, onevision_blocks, [IMAGE_TOKEN, OV_VIDEO])
