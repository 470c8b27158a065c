"""``vtoken eval``: accuracy vs kept visual tokens on the offline scenes benchmark.

The embedded scenes model (a small LLaVA-1.5-architecture model, 576 visual tokens per image) answers the
held-out scenes questions (``vtoken.eval.scenes.heldout_set``) with every visual token, then wrapped by
each method at each budget (``with vtoken.wrapped(model, method, keep=k)``). Reported per run: accuracy
per question category and overall, the share of the full-token accuracy it keeps, and the prefill time
ratio (median seconds of one batch's prefill with the method / without).

Answering: one forward pass over the padded batch (left padding) produces the next-token logits after
``ASSISTANT:``; the answer is their argmax over the whole vocabulary, i.e. the first token of greedy
decoding. Every answer of the benchmark is one token, so this is greedy decoding's answer; it is compared
to the reference by exact, case-insensitive match. That forward pass is also what is timed as the
prefill (the processor's work is excluded; the first batch of each run is a warm-up and is not timed).

    vtoken eval                                     # every default method at 64/128/192 tokens
    vtoken eval --methods dart kcenter --budgets 64 --questions 200

From Python::

    from vtoken.eval.scenes_benchmark import run_scenes_benchmark, write_results, format_table
    results = run_scenes_benchmark(n_questions=500)
    print(format_table(results))
    write_results(results, "runs/scenes")            # results.json, results.csv, accuracy_vs_tokens.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from vtoken.stats import clock

from . import scenes
from . import scenes_model as sm
from .grid import method_grid

#: every registered method at its default site, plus the in-LLM form of DART and one pipeline; the
#: vision-encoder stages run after block 1 of the scenes model's 4 (its features come out of block 2)
DEFAULT_METHODS = ("cls_attn", "kcenter", "dart", "fastv", "random", "pool", "repshift@vision(1)",
                   "pixel_shuffle@vision(1)", "dart@llm(2)", "cls_attn+kcenter")
DEFAULT_BUDGETS = (64, 128, 192)
DECODING = ("argmax of the next-token logits after 'ASSISTANT:' over the whole vocabulary (the first "
            "token of greedy decoding; every answer is one token), exact case-insensitive match")


def _wrapper() -> Callable[..., Any]:
    import vtoken

    return vtoken.wrapped


class _Questions:
    """The held-out questions in batches; images are rendered once and kept as uint8 arrays."""

    def __init__(self, items: list[dict[str, Any]], batch_size: int):
        self.items = items
        self.batch_size = batch_size
        self.images = [np.array(scenes.make_scene(item["seed"])[0]) for item in items]

    def batches(self) -> Iterable[tuple[list[dict[str, Any]], list[np.ndarray]]]:
        for start in range(0, len(self.items), self.batch_size):
            yield self.items[start: start + self.batch_size], self.images[start: start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)


def _answer_all(model, processor, questions: _Questions, bar=None) -> tuple[list[str], list[float], int | None]:
    """Predictions for every question, the timed prefill seconds of every full-size batch after the
    first, and the visual tokens per image the language model saw (None when not recorded)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    predictions: list[str] = []
    seconds: list[float] = []
    visual_tokens = None
    for index, (items, images) in enumerate(questions.batches()):
        inputs = processor(images=[img for img in images], text=[sm.prompt(i["question"]) for i in items],
                           return_tensors="pt", padding=True)
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        with torch.no_grad():
            start = clock(device)
            logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
            elapsed = clock(device) - start
        if index > 0 and len(items) == questions.batch_size:
            seconds.append(elapsed)
        ids = logits.argmax(-1).tolist()
        predictions += [t.lower() for t in processor.tokenizer.convert_ids_to_tokens(ids)]
        state = getattr(model, "vtoken", None)
        if state is not None:
            visual_tokens = _visual_tokens_kept(state.stats)
        if bar is not None:
            bar.update(1)
    if not seconds:  # fewer than two full batches: time what there is
        seconds = [elapsed]
    return predictions, seconds, visual_tokens


