"""One configuration's row: the unpruned baseline or a method at one budget, measured against its oracle
(prefill times, scoring and selection shares, KV cache, decode speed, peak memory, analytic FLOPs)."""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from vtoken.flops import ModelDims, VisualCounts, prefill_flops
from vtoken.sites import Site

from .oracle import LMInputs, llm_oracle, pre_llm_oracle, vision_oracle
from .report import CSV_COLUMNS
from .timing import (
    cache_bytes,
    generate_stats,
    median_interval,
    output_cache,
    paired_ratio,
    prefill,
    rounded,
    spread,
    time_runs,
)


@dataclass
class Workload:
    """What every configuration of one run is measured on: the model, its family's integration
    (``Integration.for_model``: the bench asks it, and holds no family knowledge itself), the synthetic
    inputs, what they hold, the model's FLOPs dimensions and the device."""

    model: Any
    family: Any
    inputs: dict[str, Any]
    counts: VisualCounts
    dims: ModelDims
    device: torch.device

    @property
    def text_tokens(self) -> int:
        """Non-visual tokens per sample."""
        return int(self.inputs["input_ids"][0].numel()) - self.counts.images * self.counts.tokens

    def capture(self) -> LMInputs:
        """Record what the model feeds its language model in the next call."""
        return LMInputs(self.family.language_model())


