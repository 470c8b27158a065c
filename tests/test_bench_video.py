"""``vtoken bench --video-frames``: a synthetic clip in each sample, and per method its visual tokens, prefill
speed-up against its oracle (which replays the method's selection on the clip) and decode tokens/s."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_qwen, tiny_qwen3_vl
from vtoken.eval import bench
from vtoken.eval.bench.report import format_table
from vtoken.integrations.base import Integration

METHODS = ["dycoke", "holitom", "holitom_full", "kcenter"]


@pytest.fixture(scope="module")
def result():
    return bench.run_bench(tiny_qwen("2.5"), methods=METHODS, budgets=[0.25], runs=1, warmup=0, decode_tokens=2,
                           generate_runs=1, text_tokens=8, out=None, progress=False, video_frames=8)


@pytest.mark.parametrize("version", ["2", "2.5", "3"])
def test_the_synthetic_clip_has_the_asked_frames_and_counts(version):
    """Qwen3-VL writes each frame pair as its own run after a timestamp; the model runs on the clip."""
    model = tiny_qwen3_vl() if version == "3" else tiny_qwen(version)
    family = Integration.for_model(model)
    inputs = family.synthetic_video_inputs(8, 2, 0, "cpu", torch.float32, frames=8)
    side = family.synthetic_frame_patches
    config = model.config
    assert inputs["video_grid_thw"].tolist() == [[4, side, side]] * 2, "8 frames are 4 temporal patches"
    ids = inputs["input_ids"][0]
    assert int((ids == config.video_token_id).sum()) == 4 * side * side // 4
    assert int((ids == config.vision_start_token_id).sum()) == (4 if version == "3" else 1)
    counts = family.visual_counts(inputs)
    assert (counts.images, counts.patches, counts.tokens) == (4, side * side, side * side // 4)
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == ids.expand(2, -1).shape
    with pytest.raises(ValueError, match="multiple of 2"):
        family.synthetic_video_inputs(8, 1, 0, "cpu", torch.float32, frames=7)


def test_every_method_reports_its_tokens_oracle_speedup_and_decode_speed(result):
    clip = 4 * 16  # 8 frames of 8 x 8 patches: 4 temporal patches of 4 x 4 merged tokens
    assert result["video_frames"] == 8 and result["visual_tokens_per_sample"] == clip
    assert "8-frame video" in result["model"] and "--video-frames 8" in result["command"]
    assert "video" not in result["command"].split("--model ")[1].split(" --")[0], "the model name stays the model's"
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["none"]["visual_tokens"] == clip
    for method in METHODS:
        row = rows[method]
        expected_kept = clip // 2 if method == "holitom_full" else clip // 4  # the inner part halves in the LLM
        assert row["visual_tokens"] == expected_kept, method
        assert row["visual_tokens_last"] == clip // 4, method
        assert row["oracle_ms"] is not None and row["oracle_ms"] > 0, f"{method} has no oracle"
        assert row["oracle_speedup"] > 0 and row["measured_over_oracle"] > 0 and row["speedup"] > 0
        assert row["decode_tok_s"] > 0, method
    assert rows["holitom_full"]["oracle_kind"].startswith("fixed selection at llm(")
    table = format_table(result)
    for method in METHODS:
        line = next(line for line in table.splitlines() if line.startswith(method + " "))
        assert line.split()[1] == "0.25", line


def test_the_command_line_takes_and_repeats_video_frames():
    from vtoken.cli import build_parser
    from vtoken.eval.bench.cli import command_line, resolve_defaults

    args = resolve_defaults(build_parser().parse_args(
        ["bench", "--arch", "qwen2.5-vl-7b", "--random-init", "--depth-scale", "1/8", "--video-frames", "32",
         "--methods", "dycoke,holitom_full", "--budgets", "0.25"]))
    assert args.video_frames == 32 and "--video-frames 32" in command_line(args)


def test_llava_onevision_gives_a_clip_its_counts_and_vision_part():
    """A clip of base views, each pooled to ceil(side/2)^2 tokens, and one newline after the clip."""
    from tiny_models import OV_SIDE, tiny_llava_onevision

    model = tiny_llava_onevision()
    family = Integration.for_model(model)
    inputs = family.synthetic_video_inputs(8, 2, 0, "cpu", torch.float32, frames=3)
    pooled = (-(-OV_SIDE // 2)) ** 2
    assert inputs["pixel_values_videos"].shape[:2] == (2, 3)
    assert int((inputs["input_ids"][0] == model.config.video_token_id).sum()) == 3 * pooled + 1
    counts = family.visual_counts(inputs)
    assert (counts.images, counts.patches, counts.tokens) == (3, OV_SIDE * OV_SIDE, pooled)
    features = family.run_vision(inputs)
    assert sum(f.shape[0] for f in features) == 2 * (3 * pooled + 1)
    with torch.no_grad():
        model(**inputs)
    result = bench.run_bench(model, methods=["holitom_full"], budgets=[0.5], runs=1, warmup=0, decode_tokens=1,
                             generate_runs=1, text_tokens=8, out=None, progress=False, video_frames=3)
    row = result["rows"][1]
    assert row["visual_tokens_last"] <= 3 * pooled // 2 + 1 and row["oracle_ms"] > 0
