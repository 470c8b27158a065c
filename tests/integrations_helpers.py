"""Small helpers shared by integration tests."""

from __future__ import annotations

import torch


def lm_image_tokens(model, batch) -> list[int]:
    """Run a forward and return, per row, how many non-text positions the language model received
    (its attended length minus the row's text tokens)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    image_token = model.config.image_token_id
    text = ((batch["input_ids"] != image_token) & batch["attention_mask"].bool()).sum(1)
    return (seen[0].sum(1) - text).tolist()


def lm_inputs(model):
    """Record the keyword arguments the language model receives on each call: ``(seen, hook handle)``."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    return seen, handle


def evaluate_with_lmms_plugin(monkeypatch, tmp_path, name: str, manifest, folder, model_args: str):
    """lmms-eval's own ``simple_evaluate`` on the ``vtoken_scenes`` task (2 questions) with the plugin model
    ``name`` (declared as an entry point in pyproject.toml, registered from ``manifest`` when the installed
    metadata predates it) on the checkpoint ``folder``; returns lmms-eval's output and the models it wrapped
    (lmms-eval's loop logs a failed generate() and goes on, so callers check those)."""
    from pathlib import Path

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    from vtoken.eval import lmms_task
    from vtoken.integrations import lmms_eval_plugin

    project = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    entry = f'{name} = "vtoken.integrations.lmms_eval_plugin:{manifest.__name__}"'
    assert entry in project.split('[project.entry-points."lmms_eval.models"]')[1].split("\n[")[0]
    if name not in MODEL_REGISTRY_V2.list_model_names():
        MODEL_REGISTRY_V2.register_manifest(manifest())
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task_dir = lmms_task.export_task(tmp_path / "task", n_questions=2)
    seen = []
    original = lmms_eval_plugin._wrap

    def wrap_and_remember(model, options):
        original(model, options)
        seen.append(model)

    monkeypatch.setattr(lmms_eval_plugin, "_wrap", wrap_and_remember)
    out = simple_evaluate(model=name, model_args=f"pretrained={folder},{model_args}", tasks=["vtoken_scenes"],
                          task_manager=TaskManager(include_path=str(task_dir)), batch_size=1, device="cpu",
                          limit=2, gen_kwargs="max_new_tokens=2")
    return out, seen
