"""One measurement: a prefill as ``generate()`` runs it, timed runs of several jobs taken in turn, one
``generate()`` with its decode speed and peak memory, and the bytes of a KV cache."""

from __future__ import annotations

import contextlib
import math
import statistics
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .system import peak_memory_mb, reset_peak_memory


def prefill(model: Any, inputs: dict[str, Any]) -> Any:
    """The prefill ``generate()`` runs: a cache, logits for the last position only."""
    with torch.no_grad():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def time_runs(jobs: dict[str, Callable[[], Any]], runs: int, warmup: int, device: torch.device,
              warmed: Sequence[str] = (), around: dict[str, Callable[[], Any]] | None = None
              ) -> dict[str, list[float]]:
    """Milliseconds of each job, ``runs`` times after ``warmup``; the jobs alternate run by run, so the
    i-th runs of all jobs see the same machine load (``paired_ratio`` divides them pair by pair).
    ``warmed``: jobs that have just run once already (that run counts as their first warm-up).
    ``around``: per job, a context-manager factory entered before and left after each of its runs,
    outside the timed part (e.g. the unpruned model: unwrap before, wrap again after)."""
    from vtoken.stats import clock

    around = around or {}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for index in range(warmup + runs):
        for name, job in jobs.items():
            if index == 0 and warmup > 0 and name in warmed:
                continue
            with around[name]() if name in around else contextlib.nullcontext():
                start = clock(device)
                result = job()
                elapsed = clock(device) - start
                del result
            if index >= warmup:
                times[name].append(1000 * elapsed)
    return times


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """The median of the per-pair ratios ``numerators[i] / denominators[i]`` (runs taken next to each
    other): the slow drift of a shared machine cancels within each pair, which the ratio of two medians
    would keep. None when there is no pair."""
    pairs = [a / b for a, b in zip(numerators, denominators) if b]
    return rounded(statistics.median(pairs), 4) if pairs else None


def median_interval(numerators: Sequence[float], denominators: Sequence[float],
                    coverage: float = 0.9) -> tuple[float, float] | None:
    """A distribution-free interval for the median of the per-pair ratios: the order statistics
    ``x(r)`` and ``x(n-r+1)`` with the largest r whose binomial coverage is at least ``coverage`` (5
    or 7 pairs: min and max; 11: the 3rd and 9th). Two runs whose intervals are both narrow give
    medians close to each other; a wide one means the median could move on a rerun. None for 1 pair."""
    pairs = sorted(a / b for a, b in zip(numerators, denominators) if b)
    n = len(pairs)
    if n < 2:
        return None
    r = 1
    while r + 1 <= n // 2 and 1 - 2 * sum(math.comb(n, i) for i in range(r + 1)) / 2 ** n >= coverage:
        r += 1
    return rounded(pairs[r - 1], 4), rounded(pairs[n - r], 4)


def spread(*series: Sequence[float]) -> float | None:
    """The largest max/min over the given timing series (1.0: every run alike); None when empty."""
    ratios = [max(times) / min(times) for times in series if times and min(times) > 0]
    return rounded(max(ratios), 3) if ratios else None


def generate_stats(model: Any, inputs: dict[str, Any], decode_tokens: int, device: torch.device) -> dict[str, Any]:
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
    reset_peak_memory(device)
    start = clock(device)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([Stamp()]))
    end = clock(device)
    peak = peak_memory_mb(device)
    decode = None
    if decode_tokens and len(stamps) >= 2:
        decode = rounded((len(stamps) - 1) * inputs["input_ids"].shape[0] / (stamps[-1] - stamps[0]), 2)
    batch = inputs["input_ids"].shape[0]
    return {"decode_tok_s": decode, "generate_ms": rounded(1000 * (end - start)), "peak_mem_mb": peak,
            "generate_tok_s": rounded(batch * new / (end - start), 2)}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` from transformers 5.24 on, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


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


def rounded(value: float, digits: int = 3) -> float:
    """A measured value as the results keep it."""
    return round(float(value), digits)