def _visual_tokens_kept(stats) -> int | None:
    """Visual tokens per image at the end of the pipeline: what the last decoder layer saw, or what the
    last stage before the language model kept."""
    if stats.llm_layer_tokens:
        return int(stats.llm_layer_tokens[-1])
    return int(stats.records[-1].tokens_out) if stats.records else None


def accuracy_by_category(items: list[dict[str, Any]], predictions: list[str]) -> dict[str, float]:
    hits: dict[str, list[int]] = {}
    for item, prediction in zip(items, predictions):
        hits.setdefault(item["category"], []).append(int(prediction == str(item["answer"]).lower()))
    out = {category: float(np.mean(hits[category])) for category in scenes.CATEGORIES if category in hits}
    out["overall"] = float(np.mean([h for values in hits.values() for h in values])) if hits else float("nan")
    return out


def run_scenes_benchmark(
    model_path: str | Path | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    budgets: Sequence[int | float] = DEFAULT_BUDGETS,
    n_questions: int = 1000,
    batch_size: int = 16,
    progress: bool = True,
    *,
    model: Any = None,
    processor: Any = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    wrap_options: dict[str, Any] | None = None,
    wrapper: Callable[..., Any] | None = None,
    device: str | None = None,
    keep_predictions: bool = True,
) -> dict[str, Any]:
    """Answer ``n_questions`` held-out questions with the full model and with every method x budget.

    model_path:     a LLaVA checkpoint directory (default: the embedded scenes model); or pass ``model``
                    and ``processor`` directly.
    methods:        vtoken method names (``vtoken.list_methods()``; ``"a+b"`` pipelines allowed).
    budgets:        visual tokens kept per image (int) or fractions (float in (0, 1]).
    method_options: extra ``vtoken.wrap`` keyword arguments per method name.
    wrap_options:   extra ``vtoken.wrap`` keyword arguments for every method (e.g. ``positions``).
    wrapper:        the context manager that wraps the model (default ``vtoken.wrapped``).

    Returns a dict: ``full`` (accuracy per category and overall, prefill seconds), ``runs`` (one per
    method x budget: accuracy, ``retained`` = overall / full overall, ``prefill_ratio``, ``error`` if the
    method failed), the questions and the settings. A method that raises is recorded, not fatal.
    """
    if n_questions < 1 or batch_size < 1:
        raise ValueError(f"need n_questions >= 1 and batch_size >= 1; got {n_questions} and {batch_size}")
    if model is None:
        model, processor = sm.load(model_path, device=device or "cpu")
    elif processor is None:
        raise ValueError("pass the processor together with the model")
    model.eval()
    custom_wrapper = wrapper is not None
    wrapper = wrapper or _wrapper()
    method_options = method_options or {}
    grid = method_grid(methods, budgets, check=not custom_wrapper)  # a bad method fails before the long part
    items = scenes.heldout_set(n_questions)
    questions = _Questions(items, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(questions) * (1 + len(grid)), desc="scenes benchmark", unit="batch")
    started = time.time()
    predictions, seconds, _ = _answer_all(model, processor, questions, bar)
    full_accuracy = accuracy_by_category(items, predictions)
    full_prefill = statistics.median(seconds)
    full_tokens = int(getattr(model.config, "image_seq_length", 0) or 0) or None
    results: dict[str, Any] = {
        "model": (str(model_path) if model_path is not None
                  else (str(getattr(model, "name_or_path", "")) or "a given model")),
        "n_questions": len(items),
        "batch_size": batch_size,
        "decoding": DECODING,
        "visual_tokens_full": full_tokens,
        "methods": list(methods),
        "budgets": list(budgets),
        "wrap_options": dict(wrap_options or {}),
        "full": {"accuracy": full_accuracy, "prefill_s": full_prefill},
        "runs": [],
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    if keep_predictions:
        results["full"]["predictions"] = predictions
    for spec, keep in grid:
        run: dict[str, Any] = {"method": spec.label, "keep": keep}
        done = bar.n if bar is not None else 0
        options = {**(wrap_options or {}), **spec.options, **method_options.get(spec.label, {})}
        try:
            with wrapper(model, spec.method, keep=keep, **options):
                answers, times, visual = _answer_all(model, processor, questions, bar)
        except Exception as error:  # recorded, the other runs go on
            run.update(error=f"{type(error).__name__}: {error}", accuracy=None, retained=None,
                       prefill_s=None, prefill_ratio=None)
            if bar is not None:
                bar.update(len(questions) - (bar.n - done))
            results["runs"].append(run)
            continue
        accuracy = accuracy_by_category(items, answers)
        prefill = statistics.median(times)
        run.update(
            accuracy=accuracy,
            retained=accuracy["overall"] / full_accuracy["overall"] if full_accuracy["overall"] else float("nan"),
            prefill_s=prefill,
            prefill_ratio=prefill / full_prefill,
            visual_tokens=visual,
            error=None,
        )
        if keep_predictions:
            run["predictions"] = answers
        results["runs"].append(run)
    if bar is not None:
        bar.close()
    results["questions"] = items
    results["seconds"] = round(time.time() - started, 1)
    return results


# --- writers ---------------------------------------------------------------------------------------
def _categories(results: dict[str, Any]) -> list[str]:
    return [c for c in scenes.CATEGORIES if c in results["full"]["accuracy"]]


def _rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    categories = _categories(results)
    full = results["full"]
    rows = [{"method": "full", "keep": results.get("visual_tokens_full"), "overall": full["accuracy"]["overall"],
             **{c: full["accuracy"][c] for c in categories}, "retained": 1.0, "prefill_ratio": 1.0,
             "prefill_ms": full["prefill_s"] * 1000, "error": ""}]
    for run in results["runs"]:
        acc = run.get("accuracy") or {}
        rows.append({
            "method": run["method"], "keep": run["keep"] if run["keep"] is not None else run.get("visual_tokens"),
            "overall": acc.get("overall"),
            **{c: acc.get(c) for c in categories}, "retained": run.get("retained"),
            "prefill_ratio": run.get("prefill_ratio"),
            "prefill_ms": run["prefill_s"] * 1000 if run.get("prefill_s") is not None else None,
            "error": run.get("error") or "",
        })
    return rows


def _tokens_kept(run: dict[str, Any], full_tokens: int) -> int | None:
    """Visual tokens per image a run kept: its int budget, a fraction of ``full_tokens``, or (fixed-ratio
    methods) the count it recorded."""
    keep = run["keep"]
    if isinstance(keep, int):
        return keep
    if isinstance(keep, float):
        return round(keep * full_tokens)
    return run.get("visual_tokens")


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: one row per run (full model first), accuracy in %, retained %, prefill ratio."""
    categories = _categories(results)
    head = ["method", "keep", "overall"] + categories + ["retained", "prefill x"]
    lines = []
    for row in _rows(results):
        if row["error"]:
            cells = [row["method"], str(row["keep"]), "failed: " + row["error"][:80]]
            lines.append(cells)
            continue
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        cells = [row["method"], str(row["keep"]), pct(row["overall"])] + [pct(row[c]) for c in categories]
        cells += [pct(row["retained"]), "-" if row["prefill_ratio"] is None else f"{row['prefill_ratio']:.2f}"]
        lines.append(cells)
    widths = [max(len(head[i]), *(len(cells[i]) for cells in lines if len(cells) == len(head)))
              for i in range(len(head))]
    out = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for cells in lines:
        if len(cells) != len(head):
            out.append("  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2]]))
        else:
            out.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    n = results.get("n_questions")
    out.append(f"accuracy in % on {n} held-out questions; retained: % of the full model's overall accuracy; "
               "prefill x: median prefill time / full model's")
    if results.get("wrap_options"):
        out.append("every method wrapped with " + ", ".join(f"{k}={v}" for k, v in results["wrap_options"].items()))
    return "\n".join(out)


def write_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and ``accuracy_vs_tokens.png`` (needs matplotlib; skipped
    with a note in the returned mapping if it is not installed) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv"}
    paths["json"].write_text(json.dumps(results, indent=1))
    rows = _rows(results)
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    try:
        import matplotlib
    except ImportError:
        return paths
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = ["overall"] + _categories(results)
    columns = 3
    figure, axes = plt.subplots(math.ceil(len(categories) / columns), columns,
                                figsize=(4.2 * columns, 3.2 * math.ceil(len(categories) / columns)), squeeze=False)
    full = results["full"]["accuracy"]
    full_tokens = results.get("visual_tokens_full") or 576
    budgets = [b if isinstance(b, int) else round(b * full_tokens) for b in results["budgets"]]
    for axis, category in zip(axes.flat, categories):
        for method in results["methods"]:
            runs = [r for r in results["runs"] if r["method"] == method and r.get("accuracy")]
            if not runs:
                continue
            xs = [_tokens_kept(r, full_tokens) for r in runs]
            ys = [100 * r["accuracy"].get(category, float("nan")) for r in runs]
            axis.plot(xs, ys, marker="o", label=method)
        axis.axhline(100 * full[category], color="black", linestyle="--", linewidth=1, label=f"all {full_tokens}")
        axis.set_title(category)
        axis.set_xlabel("visual tokens kept per image")
        axis.set_ylabel("accuracy (%)")
        axis.set_xticks(sorted(set(budgets) | {_tokens_kept(r, full_tokens) for r in results["runs"]} - {None}))
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(categories):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"scenes benchmark: {results['n_questions']} held-out questions")
    figure.tight_layout()
    paths["png"] = out / "accuracy_vs_tokens.png"
    figure.savefig(paths["png"], dpi=110)
    plt.close(figure)
    return paths


# --- command line (``vtoken eval``) -----------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vtoken.cli import budget, device_name, int_at_least, method_spec

    parser.add_argument("--model", default=None, type=_checkpoint_folder,
                        help="LLaVA checkpoint directory (default: the embedded scenes model)")
    parser.add_argument("--methods", nargs="+", type=method_spec, default=list(DEFAULT_METHODS),
                        help="vtoken methods ('a+b' pipelines; 'method@site' sets the site, e.g. dart@llm(2))")
    parser.add_argument("--budgets", nargs="+", type=budget, default=list(DEFAULT_BUDGETS),
                        help="visual tokens kept per image (int >= 1) or fractions in (0, 1]")
    parser.add_argument("--questions", type=int_at_least(1), default=1000,
                        help="held-out questions (balanced over categories)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16)
    parser.add_argument("--positions", choices=["compact", "original"], default=None,
                        help="position ids of the kept tokens before the LLM, for every method (default: the "
                             "model's own default, compact for LLaVA)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/scenes-<time>)")
    parser.add_argument("--device", default=None, type=device_name, help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads")
    parser.add_argument("--save-images", action="store_true", help="also write the held-out images and questions")
    parser.add_argument("--no-progress", action="store_true")


def _checkpoint_folder(text: str) -> str:
    if not (Path(text) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"no checkpoint at {text!r} (no config.json there); pass a LLaVA "
                                         "checkpoint folder, or leave --model out for the embedded model")
    return text


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = run_scenes_benchmark(args.model, methods=args.methods, budgets=args.budgets,
                                       n_questions=args.questions, batch_size=args.batch_size,
                                       progress=not args.no_progress, device=args.device,
                                       wrap_options={"positions": args.positions} if args.positions else None)
    except (ValueError, OSError) as error:  # a refused setting or an unreadable model: one line, no traceback
        print(f"vtoken eval: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/scenes-{time.strftime('%Y%m%d-%H%M%S')}")
    paths = write_results(results, out)
    if args.save_images:
        scenes.save_heldout(out / "questions.json", args.questions, images_dir=out / "images")
    print(format_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtoken.eval.scenes_benchmark",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
