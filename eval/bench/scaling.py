"""``vtoken bench --scaling``: how the costs grow with the visual tokens per prompt and the batch size.

For every batch size x visual-token count (set through the image size, ``synthetic_inputs(visual_tokens=)``)
the unpruned model and each method at one budget are measured as in a bench run: prefill speed-up against
runs of the unpruned model taken in turn (median of per-pair ratios), the same for the zero-overhead
oracle, vtoken's own scoring + selection time and its share of the prefill, peak memory, KV-cache bytes
and generate() throughput (tokens/s for the whole batch). Outputs: ``scaling.json``, ``scaling.csv``,
``scaling.png`` (each quantity against the token count, one line per method and batch size) and a table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..grid import method_grid
from .measure import measure_baseline, measure_method, relative_to
from .report import MAX_SPREAD, _fmt, flagged, header_line, spread_footer, table_head, write_json_and_csv
from .runner import check_counts, load_model, setup_machine, workload
from .system import run_facts

#: on a GPU: 576 to 16,000 tokens at 1/4 depth (8 ViT blocks, 7 decoder layers of Qwen2.5-VL-7B); kcenter
#: before the LLM, inside the tower at a third of its 8 blocks (vision(3)) and dart in the LLM
GPU_DEFAULTS = dict(tokens=(576, 2880, 5000, 16000), batches=(1, 4, 16),
                    methods=("kcenter", "kcenter@vision(3)", "dart@llm(2)"),
                    depth_scale=1 / 4, runs=5, warmup=1, decode_tokens=16, generate_runs=3)
#: on a CPU: what a 2-core machine runs in about 10 minutes: 1 ViT block and 1 decoder layer (so no
#: llm(K) site: ``dart`` runs before the LLM), 64-576 tokens, batch 1 and 2
CPU_DEFAULTS = dict(tokens=(64, 144, 576), batches=(1, 2), methods=("kcenter", "dart"), depth_scale=1 / 28,
                    runs=3, warmup=0, decode_tokens=4, generate_runs=1)
SCALING_ARCH = "qwen2.5-vl-7b"
SCALING_KEEP = 0.25
SCALING_COLUMNS = [
    "visual_tokens_per_image", "batch", "method", "keep", "visual_tokens", "prefill_ms", "baseline_ms",
    "oracle_ms", "speedup", "oracle_speedup", "measured_over_oracle", "spread", "scoring_ms", "select_ms",
    "overhead_pct", "peak_mem_mb", "kv_cache_bytes", "generate_tok_s", "decode_tok_s", "total_speedup",
    "gflops_total",
]


def scaling_defaults(device: str) -> dict[str, Any]:
    """The sweep ``vtoken bench --scaling`` runs when not told otherwise, for ``device`` (``auto``: cuda
    when available)."""
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return dict(GPU_DEFAULTS if gpu else CPU_DEFAULTS)


def run_scaling(
    model: Any = None, *, arch: str | None = SCALING_ARCH, random_init: bool = True, depth_scale: float = 1 / 28,
    methods: Sequence[str] = CPU_DEFAULTS["methods"], keep: Sequence[int | float] = (SCALING_KEEP,),
    tokens: Sequence[int] = CPU_DEFAULTS["tokens"], batches: Sequence[int] = CPU_DEFAULTS["batches"],
    runs: int = 3, warmup: int = 0, decode_tokens: int = 4, generate_runs: int = 1, text_tokens: int = 48,
    seed: int = 0, device: str = "auto", dtype: str | torch.dtype = "auto", threads: int | None = None,
    attn_implementation: str = "sdpa", out: str | Path | None = None, plots: bool = True, progress: bool = True,
    command: str | None = None, max_spread: float = MAX_SPREAD,
) -> dict[str, Any]:
    """Sweep ``tokens`` (visual tokens per image) x ``batches`` for ``methods`` at ``keep``; returns the
    results (and writes them to ``out``). ``model``: a loaded model or a folder / id whose family can set
    its image's token count; otherwise ``arch`` with random weights at ``depth_scale``."""
    import vtoken

    check_counts(runs, warmup, decode_tokens, text_tokens, min(batches), generate_runs, max_spread)
    if not tokens or min(tokens) < 1:
        raise ValueError(f"visual-token counts {list(tokens)}; expected ints >= 1")
    torch_device, torch_dtype = setup_machine(device, dtype, threads)
    started = time.perf_counter()
    built = model is None and arch is not None
    model, model_name = load_model(model, arch if built else None, random_init, depth_scale, torch_dtype,
                                   torch_device, attn_implementation, seed)
    grid = method_grid(methods, keep)
    workload(model, text_tokens, 1, seed, torch_device, torch_dtype, visual_tokens=min(tokens))  # refuses early
    for spec, budget in grid:
        with vtoken.wrapped(model, spec.method, keep=budget, **spec.options):
            pass
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tokens) * len(batches) * (1 + len(grid)), desc="vtoken bench --scaling", unit="config",
               disable=not progress, file=sys.stderr)
    rows = []
    for batch in batches:
        for count in tokens:
            work = workload(model, text_tokens, batch, seed, torch_device, torch_dtype, visual_tokens=count)
            bar.set_postfix_str(f"{count} tokens x {batch}: no pruning")
            baseline = measure_baseline(work, 1, 0, decode_tokens)
            bar.update(1)
            point = dict(visual_tokens_per_image=work.counts.tokens, batch=batch)
            rows.append({**point, **baseline})
            for spec, budget in grid:
                bar.set_postfix_str(f"{count} tokens x {batch}: {spec.label}")
                row = measure_method(work, spec, budget, runs, warmup, decode_tokens, generate_runs)
                relative_to(row, baseline)
                rows.append({**point, **row})
                bar.update(1)
    bar.close()
    result = {
        "command": command, "model": model_name, "random_init": built, "depth_scale": depth_scale if built else 1.0,
        **run_facts(model, torch_device, torch_dtype), "max_spread": max_spread,
        "text_tokens": text_tokens, "tokens": list(tokens), "batches": list(batches), "keep": list(keep),
        "runs": runs, "warmup": warmup, "decode_tokens": decode_tokens, "generate_runs": generate_runs,
        "wall_s": None, "rows": rows,
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if out is not None:
        result["files"] = write_scaling(result, Path(out), plots)
    return result


def write_scaling(result: dict[str, Any], out: Path, plots: bool = True) -> list[str]:
    files = write_json_and_csv(result, out, "scaling", SCALING_COLUMNS)
    if plots:
        files.append(plot_scaling(result, out / "scaling.png"))
    return [str(f) for f in files]


#: (column, y label, whether the unpruned model has a line of its own)
PANELS = [
    ("speedup", "prefill speed-up (paired; dashed: oracle)", False),
    ("overhead_pct", "scoring + selection, % of prefill", False),
    ("peak_mem_mb", "peak memory, MB", True),
    ("kv_cache_bytes", "KV cache after prefill, MB", True),
    ("generate_tok_s", "generate() tokens/s (whole batch)", True),
    ("measured_over_oracle", "measured / oracle (paired)", False),
]


def plot_scaling(result: dict[str, Any], path: Path) -> Path:
    """Each quantity against the visual tokens per image, one line per method and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    lines = list(dict.fromkeys((r["method"], r["batch"]) for r in rows))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {line: palette[i % len(palette)] for i, line in enumerate(lines)}
    for ax, (column, label, with_baseline) in zip(axes.flat, PANELS):
        for method, batch in lines:
            if method == "none" and not with_baseline:
                continue
            mine = sorted((r for r in rows if (r["method"], r["batch"]) == (method, batch)),
                          key=lambda r: r["visual_tokens_per_image"])
            x = [r["visual_tokens_per_image"] for r in mine]
            scale = 2**20 if column == "kv_cache_bytes" else 1
            y = [None if r.get(column) is None else r[column] / scale for r in mine]
            style = ":" if method == "none" else "-"
            ax.plot(x, y, marker="o", linestyle=style, color=colours[(method, batch)],
                    label=f"{'no pruning' if method == 'none' else method}, batch {batch}")
            if column == "speedup":
                ax.plot(x, [r.get("oracle_speedup") for r in mine], linestyle="--", color=colours[(method, batch)],
                        alpha=0.6)
        ax.set_xscale("log")
        ax.set_xticks(result["tokens"], [str(t) for t in result["tokens"]])
        ax.minorticks_off()
        ax.set_xlabel("visual tokens per image (before pruning)")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[2].legend(fontsize=7)  # a panel with every line, the unpruned model's dotted
    fig.suptitle(f"{result['model']} on {result['device']}, keep {','.join(map(str, result['keep']))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_scaling(result: dict[str, Any]) -> str:
    max_spread = result.get("max_spread", MAX_SPREAD)
    header = header_line([("tokens", 6), ("batch", 5), ("method", -16), ("keep", 5), ("prefill ms", 10),
                          ("base ms", 9), ("speedup", 7), ("oracle", 6), ("meas/or", 7), ("spread", 6),
                          ("sel ms", 7), ("sel %", 6), ("peak MB", 8), ("KV MB", 7), ("gen tok/s", 9)])
    lines = table_head(f"{result['model']} | {result['device']} | {result['dtype']} | {result['runs']} paired runs "
                       f"after {result['warmup']} warm-up | {result['generate_runs']} generate() pair(s) of "
                       f"{1 + result['decode_tokens']} tokens | text tokens {result['text_tokens']}", result, header)
    for r in result["rows"]:
        label = r["method"] + (" !" if flagged(r, max_spread) and r["method"] != "none" else "")
        selection = None if r["method"] == "none" else (r["scoring_ms"] or 0) + (r["select_ms"] or 0)
        lines.append(
            f"{r['visual_tokens_per_image']:>6} {r['batch']:>5} {label:<16} {_fmt(r['keep'], ''):>5} "
            f"{r['prefill_ms']:>10.1f} {_fmt(r.get('baseline_ms'), '.1f'):>9} {_fmt(r['speedup'], '.2f'):>7} "
            f"{_fmt(r['oracle_speedup'], '.2f'):>6} {_fmt(r['measured_over_oracle'], '.3f'):>7} "
            f"{_fmt(r.get('spread'), '.2f'):>6} {_fmt(selection, '.2f'):>7} {_fmt(r['overhead_pct'], '.2f'):>6} "
            f"{_fmt(r['peak_mem_mb'], '.0f'):>8} {_fmt((r['kv_cache_bytes'] or 0) / 2**20, '.1f'):>7} "
            f"{_fmt(r.get('generate_tok_s'), '.2f'):>9}")
    lines += spread_footer([r for r in result["rows"] if r["method"] != "none"], max_spread, "point")
    lines.append(f"run time {result['wall_s']:.0f} s")
    return "\n".join(lines)
