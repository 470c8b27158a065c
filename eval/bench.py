"""``vtoken bench``: prefill latency, decode speed, memory and FLOPs of pruning methods, against the
zero-overhead oracle.

For one model and a grid of methods x budgets (visual tokens kept per image), each configuration is
measured in the same run as its oracle:

- prefill: ``model(**inputs, use_cache=True, logits_to_keep=1)`` (the prefill ``generate()`` runs),
  wrapped with the method; median, min/max and quartiles of ``runs`` timed runs after ``warmup``;
- oracle: the same model fed an input that already holds only the kept visual tokens, i.e. what an
  implementation with free scoring and selection would cost. Pre-LLM pipelines: the vision encoder
  and projector on the pixels (in full, as the method runs them), then the language model and the LM
  head on the exact ``inputs_embeds`` / ``attention_mask`` / ``position_ids`` the wrapped model fed its
  language model (captured once by a forward pre-hook). ``llm(K)`` pipelines: the same, with the
  decoder pruned at layer K by a fixed stage that replays the selection the method made (no signals,
  no selection work). Timed runs of the method and of the oracle alternate, so both see the same
  machine load;
- scoring and selection time per stage (``model.vtoken.stats``), as a share of the prefill;
- decode: tokens/s of ``generate()`` after the first token, and the whole ``generate()`` time;
- peak memory (CUDA max allocated, or the process's peak RSS on CPU) and the KV-cache bytes after
  prefill, read from the cache itself;
- analytic FLOPs split into vision / projector / LLM (``vtoken.flops``), and the FLOPs-ideal speed-up.

Inputs are synthetic: random pixels and random text ids around the image placeholders (the token
counts are what matters for speed). Outputs: ``results.json``, ``results.csv`` and plots in ``--out``;
a table and the command that reproduces the run are printed.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor

from vtoken.stages.base import Stage
from vtoken.tokens import Keep, TokenSet

from .grid import MethodSpec, method_grid, parse_budget

DEFAULT_METHODS = ("cls_attn", "kcenter", "dart", "pool", "random", "dart@llm(2)")
DEFAULT_BUDGETS = (64, 128, 192)
EMBEDDED_MODEL = "scenes-llava"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

CSV_COLUMNS = [
    "method", "site", "keep", "visual_tokens", "visual_tokens_last", "llm_tokens", "runs",
    "prefill_ms", "prefill_min_ms", "prefill_max_ms", "prefill_q1_ms", "prefill_q3_ms",
    "oracle_ms", "oracle_min_ms", "oracle_max_ms", "oracle_vision_ms", "oracle_llm_ms", "oracle_kind",
    "speedup", "oracle_speedup", "flops_speedup", "measured_over_oracle",
    "scoring_ms", "select_ms", "overhead_pct", "stage_times",
    "decode_tok_s", "generate_ms", "total_speedup",
    "peak_mem_mb", "kv_cache_bytes",
    "gflops_vision", "gflops_projector", "gflops_llm", "gflops_total",
]


# --- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vtoken.cli import int_at_least

    source = parser.add_argument_group("model (default: the embedded scenes-llava model)")
    source.add_argument("--model", default=None,
                        help="a Hugging Face id or local folder of a supported vision-language model")
    source.add_argument("--arch", default=None, choices=sorted(_archs()),
                        help="build this architecture with random weights (needs --random-init)")
    source.add_argument("--random-init", action="store_true",
                        help="confirm that --arch is built with random weights (speed-only numbers)")
    source.add_argument("--depth-scale", default="1", type=_fraction,
                        help="with --arch: keep this fraction of the vision and LLM layers, widths exact "
                             "(e.g. 1/8: LLaVA-1.5-7B -> 3 ViT-L + 4 Llama-7B layers)")
    grid = parser.add_argument_group("what to measure")
    grid.add_argument("--methods", default=",".join(DEFAULT_METHODS), type=_method_list,
                      help="comma-separated methods; 'a+b' pipelines; 'method@site' sets the site, e.g. "
                           "dart@llm(2) (default: %(default)s)")
    grid.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), type=_budget_list,
                      help="comma-separated visual tokens kept per image (int >= 1) or fractions in (0, 1] "
                           "(default: %(default)s)")
    grid.add_argument("--runs", type=int_at_least(1), default=5,
                      help="timed prefill runs per configuration (>= 5 recommended)")
    grid.add_argument("--warmup", type=int_at_least(0), default=1,
                      help="untimed runs before timing each configuration")
    grid.add_argument("--decode-tokens", type=int_at_least(0), default=16,
                      help="tokens generated after the first one, for decode tokens/s (0: skip decode)")
    grid.add_argument("--text-tokens", type=int_at_least(2), default=48,
                      help="text tokens of the synthetic prompt (besides the image placeholders)")
    grid.add_argument("--batch-size", type=int_at_least(1), default=1,
                      help="samples per batch (the same prompt repeated)")
    grid.add_argument("--seed", type=int, default=0)
    machine = parser.add_argument_group("machine")
    machine.add_argument("--device", default="auto", type=_device_or_auto,
                         help="cpu, cuda, cuda:1... (default: cuda when available)")
    machine.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                         help="auto: bf16 on CUDA, fp32 on CPU")
    machine.add_argument("--threads", type=int_at_least(1), default=None,
                         help="torch CPU threads (default: torch's choice)")
    machine.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="runs/bench", help="folder for results.json, results.csv and plots")
    output.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    output.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        result = run_bench(
            model=args.model, arch=args.arch, random_init=args.random_init, depth_scale=args.depth_scale,
            methods=_split(args.methods), budgets=[parse_budget(b) for b in _split(args.budgets)], runs=args.runs,
            warmup=args.warmup, decode_tokens=args.decode_tokens, text_tokens=args.text_tokens,
            batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
            threads=args.threads, attn_implementation=args.attn, out=args.out, plots=not args.no_plots,
            progress=not args.quiet, command=command_line(args),
        )
    except (ValueError, NotImplementedError, OSError) as error:
        print(f"vtoken bench: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"\nwrote {result['files']}" if result.get("files") else "")
    print(f"rerun with:\n  {result['command']}")
    return 0


def _method_list(text: str) -> str:
    """``--methods``: every comma-separated spec checked (``vtoken.cli.method_spec``); returns the text."""
    from vtoken.cli import method_spec

    specs = _split(text)
    if not specs:
        raise argparse.ArgumentTypeError("no method given; pass e.g. --methods dart,kcenter")
    for spec in specs:
        method_spec(spec)
    return text


def _budget_list(text: str) -> str:
    """``--budgets``: every comma-separated budget checked (``vtoken.cli.budget``); returns the text."""
    from vtoken.cli import budget

    budgets = _split(text)
    if not budgets:
        raise argparse.ArgumentTypeError("no budget given; pass e.g. --budgets 64,128")
    for value in budgets:
        budget(value)
    return text


def _device_or_auto(text: str) -> str:
    from vtoken.cli import device_name

    if text == "auto":
        return text
    try:
        return device_name(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or auto: cuda when available)") from None


def command_line(args: argparse.Namespace) -> str:
    """The full command, every option spelled out, that reproduces a run."""
    parts = ["vtoken", "bench"]
    if args.arch:
        parts += ["--arch", args.arch]
        if args.random_init:
            parts.append("--random-init")
        if args.depth_scale != 1:
            parts += ["--depth-scale", _fraction_text(args.depth_scale)]
    elif args.model:
        parts += ["--model", args.model]
    parts += ["--methods", args.methods, "--budgets", args.budgets, "--runs", str(args.runs),
              "--warmup", str(args.warmup), "--decode-tokens", str(args.decode_tokens),
              "--text-tokens", str(args.text_tokens), "--batch-size", str(args.batch_size),
              "--seed", str(args.seed), "--device", args.device, "--dtype", args.dtype]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.attn != "sdpa":
        parts += ["--attn", args.attn]
    parts += ["--out", args.out]
    if args.no_plots:
        parts.append("--no-plots")
    return shlex.join(parts)


# --- the benchmark --------------------------------------------------------------------------------
def run_bench(
    model: Any = None, *, arch: str | None = None, random_init: bool = False, depth_scale: float = 1.0,
    methods: Sequence[str] = DEFAULT_METHODS, budgets: Sequence[int | float] = DEFAULT_BUDGETS, runs: int = 5,
    warmup: int = 1, decode_tokens: int = 16, text_tokens: int = 48, batch_size: int = 1, seed: int = 0,
    device: str = "auto", dtype: str | torch.dtype = "auto", threads: int | None = None,
    attn_implementation: str = "sdpa", out: str | Path | None = None, plots: bool = True, progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Benchmark ``methods`` x ``budgets`` on a model; returns the results (and writes them to ``out``).

    model: a loaded model, a Hugging Face id or folder, or None for the embedded model; or ``arch``
    (with ``random_init=True``) for a random-weight architecture scaled by ``depth_scale``.
    """
    import vtoken

    if runs < 1 or warmup < 0 or decode_tokens < 0 or text_tokens < 2 or batch_size < 1:
        raise ValueError("need runs >= 1, warmup >= 0, decode_tokens >= 0, text_tokens >= 2, batch_size >= 1")
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    torch_dtype = _resolve_dtype(dtype, device)
    started = time.perf_counter()
    model, model_name = _load_model(model, arch, random_init, depth_scale, torch_dtype, device, attn_implementation,
                                    seed)
    family = family_for(model)
    grid = method_grid(methods, budgets)
    for spec, keep in grid:  # a method the model cannot take fails before the long part
        with vtoken.wrapped(model, spec.method, keep=keep, **spec.options):
            pass
    inputs = family.make_inputs(text_tokens, batch_size, seed, device, torch_dtype)
    from vtoken.flops import dims_from_config

    dims = dims_from_config(model.config)
    bar = _progress(1 + len(grid), progress)
    rows = []
    bar.set_postfix_str("no pruning")
    baseline = _measure_baseline(model, family, inputs, dims, runs, warmup, decode_tokens, device)
    rows.append(baseline)
    bar.update(1)
    for spec, keep in grid:
        bar.set_postfix_str(f"{spec.label} keep={keep}")
        row = _measure_method(model, family, inputs, dims, spec, keep, runs, warmup, decode_tokens, device)
        _relative_to(row, baseline)
        rows.append(row)
        bar.update(1)
    bar.close()
    result = {
        "command": command or _api_command(model_name, methods, budgets, runs, warmup, decode_tokens, text_tokens,
                                           batch_size, seed, device, torch_dtype, threads, out),
        "model": model_name, "model_type": model.config.model_type, "random_init": bool(arch),
        "depth_scale": depth_scale if arch else 1.0, "device": _device_name(device), "dtype": str(torch_dtype),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "attn_implementation": attn_implementation,
        "text_tokens": family.text_tokens(inputs), "visual_tokens_per_image": family.visual_per_image(),
        "batch_size": batch_size, "runs": runs, "warmup": warmup, "decode_tokens": decode_tokens,
        "dims": dims.to_dict(), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "memory_source": "cuda max_memory_allocated" if device.type == "cuda" else _rss_source(),
        "wall_s": None, "rows": rows,
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if out is not None:
        result["files"] = write_results(result, Path(out), plots)
    return result


def _relative_to(row: dict[str, Any], baseline: dict[str, Any]) -> None:
    row["speedup"] = _ratio(baseline["prefill_ms"], row["prefill_ms"])
    row["oracle_speedup"] = _ratio(baseline["prefill_ms"], row["oracle_ms"])
    row["flops_speedup"] = _ratio(baseline["gflops_total"], row["gflops_total"])
    if row.get("measured_over_oracle") is None:
        row["measured_over_oracle"] = _ratio(row["oracle_ms"], row["prefill_ms"])
    row["total_speedup"] = _ratio(baseline["generate_ms"], row["generate_ms"])


def _measure_baseline(model, family, inputs, dims, runs, warmup, decode_tokens, device) -> dict[str, Any]:
    seen = _capture_lm_inputs(family.language_model(model))
    with torch.no_grad():
        output = _prefill(model, inputs)
    seen.remove()
    kv = cache_bytes(_output_cache(output))
    del output
    jobs = {"prefill": lambda: _prefill(model, inputs)}
    times = _time_runs(jobs, runs, warmup, device, warmed=["prefill"])["prefill"]
    full_visual = family.visual_per_image() * family.images_per_sample(inputs)
    layers = dims.llm.layers
    row = _row("none", "-", full_visual, family, inputs, seen.kwargs, times)
    row["visual_tokens_last"] = full_visual
    row.update(oracle_kind="-", scoring_ms=0.0, select_ms=0.0, overhead_pct=0.0, stage_times="")
    row.update(_flops(dims, family, inputs, [full_visual] * layers))
    row.update(kv_cache_bytes=kv)
    row.update(_generate_stats(model, inputs, decode_tokens, device))
    row.update(speedup=1.0, oracle_speedup=1.0, flops_speedup=1.0, measured_over_oracle=1.0, total_speedup=1.0)
    return row


def _measure_method(model, family, inputs, dims, spec, keep, runs, warmup, decode_tokens, device) -> dict[str, Any]:
    import vtoken

    vtoken.wrap(model, spec.method, keep=keep, **spec.options)
    try:
        state = model.vtoken
        sites = state.pipeline.sites
        seen = _capture_lm_inputs(family.language_model(model))
        with torch.no_grad():
            output = _prefill(model, inputs)
        seen.remove()
        records = list(state.stats.records)
        layer_tokens = list(state.stats.llm_layer_tokens)
        kept = {site: list(value) for site, value in state.stats.kept.items()}
        last_call = state.integration.last_call
        prefill_call = None if last_call is None else last_call.parts.get("decoder")
        kv = cache_bytes(_output_cache(output))
        del output
        llm_sites = [site for site in sites if site.kind == "llm"]
        has_vision_site = any(site.kind == "vision" for site in sites)
        selection: list[tuple[float, float]] = []  # (scoring, select) ms of each run

        def measured() -> Any:
            result = _prefill(model, inputs)
            records = state.stats.records
            selection.append((sum(r.scoring_ms for r in records), sum(r.select_ms for r in records)))
            return result

        if has_vision_site:
            oracle, oracle_kind = None, "n/a (vision(L) site)"
        elif llm_sites:
            oracle = _llm_oracle(model, family, inputs, seen.kwargs, prefill_call, kept, llm_sites)
            oracle_kind = "fixed selection at " + ",".join(map(str, llm_sites))
        else:
            oracle, oracle_kind = _pre_llm_oracle(model, family, inputs, seen.kwargs), "shrunk LLM input"
        jobs = {"prefill": measured}
        if oracle is not None:
            jobs.update(oracle_vision=oracle["vision"], oracle_llm=oracle["llm"])
        try:
            times = _time_runs(jobs, runs, warmup, device, warmed=["prefill"])
        finally:
            if oracle is not None and "remove" in oracle:
                oracle["remove"]()
        per_stage = _stage_times(state, records)
        row = _row(spec.label, ",".join(map(str, sites)), keep, family, inputs, seen.kwargs, times["prefill"])
        row["oracle_kind"] = oracle_kind
        if oracle is not None:
            totals = [vision + llm for vision, llm in zip(times["oracle_vision"], times["oracle_llm"])]
            row.update(_summary("oracle", totals))
            row["oracle_vision_ms"] = _round(statistics.median(times["oracle_vision"]))
            row["oracle_llm_ms"] = _round(statistics.median(times["oracle_llm"]))
            # each timed run of the method is next to one of the oracle: the median of the paired ratios
            # cancels the slow drift of a shared machine that the ratio of two medians would keep
            paired = [o / m for o, m in zip(totals, times["prefill"])]
            row["measured_over_oracle"] = _round(statistics.median(paired), 4)
        timed = selection[-runs:]  # the timed runs, warm-up left out
        scoring = statistics.median(a for a, _ in timed)
        select = statistics.median(b for _, b in timed)
        both = statistics.median(a + b for a, b in timed)
        row.update(
            scoring_ms=_round(scoring), select_ms=_round(select),
            overhead_pct=_round(100 * both / row["prefill_ms"], 2), stage_times=per_stage,
        )
        visual_in_llm = _visual_in_llm(family, inputs, seen.kwargs)
        per_layer = layer_tokens if layer_tokens else [visual_in_llm] * dims.llm.layers
        row["visual_tokens_last"] = per_layer[-1]
        row.update(_flops(dims, family, inputs, per_layer, vision_site=has_vision_site, records=records))
        row["kv_cache_bytes"] = kv
        row.update(_generate_stats(model, inputs, decode_tokens, device))
        return row
    finally:
        if hasattr(model, "vtoken"):
            vtoken.unwrap(model)


# --- the oracle -----------------------------------------------------------------------------------
def _pre_llm_oracle(model, family, inputs, lm_kwargs) -> dict[str, Callable[[], Any]]:
    """Vision + projector on the pixels; then the language model and LM head on the captured input."""
    lm = family.language_model(model)

    def vision() -> Any:
        return family.vision(model, inputs)

    def llm() -> Any:
        return run_language_model(model, lm, lm_kwargs)

    return {"vision": vision, "llm": llm}


def _llm_oracle(model, family, inputs, lm_kwargs, call, kept, llm_sites) -> dict[str, Callable[[], Any]]:
    """As the pre-LLM oracle, with the decoder pruned at llm(K) by a fixed stage replaying the
    selection the method made: the deeper layers see exactly the method's tokens, and no signal is
    computed and nothing is selected. Its decoder hooks stay installed next to the method's for the
    timing (each set is inert outside its own calls); ``remove`` takes them away."""
    import vtoken
    from vtoken.calls import CallKey
    from vtoken.integrations.decoder import DecoderSites
    from vtoken.integrations.hf_vlm import Prefill

    if call is None:
        raise RuntimeError("the llm(K) site recorded no prefill; cannot build its oracle")
    visual, units, mask = call.visual, call.units, call.attention_mask
    fixed = []
    for site in llm_sites:
        indices = kept.get(str(site))
        if not indices or any(i is None for i in indices):
            raise RuntimeError(f"no kept positions recorded at {site}")
        rows = torch.stack(list(indices))
        per_unit = rows.shape[1] // max(int(units.max()), 1)
        fixed.append(FixedKeep(keep=per_unit, site=str(site), indices=rows))
    lm = family.language_model(model)
    sites = DecoderSites(vtoken.Pipeline(fixed), lm, llm_sites, key=CallKey())

    def vision() -> Any:
        return family.vision(model, inputs)

    def llm() -> Any:
        with sites.prefill_scope(Prefill(visual=visual, units=units, attention_mask=mask)):
            return run_language_model(model, lm, lm_kwargs)

    return {"vision": vision, "llm": llm, "remove": sites.remove}


def _output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` from transformers 5.24 on, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def run_language_model(model: Any, lm: torch.nn.Module, lm_kwargs: dict[str, Any]) -> Tensor:
    """The language model on captured inputs, fresh cache, then the LM head on the last position:
    logits ``[B, 1, V]`` (the prefill of ``generate()``)."""
    kwargs = dict(lm_kwargs)
    kwargs.pop("past_key_values", None)  # a fresh cache: the language model makes one (named ``cache``
    kwargs.pop("cache", None)  # from transformers 5.24 on)
    kwargs["use_cache"] = True
    with torch.no_grad():
        hidden = lm(**kwargs).last_hidden_state
        return model.lm_head(hidden[:, -1:])


@dataclass
class FixedKeep(Stage):
    """Keeps positions chosen in advance (the oracle's selection): ``indices`` ``[B, k]`` per row."""

    indices: Any = None

    name: ClassVar[str] = "fixed"
    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "llm")

    def select(self, tokens: TokenSet, k: int) -> Keep:
        indices = self.indices.to(tokens.features.device)
        if indices.shape != (tokens.batch_size, k):
            raise RuntimeError(f"fixed selection holds {tuple(indices.shape)} positions; the site asks for "
                               f"{(tokens.batch_size, k)}")
        return Keep(indices=indices)


class _Capture:
    def __init__(self, module: torch.nn.Module) -> None:
        self.kwargs: dict[str, Any] = {}
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not self.kwargs:
            self.kwargs = dict(kwargs)
            if args:
                self.kwargs["input_ids"] = args[0]

    def remove(self) -> None:
        self.handle.remove()


def _capture_lm_inputs(lm: torch.nn.Module) -> _Capture:
    """Record the keyword arguments of the next call of the language model (its prefill)."""
    return _Capture(lm)


def oracle_inputs(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """What the (wrapped or not) model feeds its language model for ``inputs``: the oracle's input."""
    lm = family_for(model).language_model(model)
    seen = _capture_lm_inputs(lm)
    try:
        with torch.no_grad():
            _prefill(model, inputs)
    finally:
        seen.remove()
    return seen.kwargs


# --- one measurement ------------------------------------------------------------------------------
def _prefill(model: Any, inputs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def _time_runs(jobs: dict[str, Callable[[], Any]], runs: int, warmup: int, device: torch.device,
               warmed: Sequence[str] = ()) -> dict[str, list[float]]:
    """Milliseconds of each job, ``runs`` times after ``warmup``; the jobs alternate run by run.
    ``warmed``: jobs that have just run once already (that run counts as their first warm-up)."""
    from vtoken.stats import clock

    times: dict[str, list[float]] = {name: [] for name in jobs}
    for index in range(warmup + runs):
        for name, job in jobs.items():
            if index == 0 and warmup > 0 and name in warmed:
                continue
            start = clock(device)
            result = job()
            elapsed = clock(device) - start
            del result
            if index >= warmup:
                times[name].append(1000 * elapsed)
    return times


def _generate_stats(model: Any, inputs: dict[str, Any], decode_tokens: int, device: torch.device) -> dict[str, Any]:
    """One ``generate()`` of ``1 + decode_tokens`` tokens: decode tokens/s after the first token, the
    whole call's time, and the peak memory during it."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from vtoken.stats import clock

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
            stamps.append(clock(device))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    new = 1 + decode_tokens
    _reset_peak_memory(device)
    start = clock(device)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([Stamp()]))
    end = clock(device)
    peak = _peak_memory_mb(device)
    decode = None
    if decode_tokens and len(stamps) >= 2:
        decode = _round((len(stamps) - 1) * inputs["input_ids"].shape[0] / (stamps[-1] - stamps[0]), 2)
    return {"decode_tok_s": decode, "generate_ms": _round(1000 * (end - start)), "peak_mem_mb": peak}


def _row(label, site, keep, family, inputs, lm_kwargs, times) -> dict[str, Any]:
    row = {column: None for column in CSV_COLUMNS}
    row.update(method=label, site=site, keep=keep, runs=len(times))
    row["visual_tokens"] = _visual_in_llm(family, inputs, lm_kwargs)
    row["llm_tokens"] = int(_lm_length(lm_kwargs))
    row.update(_summary("prefill", times))
    return row


def _summary(prefix: str, times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    out = {f"{prefix}_ms": _round(statistics.median(ordered)), f"{prefix}_min_ms": _round(ordered[0]),
           f"{prefix}_max_ms": _round(ordered[-1])}
    if prefix == "prefill":
        out.update(prefill_q1_ms=_round(q1), prefill_q3_ms=_round(q3))
    return out


def _stage_times(state: Any, first_records: list) -> str:
    """``stage@site in->out: scoring, select ms`` for each stage, in the last timed run."""
    records = state.stats.records or first_records
    return "; ".join(f"{r.stage}@{r.site} {r.tokens_in}->{r.tokens_out}: scoring {r.scoring_ms:.2f} ms, "
                     f"select {r.select_ms:.2f} ms" for r in records)


def _lm_length(lm_kwargs: dict[str, Any]) -> int:
    embeds = lm_kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds.shape[1]
    return lm_kwargs["input_ids"].shape[1]


def _visual_in_llm(family, inputs, lm_kwargs) -> int:
    """Visual tokens per sample the language model received."""
    mask = lm_kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        length = int(mask[0].sum())
    else:
        length = _lm_length(lm_kwargs)
    return length - family.text_tokens(inputs)


def _flops(dims, family, inputs, layer_visual, vision_site: bool = False, records: Sequence = ()) -> dict[str, Any]:
    from vtoken.flops import prefill_flops

    images = family.images_per_sample(inputs)
    projector_tokens = None
    if vision_site:  # the projector sees what the tower kept
        outs = [r.tokens_out for r in records if r.site.startswith("vision")]
        if outs:
            projector_tokens = images * min(outs)
    split = prefill_flops(dims, patches=family.patches_per_image(), images=images,
                          text_tokens=family.text_tokens(inputs), layer_visual_tokens=layer_visual,
                          projector_tokens=projector_tokens)
    return {f"gflops_{name}": round(value / 1e9, 3) for name, value in split.items()}


def cache_bytes(cache: Any) -> int | None:
    """Bytes held by a key/value cache (every layer's keys and values)."""
    if cache is None:
        return None
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                value = getattr(layer, name, None)
                if isinstance(value, Tensor):
                    total += value.numel() * value.element_size()
        return total
    for entry in cache:  # legacy tuple of (key, value) per layer
        for value in entry:
            total += value.numel() * value.element_size()
    return total


# --- memory ---------------------------------------------------------------------------------------
def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # give freed heap memory back, then restart the peak-RSS count at the current RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    status = _proc_status()
    if "VmHWM" in status:
        return round(status["VmHWM"] / 1024, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        return None


def _proc_status() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    values[key] = int(rest.split()[0])  # kB
    except OSError:
        pass
    return values


def _rss_source() -> str:
    if os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK):
        return "process peak RSS (VmHWM, reset before each generate())"
    return "process peak RSS (lifetime maximum)"


# --- model families ------------------------------------------------------------------------------
class Family:
    """How to make inputs for, and run the vision part of, one model family."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config

    def language_model(self, model: Any) -> torch.nn.Module:
        return model.model.language_model

    def _text_ids(self, count: int, generator: torch.Generator, avoid: Sequence[int]) -> list[int]:
        vocab = int(self.config.text_config.vocab_size)
        low = min(100, vocab // 4)
        high = min(vocab, 30000)
        ids = torch.randint(low, high, (count * 2,), generator=generator).tolist()
        return [i for i in ids if i not in set(avoid)][:count]

    def text_tokens(self, inputs: dict[str, Any]) -> int:
        """Non-visual tokens per sample."""
        ids = inputs["input_ids"][0]
        return int(ids.numel()) - self.visual_per_image() * self.images_per_sample(inputs)

    def images_per_sample(self, inputs: dict[str, Any]) -> int:
        return 1


class LlavaFamily(Family):
    def side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def patches_per_image(self) -> int:
        return self.side() ** 2

    def visual_per_image(self) -> int:
        full = self.config.vision_feature_select_strategy != "default"
        return self.patches_per_image() + (1 if full else 0)

    def make_inputs(self, text_tokens, batch, seed, device, dtype) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)
        image = int(self.config.image_token_id)
        bos = getattr(self.config.text_config, "bos_token_id", None)
        bos = 1 if bos is None else int(bos)
        text = self._text_ids(text_tokens - 1, generator, avoid=[image, bos])
        before = len(text) // 2
        ids = [bos] + text[:before] + [image] * self.visual_per_image() + text[before:]
        input_ids = torch.tensor([ids] * batch, device=device)
        size = self.config.vision_config.image_size
        pixels = torch.randn(batch, 3, size, size, generator=generator).to(device=device, dtype=dtype)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}

    def vision(self, model, inputs) -> Any:
        with torch.no_grad():
            return model.model.get_image_features(
                pixel_values=inputs["pixel_values"], vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            ).pooler_output


class QwenFamily(Family):
    """Qwen2-VL / Qwen2.5-VL: one image per sample of ``grid`` x ``grid`` patches (48 x 48 patches of
    14 px, a 672 px image, gives 576 tokens after the 2x2 merge, as LLaVA-1.5's 336 px image does)."""

    grid: int = 48

    def patches_per_image(self) -> int:
        return self.grid * self.grid

    def visual_per_image(self) -> int:
        return self.patches_per_image() // int(self.config.vision_config.spatial_merge_size) ** 2

    def make_inputs(self, text_tokens, batch, seed, device, dtype) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)
        config = self.config
        special = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
                   config.vision_end_token_id]
        text = self._text_ids(text_tokens - 2, generator, avoid=special)
        before = len(text) // 2
        ids = (text[:before] + [config.vision_start_token_id] + [config.image_token_id] * self.visual_per_image()
               + [config.vision_end_token_id] + text[before:])
        types = [1 if i == config.image_token_id else 0 for i in ids]
        vision = config.vision_config
        values = 3 * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(batch * self.patches_per_image(), values, generator=generator)
        input_ids = torch.tensor([ids] * batch, device=device)
        return {
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": torch.tensor([types] * batch, dtype=torch.int, device=device),
            "pixel_values": pixels.to(device=device, dtype=dtype),
            "image_grid_thw": torch.tensor([[1, self.grid, self.grid]] * batch, device=device),
        }

    def vision(self, model, inputs) -> Any:
        with torch.no_grad():
            return model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_grid_thw=inputs["image_grid_thw"]).pooler_output


FAMILIES = {"llava": LlavaFamily, "qwen2_vl": QwenFamily, "qwen2_5_vl": QwenFamily}


def family_for(model: Any) -> Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"vtoken bench supports {', '.join(FAMILIES)} models; {model_type!r} is not supported yet")
    return FAMILIES[model_type](model)


# --- loading --------------------------------------------------------------------------------------
def embedded_model_path() -> Path | None:
    """The embedded scenes model (``vtoken/assets/scenes-llava``), when it is installed."""
    try:
        path = Path(str(resources.files("vtoken.assets").joinpath(EMBEDDED_MODEL)))
    except (ModuleNotFoundError, TypeError):
        return None
    return path if (path / "config.json").exists() else None


def _load_model(model, arch, random_init, depth_scale, dtype, device, attn_implementation, seed):
    if arch is not None:
        if model is not None:
            raise ValueError("give either a model (--model) or an architecture (--arch), not both")
        if not random_init:
            raise ValueError(f"--arch {arch} builds random weights; add --random-init to confirm (speed-only "
                             "numbers), or pass --model for real weights")
        from vtoken.eval.archs import build_arch

        built = build_arch(arch, depth_scale, dtype=dtype, device=device, attn_implementation=attn_implementation,
                           seed=seed)
        family_for(built)
        return built, f"{arch} (random init, depth x{_fraction_text(depth_scale)})"
    if model is None:
        path = embedded_model_path()
        if path is None:
            raise ValueError(f"the embedded model (vtoken/assets/{EMBEDDED_MODEL}) is not installed; pass --model "
                             "PATH_OR_ID, or --arch llava-1.5-7b --random-init --depth-scale 1/8")
        model = str(path)
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForImageTextToText

        name = str(model)
        loaded = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
        return loaded.to(device).eval(), name
    model = model.to(device=device, dtype=dtype).eval()
    return model, type(model).__name__


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _archs() -> list[str]:
    from vtoken.eval.archs import ARCHS

    return list(ARCHS)


# --- output ---------------------------------------------------------------------------------------
def write_results(result: dict[str, Any], out: Path, plots: bool = True) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.csv"]
    files[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    with open(files[1], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow(row)
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


def format_table(result: dict[str, Any]) -> str:
    header = (f"{'method':<22} {'keep':>5} {'LLM vis':>9} {'prefill ms':>10} {'min-max':>15} {'oracle ms':>9} "
              f"{'speedup':>7} {'oracle':>6} {'FLOPs':>6} {'meas/or':>7} {'sel %':>6} {'dec tok/s':>9} "
              f"{'peak MB':>8} {'KV MB':>7} {'GFLOPs v/p/llm':>20}")
    lines = [f"{result['model']} | {result['device']} | {result['dtype']} | threads {result['threads']} | "
             f"{result['runs']} runs after {result['warmup']} warm-up | text tokens {result['text_tokens']}",
             header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(
            f"{r['method']:<22} {_fmt(r['keep'], ''):>5} {_vis(r):>9} {r['prefill_ms']:>10.1f} "
            f"{_span(r['prefill_min_ms'], r['prefill_max_ms']):>15} {_fmt(r['oracle_ms'], '.1f'):>9} "
            f"{_fmt(r['speedup'], '.2f'):>7} {_fmt(r['oracle_speedup'], '.2f'):>6} "
            f"{_fmt(r['flops_speedup'], '.2f'):>6} "
            f"{_fmt(r['measured_over_oracle'], '.3f'):>7} {_fmt(r['overhead_pct'], '.2f'):>6} "
            f"{_fmt(r['decode_tok_s'], '.2f'):>9} {_fmt(r['peak_mem_mb'], '.0f'):>8} "
            f"{_fmt((r['kv_cache_bytes'] or 0) / 2**20, '.1f'):>7} "
            f"{r['gflops_vision']:.3g}/{r['gflops_projector']:.3g}/{r['gflops_llm']:.3g}".rjust(20)
        )
    return "\n".join(lines)


# --- small helpers --------------------------------------------------------------------------------
def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="vtoken bench", unit="config", disable=not enabled, file=sys.stderr)


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses (``dart@llm(2),pool``)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _fraction(text: str) -> float:
    """``--depth-scale``: ``1/8`` or ``0.125``, in (0, 1]."""
    text = str(text).strip()
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            value = float(numerator) / float(denominator)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"bad depth scale {text!r}; expected a fraction in (0, 1] "
                                         "such as 1/8 or 0.5")
    return value


def _fraction_text(value: float) -> str:
    if value == 1:
        return "1"
    inverse = 1 / value
    if abs(inverse - round(inverse)) < 1e-9:
        return f"1/{round(inverse)}"
    return f"{value:g}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 4)


def _round(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _vis(row: dict[str, Any]) -> str:
    """Visual tokens in the LLM: ``576`` or ``576>64`` (first layer > last layer, llm(K) pruning)."""
    first, last = row["visual_tokens"], row.get("visual_tokens_last")
    return str(first) if last in (None, first) else f"{first}>{last}"


def _span(low: float | None, high: float | None) -> str:
    return "-" if low is None else f"{low:.0f}-{high:.0f}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({name})"


def _api_command(model_name, methods, budgets, runs, warmup, decode_tokens, text_tokens, batch_size, seed, device,
                 dtype, threads, out) -> str:
    dtype_name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype))
    parts = ["vtoken", "bench", "--model", model_name, "--methods", ",".join(methods),
             "--budgets", ",".join(map(str, budgets)), "--runs", str(runs), "--warmup", str(warmup),
             "--decode-tokens", str(decode_tokens), "--text-tokens", str(text_tokens), "--batch-size",
             str(batch_size), "--seed", str(seed), "--device", str(device), "--dtype", dtype_name]
    if threads is not None:
        parts += ["--threads", str(threads)]
    if out is not None:
        parts += ["--out", str(out)]
    return shlex.join(parts)


__all__ = ["add_arguments", "run", "run_bench", "oracle_inputs", "run_language_model", "cache_bytes",
           "format_table", "write_results", "FixedKeep", "MethodSpec", "family_for"]
