"""Time the scoring kernels on CUDA: Triton vs the torch reference vs the eager full attention map.

    python -m vtoken.eval.bench_kernels [--dtype bf16|fp16|fp32] [--runs 50] [--require-gpu]

Shapes are those of LLaVA-1.5-7B (ViT-L/14-336 tower, Vicuna-7B decoder) and Qwen2.5-VL-7B (448 px image:
32 x 32 patches in the tower; 28 query / 4 key-value heads in the decoder). "eager map" is what an
``output_attentions`` eager model does: softmax(Q K^T) for all N query rows, then keep the rows needed.
The k-center rows also time one 16,000-token input (a long video's worth of tokens), where an N x N
float32 distance matrix would take 1 GB: both backends must stay far below that.
Each cell is the median of the timed runs (torch.cuda.Event) after warm-up, and the peak memory one call
adds on top of what was allocated before it (torch.cuda.max_memory_allocated).
Without a CUDA device (or triton) nothing is timed: exit status 0, or 1 with ``--require-gpu``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import torch

from vtoken.kernels import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# name, query heads, key heads, query rows, keys N, head dim, causal (decoder rows are the last ones)
ATTENTION_CASES = [
    ("LLaVA-1.5 ViT-L/14-336, [CLS] row", 16, 16, 1, 577, 64, False),
    ("LLaVA-1.5 LLM, last row", 32, 32, 1, 640, 128, True),
    ("LLaVA-1.5 LLM, last 8 rows", 32, 32, 8, 640, 128, True),
    ("Qwen2.5-VL-7B vision 448px, 1 row", 16, 16, 1, 1024, 80, False),
    ("Qwen2.5-VL-7B vision 448px, 256-row chunk", 16, 16, 256, 1024, 80, False),
    ("Qwen2.5-VL-7B LLM, last row", 28, 4, 1, 1300, 128, True),
    ("Qwen2.5-VL-7B LLM, last 8 rows", 28, 4, 8, 1300, 128, True),
]


def measure(fn: Callable[[], object], runs: int, warmup: int = 5) -> tuple[float, float]:
    """(median milliseconds, peak MiB added by one call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - before) / 2**20


def eager_map_rows(q_all: torch.Tensor, k: torch.Tensor, rows: slice, causal: bool) -> torch.Tensor:
    """softmax(Q K^T) over every query row (float32 softmax, as eager attention), then the rows kept."""
    heads, n = q_all.shape[1], k.shape[2]
    keys = k.repeat_interleave(heads // k.shape[1], dim=1)
    scores = (q_all @ keys.transpose(-1, -2)).float() * q_all.shape[-1] ** -0.5
    if causal:
        scores.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=k.device).triu(1), float("-inf"))
    return scores.softmax(dim=-1)[:, :, rows].mean(dim=1)


def bench(dtype: torch.dtype, runs: int) -> list[tuple]:
    from vtoken.kernels.attention import attention_rows_triton
    from vtoken.kernels.kcenter import kcenter_select_triton
    from vtoken.kernels.similarity import cosine_to_pivots_triton

    dev = "cuda"
    table = []
    for name, heads, kv_heads, count, n, dim, causal in ATTENTION_CASES:
        q_all = torch.randn(1, heads, n, dim, device=dev, dtype=dtype)
        k = torch.randn(1, kv_heads, n, dim, device=dev, dtype=dtype)
        rows = slice(n - count, n) if causal else slice(0, count)
        q = q_all[:, :, rows]
        limit = torch.arange(n - count, n, device=dev)[None] if causal else None
        triton_out = attention_rows_triton(q, k, causal_limit=limit)
        diff = (triton_out - reference.attention_rows(q, k, causal_limit=limit)).abs().max().item()
        table.append((name, *measure(partial(attention_rows_triton, q, k, causal_limit=limit), runs),
                      *measure(partial(reference.attention_rows, q, k, causal_limit=limit), runs),
                      *measure(partial(eager_map_rows, q_all, k, rows, causal), runs), f"{diff:.1e}"))

    for n, dim in ((576, 4096), (16_000, 64)):
        tokens = torch.randn(1, n, dim, device=dev, dtype=dtype)
        same = torch.equal(kcenter_select_triton(tokens, 64), reference.kcenter_select(tokens, 64))
        table.append((f"kcenter_select N={n} K=64 D={dim}",
                      *measure(partial(kcenter_select_triton, tokens, 64), runs),
                      *measure(partial(reference.kcenter_select, tokens, 64), runs), None, None,
                      "same picks" if same else "picks differ"))
    x = torch.randn(1, 576, 4096, device=dev, dtype=dtype)
    pivots = torch.randn(1, 8, 4096, device=dev, dtype=dtype)
    diff = (cosine_to_pivots_triton(x, pivots) - reference.cosine_to_pivots(x, pivots)).abs().max().item()
    table.append(("cosine_to_pivots N=576 P=8 D=4096",
                  *measure(lambda: cosine_to_pivots_triton(x, pivots), runs),
                  *measure(lambda: reference.cosine_to_pivots(x, pivots), runs), None, None, f"{diff:.1e}"))
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vtoken.eval.bench_kernels",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per cell (at least 20)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="exit 1, not 0, when there is no CUDA device or no triton (for scripted GPU runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = 1 if args.require_gpu else 0
    if not torch.cuda.is_available():
        print("No CUDA device: the kernel benchmark needs a GPU. Nothing was timed.")
        return missing
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed (pip install 'vtoken[kernels]'). Nothing was timed.")
        return missing
    runs = max(20, args.runs)
    print(f"{torch.cuda.get_device_name()} | {args.dtype} | median of {runs} runs"
          f" | torch {torch.__version__}")
    print("\n| case | triton ms | torch ms | eager map ms | triton MiB | torch MiB | eager map MiB "
          "| triton vs torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, t_ms, t_mib, r_ms, r_mib, e_ms, e_mib, check in bench(DTYPES[args.dtype], runs):
        cells = [f"{t_ms:.3f}", f"{r_ms:.3f}", "-" if e_ms is None else f"{e_ms:.3f}",
                 f"{t_mib:.1f}", f"{r_mib:.1f}", "-" if e_mib is None else f"{e_mib:.1f}"]
        print(f"| {name} | {' | '.join(cells)} | {check} |")
    print(f"\nRerun: python -m vtoken.eval.bench_kernels --dtype {args.dtype} --runs {runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
