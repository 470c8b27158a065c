"""The bench's report: the CSV columns, ``results.json`` / ``results.csv``, the plots and the printed table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

CSV_COLUMNS = [
    "method", "site", "keep", "visual_tokens", "visual_tokens_last", "llm_tokens", "runs",
    "prefill_ms", "prefill_min_ms", "prefill_max_ms", "prefill_q1_ms", "prefill_q3_ms",
    "baseline_ms", "spread", "speedup_lo", "speedup_hi",
    "oracle_ms", "oracle_min_ms", "oracle_max_ms", "oracle_vision_ms", "oracle_llm_ms", "oracle_kind",
    "speedup", "oracle_speedup", "flops_speedup", "measured_over_oracle",
    "scoring_ms", "select_ms", "overhead_pct", "stage_times",
    "decode_tok_s", "generate_ms", "generate_tok_s", "total_speedup", "base_decode_tok_s", "decode_speedup",
    "peak_mem_mb", "kv_cache_bytes", "kv_after_decode_bytes", "base_kv_after_decode_bytes",
    "gflops_vision", "gflops_projector", "gflops_llm", "gflops_total",
]


def write_json_and_csv(result: dict[str, Any], out: Path, stem: str, columns: list[str]) -> list[Path]:
    """``<stem>.json`` (the whole result) and ``<stem>.csv`` (its rows, ``columns``) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{stem}.json", out / f"{stem}.csv"]
    files[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    with open(files[1], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow(row)
    return files


def write_results(result: dict[str, Any], out: Path, plots: bool = True) -> list[str]:
    files = write_json_and_csv(result, out, "results", CSV_COLUMNS)
    if plots:
        files += plot_results(result, out)
    return [str(f) for f in files]


def plot_results(result: dict[str, Any], out: Path) -> list[Path]:
    """Latency and memory vs kept tokens (matplotlib, Agg backend, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    baseline = rows[0]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        mine = sorted((r for r in rows[1:] if r["method"] == method), key=lambda r: r["visual_tokens"])
        x = [r["visual_tokens"] for r in mine]
        y = [r["prefill_ms"] for r in mine]
        err = [[r["prefill_ms"] - r["prefill_min_ms"] for r in mine],
               [r["prefill_max_ms"] - r["prefill_ms"] for r in mine]]
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        if any(r["oracle_ms"] is not None for r in mine):
            ax.plot(x, [r["oracle_ms"] for r in mine], linestyle="--", color=line[0].get_color(), alpha=0.6)
    ax.axhline(baseline["prefill_ms"], color="black", linestyle=":",
               label=f"no pruning ({baseline['visual_tokens']} tokens)")
    ax.set_xlabel("visual tokens in the LLM (first layer, per sample)")
    ax.set_ylabel("prefill ms (median, min-max)")
    ax.set_title(f"{result['model']} on {result['device']}\n(dashed: zero-overhead oracle)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save_figure(fig, out / "latency_vs_tokens.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    twin = ax.twinx()
    for method in methods:
        mine = sorted((r for r in rows[1:] if r["method"] == method), key=lambda r: r["visual_tokens"])
        x = [r["visual_tokens"] for r in mine]
        line = ax.plot(x, [r["peak_mem_mb"] for r in mine], marker="o", label=f"{method} peak")
        twin.plot(x, [(r["kv_cache_bytes"] or 0) / 2**20 for r in mine], marker="x", linestyle="--",
                  color=line[0].get_color(), alpha=0.6)
    ax.axhline(baseline["peak_mem_mb"], color="black", linestyle=":", label="no pruning peak")
    twin.axhline((baseline["kv_cache_bytes"] or 0) / 2**20, color="grey", linestyle=":")
    ax.set_xlabel("visual tokens in the LLM (first layer, per sample)")
    ax.set_ylabel(f"peak memory MB ({result['memory_source']})", fontsize=8)
    twin.set_ylabel("KV cache after prefill, MB (dashed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save_figure(fig, out / "memory_vs_tokens.png"))
    return paths


def _save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: the default ``--max-spread``: a configuration whose timed runs (the method's or its paired
#: baseline's) span more than this factor, max/min, is flagged for a rerun
MAX_SPREAD = 1.5
#: a configuration whose speed-up median is uncertain by more than this factor (the ratio of the ends of
#: its ~90 % interval, ``timing.median_interval``) is flagged too: two unflagged runs then agree to
#: about 10 % (each median within its interval, about +-5 %)
MAX_SPEEDUP_INTERVAL = 1.10


def machine_line(result: dict[str, Any]) -> str:
    """What the numbers were measured on, in one line (``result["machine"]``)."""
    m = result.get("machine") or {}
    return (f"machine: {m.get('device', result.get('device'))} | threads {m.get('threads', result.get('threads'))} | "
            f"torch {m.get('torch', result.get('torch'))} | transformers {m.get('transformers', '?')} | "
            f"python {m.get('python', '?')}")


def flagged(row: dict[str, Any], max_spread: float) -> bool:
    """True when the row's timed runs spread more than ``max_spread`` (max/min) or its speed-up median is
    uncertain by more than ``MAX_SPEEDUP_INTERVAL``."""
    return spread_flagged(row, max_spread) or interval_flagged(row)


def spread_flagged(row: dict[str, Any], max_spread: float) -> bool:
    return row.get("spread") is not None and row["spread"] > max_spread


def interval_flagged(row: dict[str, Any]) -> bool:
    lo, hi = row.get("speedup_lo"), row.get("speedup_hi")
    return bool(lo and hi) and hi / lo > MAX_SPEEDUP_INTERVAL


def spread_footer(rows: list[dict[str, Any]], max_spread: float, what: str = "configuration") -> list[str]:
    wide = [r for r in rows if spread_flagged(r, max_spread)]
    loose = [r for r in rows if interval_flagged(r) and not spread_flagged(r, max_spread)]
    if not wide and not loose:
        return [f"all timed runs within {max_spread:g}x (max/min) of each other, and every speed-up's ~90 % "
                f"interval within {MAX_SPEEDUP_INTERVAL:g}x"]
    lines = []
    if wide:
        lines.append(f"! {len(wide)} {what}(s) with timed runs (the method's or its paired baseline's) more than "
                     f"{max_spread:g}x apart (max/min): the machine was busy")
    if loose:
        lines.append(f"! {len(loose)} {what}(s) whose speed-up median is uncertain by more than "
                     f"{MAX_SPEEDUP_INTERVAL:g}x (its ~90 % interval over the paired runs)")
    lines.append("  rerun those (more --runs, a quieter machine) before trusting their ratios")
    return lines


def table_head(title: str, result: dict[str, Any], header: str) -> list[str]:
    """A table's first lines: its title, the machine, the column header and a rule under it."""
    return [title, machine_line(result), header, "-" * len(header)]


def header_line(columns: list[tuple[str, int]]) -> str:
    """Column titles at their widths; a negative width aligns the title left (text columns)."""
    return " ".join(f"{title:<{-width}}" if width < 0 else f"{title:>{width}}" for title, width in columns)


def format_table(result: dict[str, Any]) -> str:
    max_spread = result.get("max_spread", MAX_SPREAD)
    header = header_line([("method", -23), ("keep", 5), ("LLM vis", 9), ("prefill ms", 10), ("min-max", 15),
                          ("oracle ms", 9), ("speedup", 7), ("oracle", 6), ("FLOPs", 6), ("meas/or", 7), ("total", 6),
                          ("spread", 6), ("sel %", 6), ("dec tok/s", 9), ("peak MB", 8), ("KV MB", 7),
                          ("GFLOPs v/p/llm", 20)])
    lines = table_head(f"{result['model']} | {result['device']} | {result['dtype']} | threads {result['threads']} | "
                       f"{result['runs']} runs after {result['warmup']} warm-up | text tokens {result['text_tokens']}",
                       result, header)
    for r in result["rows"]:
        label = r["method"] + (" !" if flagged(r, max_spread) else "")
        lines.append(
            f"{label:<23} {_fmt(r['keep'], ''):>5} {_vis(r):>9} {r['prefill_ms']:>10.1f} "
            f"{_span(r['prefill_min_ms'], r['prefill_max_ms']):>15} {_fmt(r['oracle_ms'], '.1f'):>9} "
            f"{_fmt(r['speedup'], '.2f'):>7} {_fmt(r['oracle_speedup'], '.2f'):>6} "
            f"{_fmt(r['flops_speedup'], '.2f'):>6} "
            f"{_fmt(r['measured_over_oracle'], '.3f'):>7} {_fmt(r.get('total_speedup'), '.2f'):>6} "
            f"{_fmt(r.get('spread'), '.2f'):>6} {_fmt(r['overhead_pct'], '.2f'):>6} "
            f"{_fmt(r['decode_tok_s'], '.2f'):>9} {_fmt(r['peak_mem_mb'], '.0f'):>8} "
            f"{_fmt((r['kv_cache_bytes'] or 0) / 2**20, '.1f'):>7} "
            f"{r['gflops_vision']:.3g}/{r['gflops_projector']:.3g}/{r['gflops_llm']:.3g}".rjust(20)
        )
    lines.append("speedup, oracle, total, meas/or: medians of per-pair ratios against runs taken in turn with "
                 "the unpruned model (or the oracle)")
    lines += decode_site_lines(result["rows"])
    lines += spread_footer(result["rows"], max_spread)
    return "\n".join(lines)


def decode_site_lines(rows: list[dict[str, Any]]) -> list[str]:
    """For methods with a ``decode`` site (their prefill is the unpruned one): decode tokens/s and the KV
    cache a generate() leaves, each against the unpruned model's in the same run."""
    lines = []
    for r in rows:
        if r.get("kv_after_decode_bytes") is None:
            continue
        decode = (f"decode {_fmt(r['decode_tok_s'], '.1f')} tok/s vs {_fmt(r.get('base_decode_tok_s'), '.1f')} "
                  f"unpruned (paired x{_fmt(r.get('decode_speedup'), '.2f')})")
        cache = (f"KV cache after generate() {r['kv_after_decode_bytes'] / 2**20:.2f} MB vs "
                 f"{r['base_kv_after_decode_bytes'] / 2**20:.2f} MB unpruned")
        lines.append(f"decode site, {r['method']} keep {r['keep']}: {decode}; {cache}")
    return lines


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _vis(row: dict[str, Any]) -> str:
    """Visual tokens in the LLM: ``576`` or ``576>64`` (first layer > last layer, llm(K) pruning)."""
    first, last = row["visual_tokens"], row.get("visual_tokens_last")
    return str(first) if last in (None, first) else f"{first}>{last}"


def _span(low: float | None, high: float | None) -> str:
    return "-" if low is None else f"{low:.0f}-{high:.0f}"

