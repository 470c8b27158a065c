"""The lmms-eval plugin end to end: lmms-eval's own ``simple_evaluate`` runs ``vtoken_llava_hf`` on the
embedded scenes model with the exported local ``vtoken_scenes`` task, and its score equals what
``vtoken eval`` measures for the same questions, method and budget. lmms-eval's command line runs all
three plugin models on tiny random-init checkpoints (a score is written; random weights answer noise),
and exits non-zero with vtoken's message when vtoken refuses the model_args."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("datasets")

from vtoken.eval import lmms_task, scenes_benchmark  # noqa: E402
from vtoken.eval.scenes_model import embedded_model_path  # noqa: E402

QUESTIONS = 10


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return lmms_task.export_task(tmp_path_factory.mktemp("lmms_task"), n_questions=QUESTIONS)


def test_exported_task_holds_the_heldout_questions(task_dir):
    from datasets import load_from_disk

    data = load_from_disk(str(task_dir / "data"))["test"]
    assert len(data) == QUESTIONS
    assert data[0]["image"].size == (336, 336)
    yaml = (task_dir / "vtoken_scenes.yaml").read_text()
    assert f"dataset_path: {(task_dir / 'data').resolve()}" in yaml


def test_first_word_scoring():
    assert lmms_task.first_word(" Red.") == "red"
    assert lmms_task.first_word("") == ""
    doc = {"id": "x", "category": "color", "answer": "red"}
    assert lmms_task.process_results(doc, ["red </s>"])["accuracy"]["score"] == 1.0
    assert lmms_task.process_results(doc, ["blue"])["accuracy_color"]["score"] == 0.0


def test_simple_evaluate_scores_the_embedded_model_like_vtoken_eval(task_dir, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = embedded_model_path()

    def lmms_accuracy(vtoken_args: str) -> float:
        out = simple_evaluate(
            model="vtoken_llava_hf",
            model_args=f"pretrained={model},{vtoken_args},dtype=float32",  # device_map follows device
            tasks=["vtoken_scenes"], task_manager=TaskManager(include_path=str(task_dir)),
            batch_size=1, device="cpu", limit=QUESTIONS,
        )
        return out["results"]["vtoken_scenes"]["accuracy,none"]

    pruned, full = lmms_accuracy("method=kcenter,keep=64"), lmms_accuracy("method=none")
    ours = scenes_benchmark.run_scenes_benchmark(methods=["kcenter"], budgets=[64], n_questions=QUESTIONS,
                                                 batch_size=5, progress=False)
    assert ours["runs"][0]["accuracy"]["overall"] == pytest.approx(pruned)
    assert ours["full"]["accuracy"]["overall"] == pytest.approx(full)
    assert full >= 0.7  # the trained model, far above chance on one-word answers


# --- lmms-eval's command line on tiny checkpoints ------------------------------------------------------
CLI_QUESTIONS = 2
QWEN_PIXELS = "max_pixels=3136,min_pixels=784"  # scene images become 56 x 56: 196 visual tokens


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random-init LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 checkpoints with offline processors."""
    from tiny_models import tiny_llava, tiny_qwen, tiny_qwen3_5, tiny_qwen3_vl
    from tiny_processors import (
        LLAVA_CHAT_TEMPLATE,
        QWEN_CHAT_TEMPLATE,
        save_tiny_checkpoint,
        tiny_llava_processor,
        tiny_qwen3_vl_processor,
        tiny_qwen_processor,
    )

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "vtoken_llava_hf": save_tiny_checkpoint(tiny_llava(), tiny_llava_processor(), root / "llava",
                                                LLAVA_CHAT_TEMPLATE),
        "vtoken_qwen2_vl": save_tiny_checkpoint(tiny_qwen("2"), tiny_qwen_processor(), root / "qwen2_vl",
                                                QWEN_CHAT_TEMPLATE),
        "vtoken_qwen2_5_vl": save_tiny_checkpoint(tiny_qwen("2.5"), tiny_qwen_processor(), root / "qwen2_5_vl",
                                                  QWEN_CHAT_TEMPLATE),
        "vtoken_qwen3_vl": save_tiny_checkpoint(tiny_qwen3_vl(), tiny_qwen3_vl_processor(), root / "qwen3_vl",
                                                QWEN_CHAT_TEMPLATE),
        "vtoken_qwen3_5": save_tiny_checkpoint(tiny_qwen3_5(), tiny_qwen3_vl_processor(), root / "qwen3_5",
                                               QWEN_CHAT_TEMPLATE),
    }


