"""``vtoken bench``'s command line: its arguments, each checked in one line before anything loads, the
command that reproduces a run, and ``run`` (the subcommand's entry)."""

from __future__ import annotations

import argparse
import math
import shlex
import sys

from ..grid import parse_budget
from .report import format_table
from .runner import DEFAULT_BUDGETS, DEFAULT_METHODS, DTYPES, archs, fraction_text, run_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vtoken.cli import int_at_least

    source = parser.add_argument_group("model (default: the embedded scenes-llava model)")
    source.add_argument("--model", default=None,
                        help="a Hugging Face id or local folder of a supported vision-language model")
    source.add_argument("--arch", default=None, choices=sorted(archs()),
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
            methods=split_list(args.methods), budgets=[parse_budget(b) for b in split_list(args.budgets)],
            runs=args.runs, warmup=args.warmup, decode_tokens=args.decode_tokens, text_tokens=args.text_tokens,
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

    specs = split_list(text)
    if not specs:
        raise argparse.ArgumentTypeError("no method given; pass e.g. --methods dart,kcenter")
    for spec in specs:
        method_spec(spec)
    return text


def _budget_list(text: str) -> str:
    """``--budgets``: every comma-separated budget checked (``vtoken.cli.budget``); returns the text."""
    from vtoken.cli import budget

    budgets = split_list(text)
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
            parts += ["--depth-scale", fraction_text(args.depth_scale)]
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


def split_list(text: str) -> list[str]:
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
