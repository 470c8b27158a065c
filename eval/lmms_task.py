"""The scenes held-out set as a local lmms-eval task, ``vtoken_scenes``.

    python -m vtoken.eval.lmms_task --out runs/lmms_task            # writes the task folder
    lmms-eval --model vtoken_llava_hf \\
        --model_args "pretrained=$(python -m vtoken.eval.lmms_task --print-model),method=kcenter,keep=64" \\
        --tasks vtoken_scenes --include_path runs/lmms_task --device cpu --batch_size 1

The task folder holds ``vtoken_scenes.yaml``, a one-line ``utils.py`` that imports the task functions
below (lmms-eval resolves ``!function utils.x`` next to the YAML file) and ``data/``, the questions with
their images as a ``datasets`` DatasetDict (split ``test``) that lmms-eval opens with ``load_from_disk``.
The YAML names the data folder by its absolute path (lmms-eval resolves relative paths against the
working directory), so re-export the task if the folder moves.

Scoring matches ``vtoken eval``: the first word of the generated answer, lower-cased, against the
reference; ``accuracy`` overall and ``accuracy_<category>`` per question category.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import scenes

TASK = "vtoken_scenes"
UTILS = "from vtoken.eval.lmms_task import *  # noqa: F401,F403  (the task's functions live in vtoken)\n"


# --- the task's functions (called by lmms-eval) ------------------------------------------------------
def doc_to_visual(doc: dict[str, Any]) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    score = float(first_word(results[0]) == doc["answer"].lower())
    record = {"id": doc["id"], "category": doc["category"], "score": score}
    return {"accuracy": record, **{f"accuracy_{category}": record for category in scenes.CATEGORIES}}


def _mean(records: list[dict[str, Any]], category: str | None = None) -> float:
    chosen = [r["score"] for r in records if category is None or r["category"] == category]
    return sum(chosen) / len(chosen) if chosen else float("nan")


def aggregate_accuracy(records: list[dict[str, Any]]) -> float:
    return _mean(records)


def _per_category(category: str):
    def aggregate(records: list[dict[str, Any]]) -> float:
        return _mean(records, category)

    aggregate.__name__ = f"aggregate_{category}"
    return aggregate


for _category in scenes.CATEGORIES:
    globals()[f"aggregate_{_category}"] = _per_category(_category)


# --- export ------------------------------------------------------------------------------------------
def task_yaml(data_dir: Path) -> str:
    metrics = [("accuracy", "aggregate_accuracy")] + [(f"accuracy_{c}", f"aggregate_{c}") for c in scenes.CATEGORIES]
    metric_lines = "".join(f"  - metric: {name}\n    aggregation: !function utils.{function}\n"
                           "    higher_is_better: true\n" for name, function in metrics)
    return (
        f"task: {TASK}\n"
        f"dataset_path: {data_dir.resolve()}\n"
        "dataset_kwargs:\n  load_from_disk: true\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 3\n  temperature: 0\n  do_sample: false\n  num_beams: 1\n"
        "process_results: !function utils.process_results\n"
        f"metric_list:\n{metric_lines}"
        "metadata:\n  version: 1.0\n"
    )


def export_task(out_dir: str | Path, n_questions: int = 1000) -> Path:
    """Write the ``vtoken_scenes`` task folder (YAML, utils.py, data) for the first ``n_questions``
    held-out questions; returns the folder."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = scenes.heldout_set(n_questions)
    rows = {"id": [], "question": [], "answer": [], "category": [], "image": []}
    for item in items:
        for key in ("id", "question", "answer", "category"):
            rows[key].append(item[key])
        rows["image"].append(scenes.make_scene(item["seed"])[0])
    features = Features({"id": Value("string"), "question": Value("string"), "answer": Value("string"),
                         "category": Value("string"), "image": Image()})
    DatasetDict({"test": Dataset.from_dict(rows, features=features)}).save_to_disk(str(out / "data"))
    (out / "utils.py").write_text(UTILS)
    (out / f"{TASK}.yaml").write_text(task_yaml(out / "data"))
    return out


def main(argv: list[str] | None = None) -> int:
    from vtoken.cli import int_at_least

    parser = argparse.ArgumentParser(prog="python -m vtoken.eval.lmms_task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lmms_task", help="task folder to write (default: %(default)s)")
    parser.add_argument("--questions", type=int_at_least(1), default=1000,
                        help="held-out questions (default: %(default)s)")
    parser.add_argument("--print-model", action="store_true", help="print the embedded model's folder and exit")
    args = parser.parse_args(argv)
    if args.print_model:
        from .scenes_model import embedded_model_path

        print(embedded_model_path())
        return 0
    out = export_task(args.out, args.questions)
    print(f"wrote the {TASK} task to {out} (pass --include_path {out} to lmms-eval)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