def _model_args(model: str, folder: Path, vtoken_args: str) -> str:
    extra = f",{QWEN_PIXELS}" if model.startswith("vtoken_qwen") else ""
    return f"pretrained={folder},{vtoken_args}{extra}"


def run_lmms_eval(model: str, model_args: str, task_dir: Path, out: Path) -> subprocess.CompletedProcess:
    """``lmms-eval --model ... --tasks vtoken_scenes`` in a subprocess, on the CPU, offline."""
    script = Path(sys.executable).with_name("lmms-eval")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]
    command += ["--model", model, "--model_args", model_args, "--tasks", "vtoken_scenes",
                "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1",
                "--limit", str(CLI_QUESTIONS), "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.parametrize("model", ["vtoken_qwen2_vl", "vtoken_qwen2_5_vl", "vtoken_qwen3_vl", "vtoken_qwen3_5",
                                   "vtoken_llava_hf"])
def test_lmms_eval_command_line_scores_the_tiny_checkpoint(model, checkpoints, task_dir, tmp_path):
    out = tmp_path / "results"
    done = run_lmms_eval(model, _model_args(model, checkpoints[model], "method=kcenter,keep=16"), task_dir, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(out.glob("**/*_results.json"))
    assert files, f"no results file under {out}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    result = json.loads(files[-1].read_text())
    assert result["n-samples"]["vtoken_scenes"]["effective"] == CLI_QUESTIONS
    accuracy = result["results"]["vtoken_scenes"]["accuracy,none"]
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize("vtoken_args, message", [
    ("method=nosuchmethod", "unknown method 'nosuchmethod'"),
    ("method=kcenter,keep=0", "keep=0"),
    ("method=dart", "has no budget"),
])
def test_lmms_eval_command_line_exits_nonzero_when_vtoken_refuses(vtoken_args, message, checkpoints, task_dir,
                                                                   tmp_path):
    model = "vtoken_qwen2_vl"
    out = tmp_path / "results"
    done = run_lmms_eval(model, _model_args(model, checkpoints[model], vtoken_args), task_dir, out)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert message in done.stderr
    assert f"lmms-eval --model {model}: vtoken refused the model_args" in done.stderr
    assert not list(out.glob("**/*_results.json"))


def test_refusal_raises_through_simple_evaluate(checkpoints, task_dir):
    """Outside lmms-eval's command line the refusal stays a ValueError (no exit from a library call)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    with pytest.raises(ValueError, match="unknown method 'nosuchmethod'"):
        simple_evaluate(model="vtoken_qwen2_vl",
                        model_args=_model_args("vtoken_qwen2_vl", checkpoints["vtoken_qwen2_vl"],
                                               "method=nosuchmethod"),
                        tasks=["vtoken_scenes"], task_manager=TaskManager(include_path=str(task_dir)),
                        batch_size=1, device="cpu", limit=CLI_QUESTIONS)


@pytest.mark.parametrize("model", ["vtoken_qwen2_vl", "vtoken_qwen2_5_vl", "vtoken_qwen3_vl", "vtoken_qwen3_5"])
def test_qwen_models_load_on_the_given_device_and_are_wrapped(model, checkpoints):
    """The parents' default device_map ("cuda", "auto") would ignore device=cpu."""
    from lmms_eval.models import get_model

    lm = get_model(model)(pretrained=str(checkpoints[model]), method="kcenter", keep=16, device="cpu")
    assert lm.device_map == "cpu"
    assert next(lm.model.parameters()).device.type == "cpu"
    assert lm.model.vtoken.pipeline.keep == 16
