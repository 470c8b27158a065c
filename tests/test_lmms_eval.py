"""The lmms-eval plugin end to end: lmms-eval's own ``simple_evaluate`` runs ``vtoken_llava_hf`` on the
embedded scenes model with the exported local ``vtoken_scenes`` task, and its score equals what
``vtoken eval`` measures for the same questions, method and budget."""

from __future__ import annotations


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