def relative_to(row: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Fill a method's FLOPs speed-up against the baseline's row. The timed ratios (``speedup``,
    ``oracle_speedup``, ``total_speedup``, ``measured_over_oracle``) come from runs paired with the
    baseline in ``measure_method``; only where a row lacks them (no pairs) the medians are divided."""
    row["flops_speedup"] = _ratio(baseline["gflops_total"], row["gflops_total"])
    for name, top, bottom in (("speedup", baseline["prefill_ms"], row["prefill_ms"]),
                              ("oracle_speedup", baseline["prefill_ms"], row["oracle_ms"]),
                              ("measured_over_oracle", row["oracle_ms"], row["prefill_ms"]),
                              ("total_speedup", baseline["generate_ms"], row["generate_ms"])):
        if row.get(name) is None:
            row[name] = _ratio(top, bottom)


@contextlib.contextmanager
def unpruned(model: Any, spec: Any, keep: int | float) -> Iterator[Any]:
    """The wrapped model as it was before ``wrap``, for the block (``vtoken.unwrap`` before and the same
    ``vtoken.wrap`` after: about 0.01 ms each, outside any timed part)."""
    import vtoken

    vtoken.unwrap(model)
    try:
        yield model
    finally:
        vtoken.wrap(model, spec.method, keep=keep, **spec.options)


def measure_baseline(work: Workload, runs: int, warmup: int, decode_tokens: int) -> dict[str, Any]:
    """The unpruned model's row."""
    model, inputs = work.model, work.inputs
    seen = work.capture()
    with torch.no_grad():
        output = prefill(model, inputs)
    seen.remove()
    kv = cache_bytes(output_cache(output))
    del output
    jobs = {"prefill": lambda: prefill(model, inputs)}
    times = time_runs(jobs, runs, warmup, work.device, warmed=["prefill"])["prefill"]
    full_visual = work.counts.tokens * work.counts.images
    layers = work.dims.llm.layers
    row = _row(work, "none", "-", full_visual, seen.kwargs, times)
    row["visual_tokens_last"] = full_visual
    row.update(oracle_kind="-", scoring_ms=0.0, select_ms=0.0, overhead_pct=0.0, stage_times="")
    row.update(_flops(work, [full_visual] * layers))
    row.update(kv_cache_bytes=kv)
    row.update(generate_stats(model, inputs, decode_tokens, work.device))
    row.update(speedup=1.0, oracle_speedup=1.0, flops_speedup=1.0, measured_over_oracle=1.0, total_speedup=1.0,
               baseline_ms=row["prefill_ms"], spread=spread(times))
    return row


def measure_method(work: Workload, spec: Any, keep: int | float, runs: int, warmup: int,
                   decode_tokens: int, generate_runs: int = 1) -> dict[str, Any]:
    """The row of one method (a ``MethodSpec``) at one budget, wrapped for the measurement and unwrapped after.
    Its timed prefill runs alternate with the oracle's and the unpruned model's, and its ``generate_runs``
    generate() calls with the unpruned model's: every timed ratio is the median of per-pair ratios."""
    import vtoken

    model, inputs = work.model, work.inputs

    vtoken.wrap(model, spec.method, keep=keep, **spec.options)
    try:
        state = model.vtoken
        sites = state.pipeline.sites
        seen = work.capture()
        with torch.no_grad():
            output = prefill(model, inputs)
        seen.remove()
        records = list(state.stats.records)
        layer_tokens = list(state.stats.llm_layer_tokens)
        kept = {site: list(value) for site, value in state.stats.kept.items()}
        last_call = state.integration.last_call
        prefill_call = None if last_call is None else last_call.parts.get("decoder")
        kv = cache_bytes(output_cache(output))
        del output
        llm_sites = [site for site in sites if site.kind == "llm"]
        has_vision_site = any(site.kind == "vision" for site in sites)
        selection: list[tuple[float, float]] = []  # (scoring, select) ms of each run

        def measured() -> Any:
            result = prefill(model, inputs)
            records = model.vtoken.stats.records  # a new state after each baseline run (wrap again)
            selection.append((sum(r.scoring_ms for r in records), sum(r.select_ms for r in records)))
            return result

        vision_sites = [site for site in sites if site.kind == "vision"]
        decode_site = any(site.kind == "decode" for site in sites)
        around = {"baseline": lambda: unpruned(model, spec, keep)}
        if decode_site and all(site.kind == "decode" for site in sites):
            oracle, oracle_kind = None, "n/a (decode site: the prefill is not pruned)"
        elif has_vision_site and len(vision_sites) < len(sites):
            oracle, oracle_kind = None, "n/a (vision(L) with another site)"
        elif has_vision_site:
            oracle = vision_oracle(work.family, inputs, seen.kwargs, kept, vision_sites,
                                   lambda: unpruned(model, spec, keep))
            oracle_kind = "fixed selection at " + ",".join(map(str, vision_sites))
            around["oracle_vision"] = oracle["around_vision"]
        elif llm_sites:
            oracle = llm_oracle(work.family, inputs, seen.kwargs, prefill_call, kept, llm_sites)
            oracle_kind = "fixed selection at " + ",".join(map(str, llm_sites))
        else:
            oracle, oracle_kind = pre_llm_oracle(work.family, inputs, seen.kwargs), "shrunk LLM input"
        jobs = {"prefill": measured, "baseline": lambda: prefill(model, inputs)}
        if oracle is not None:
            jobs.update(oracle_vision=oracle["vision"], oracle_llm=oracle["llm"])
        try:  # the baseline runs on the unwrapped model (the llm(K) oracle's inert hooks stay on its decoder)
            times = time_runs(jobs, runs, warmup, work.device, warmed=["prefill"], around=around)
        finally:
            if oracle is not None and "remove" in oracle:
                oracle["remove"]()
        per_stage = _stage_times(model.vtoken, records)
        row = _row(work, spec.label, ",".join(map(str, sites)), keep, seen.kwargs, times["prefill"])
        row["oracle_kind"] = oracle_kind
        if oracle is not None:
            totals = [vision + llm for vision, llm in zip(times["oracle_vision"], times["oracle_llm"])]
            row.update(_summary("oracle", totals))
            row["oracle_vision_ms"] = rounded(statistics.median(times["oracle_vision"]))
            row["oracle_llm_ms"] = rounded(statistics.median(times["oracle_llm"]))
            # each timed run of the method is next to one of the oracle: the median of the paired ratios
            # cancels the slow drift of a shared machine that the ratio of two medians would keep
            row["measured_over_oracle"] = paired_ratio(totals, times["prefill"])
            row["oracle_speedup"] = paired_ratio(times["baseline"], totals)
        row["speedup"] = paired_ratio(times["baseline"], times["prefill"])
        interval = median_interval(times["baseline"], times["prefill"])
        row["speedup_lo"], row["speedup_hi"] = interval if interval else (None, None)
        row["baseline_ms"] = rounded(statistics.median(times["baseline"]))
        row["spread"] = spread(times["prefill"], times["baseline"])
        timed = selection[-runs:]  # the timed runs, warm-up left out
        scoring = statistics.median(a for a, _ in timed)
        select = statistics.median(b for _, b in timed)
        both = statistics.median(a + b for a, b in timed)
        row.update(
            scoring_ms=rounded(scoring), select_ms=rounded(select),
            overhead_pct=rounded(100 * both / row["prefill_ms"], 2), stage_times=per_stage,
        )
        visual_in_llm = _visual_in_llm(work, seen.kwargs)
        per_layer = layer_tokens if layer_tokens else [visual_in_llm] * work.dims.llm.layers
        row["visual_tokens_last"] = per_layer[-1]
        row.update(_flops(work, per_layer, vision_site=has_vision_site, records=records))
        row["kv_cache_bytes"] = kv
        row.update(paired_generate(work, spec, keep, decode_tokens, generate_runs))
        if decode_site:
            row.update(decode_cache_bytes(work, spec, keep, decode_tokens))
        return row
    finally:
        if hasattr(model, "vtoken"):
            vtoken.unwrap(model)


def paired_generate(work: Workload, spec: Any, keep: int | float, decode_tokens: int,
                    pairs: int) -> dict[str, Any]:
    """``pairs`` generate() calls of the wrapped model, each next to one of the unpruned model: the
    method's decode tokens/s, generate tokens/s and peak memory (medians), and ``total_speedup``, the
    median of the per-pair ratios of generate() times."""
    model, mine, base = work.model, [], []
    for _ in range(max(1, pairs)):
        with unpruned(model, spec, keep):
            base.append(generate_stats(model, work.inputs, decode_tokens, work.device))
        mine.append(generate_stats(model, work.inputs, decode_tokens, work.device))
    out = {}
    for name in ("decode_tok_s", "generate_ms", "peak_mem_mb", "generate_tok_s"):
        values = [m[name] for m in mine if m[name] is not None]
        out[name] = rounded(statistics.median(values), 2) if values else None
    out["total_speedup"] = paired_ratio([b["generate_ms"] for b in base], [m["generate_ms"] for m in mine])
    base_decode = [b["decode_tok_s"] for b in base if b["decode_tok_s"] is not None]
    out["base_decode_tok_s"] = rounded(statistics.median(base_decode), 2) if base_decode else None
    pairs = [(m["decode_tok_s"], b["decode_tok_s"]) for m, b in zip(mine, base)
             if m["decode_tok_s"] and b["decode_tok_s"]]
    out["decode_speedup"] = paired_ratio([m for m, _ in pairs], [b for _, b in pairs])
    return out


def decode_cache_bytes(work: Workload, spec: Any, keep: int | float, decode_tokens: int) -> dict[str, Any]:
    """A ``decode`` site frees KV entries while generating: the cache a generate() leaves, wrapped and unpruned
    (the cache after the prefill is the same for both)."""
    from vtoken.integrations.decode_cache import generated_cache_bytes

    new_tokens = max(decode_tokens, 1) + 1
    mine = generated_cache_bytes(work.model, work.inputs, new_tokens)
    with unpruned(work.model, spec, keep):
        base = generated_cache_bytes(work.model, work.inputs, new_tokens)
    return {"kv_after_decode_bytes": mine, "base_kv_after_decode_bytes": base}


def _row(work: Workload, label: str, site: str, keep: Any, lm_kwargs: dict[str, Any],
         times: list[float]) -> dict[str, Any]:
    row = {column: None for column in CSV_COLUMNS}
    row.update(method=label, site=site, keep=keep, runs=len(times))
    row["visual_tokens"] = _visual_in_llm(work, lm_kwargs)
    row["llm_tokens"] = int(_lm_length(lm_kwargs))
    row.update(_summary("prefill", times))
    return row


def _summary(prefix: str, times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    out = {f"{prefix}_ms": rounded(statistics.median(ordered)), f"{prefix}_min_ms": rounded(ordered[0]),
           f"{prefix}_max_ms": rounded(ordered[-1])}
    if prefix == "prefill":
        out.update(prefill_q1_ms=rounded(q1), prefill_q3_ms=rounded(q3))
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


def _visual_in_llm(work: Workload, lm_kwargs: dict[str, Any]) -> int:
    """Visual tokens per sample the language model received."""
    mask = lm_kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        length = int(mask[0].sum())
    else:
        length = _lm_length(lm_kwargs)
    return length - work.text_tokens


def _flops(work: Workload, layer_visual: Sequence[int], vision_site: bool = False,
           records: Sequence = ()) -> dict[str, Any]:
    images = work.counts.images
    projector_tokens, vision_tokens = None, None
    if vision_site:  # the projector sees what the tower kept
        outs = [r.tokens_out for r in records if r.site.startswith("vision")]
        if outs:
            projector_tokens = images * min(outs)
        vision_tokens = vision_layer_tokens(work.dims, work.counts.patches, records)
    split = prefill_flops(work.dims, patches=work.counts.patches, images=images,
                          text_tokens=work.text_tokens, layer_visual_tokens=layer_visual,
                          projector_tokens=projector_tokens, vision_layer_tokens=vision_tokens)
    return {f"gflops_{name}": round(value / 1e9, 3) for name, value in split.items()}


def vision_layer_tokens(dims: Any, patches: int, records: Sequence) -> list[int] | None:
    """Tokens per image (prefix included) each encoder block sees when ``vision(L)`` stages prune inside
    the tower: block L itself still runs on what reached it, the blocks after it on what L kept. A site's
    units are the projector's groups (Qwen: 2x2 merge groups of 4 patches), hence the factor."""
    vision, group = dims.vision, dims.projector.group
    cuts = {}
    for record in records:  # the last stage at a site leaves what the next block sees
        site = Site.parse(record.site)
        if site.kind == "vision":
            cuts[site.layer % vision.layers] = record.tokens_out
    if not cuts:
        return None
    tokens, seen = [], vision.prefix + patches
    for index in range(vision.layers):
        tokens.append(seen)
        if index in cuts:
            seen = vision.prefix + cuts[index] * group
    return tokens


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 4)

