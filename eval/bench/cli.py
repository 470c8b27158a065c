"""``vtoken bench``'s command line: its arguments, each checked in one line before anything loads, the
command that reproduces a run, and ``run`` (the subcommand's entry)."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from typing import Any

from ..grid import parse_budget
from .report import MAX_SPREAD, format_table
from .runner import DEFAULT_BUDGETS, DEFAULT_METHODS, DTYPES, archs, fraction_text, run_bench
from .scaling import SCALING_ARCH, SCALING_KEEP, format_scaling, run_scaling, scaling_defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vtoken.cli import int_at_least

    source = parser.add_argument_group("model (default: the embedded scenes-llava model)")
    source.add_argument("--model", default=None,
                        help="a Hugging Face id or local folder of a supported vision-language model")
    source.add_argument("--arch", default=None, choices=sorted(archs()),
                        help="build this architecture with random weights (needs --random-init)")
    source.add_argument("--random-init", action="store_true",
                        help="confirm that --arch is built with random weights (speed-only numbers)")
    source.add_argument("--depth-scale", default=None, type=_fraction,
                        help="with --arch: keep this fraction of the vision and LLM layers, widths exact "
                             "(e.g. 1/8: LLaVA-1.5-7B -> 3 ViT-L + 4 Llama-7B layers; default 1, with "
                             "--scaling 1/28 on CPU and 1/4 on GPU)")
    grid = parser.add_argument_group("what to measure")
    grid.add_argument("--methods", default=None, type=_method_list,
                      help="comma-separated methods; 'a+b' pipelines; 'method@site' sets the site, e.g. "
                           f"dart@llm(2) (default: {','.join(DEFAULT_METHODS)}; with --scaling kcenter,"
                           "kcenter@vision(3),dart@llm(2) on GPU, kcenter,dart on CPU)")
    grid.add_argument("--budgets", default=None, type=_budget_list,
                      help="comma-separated visual tokens kept per image (int >= 1) or fractions in (0, 1] "
                           f"(default: {','.join(map(str, DEFAULT_BUDGETS))}; with --scaling {SCALING_KEEP})")
    grid.add_argument("--runs", type=int_at_least(1), default=None,
                      help="timed prefill runs per configuration, each next to one of the unpruned model "
                           "(default 11; with --scaling 5 on GPU, 3 on CPU)")
    grid.add_argument("--warmup", type=int_at_least(0), default=None,
                      help="untimed runs before timing each configuration (default 1; --scaling on CPU: 0)")
    grid.add_argument("--generate-runs", type=int_at_least(1), default=None,
                      help="generate() calls per configuration, each next to one of the unpruned model, "
                           "for the total speed-up (default 3; --scaling on CPU: 1)")
    grid.add_argument("--decode-tokens", type=int_at_least(0), default=None,
                      help="tokens generated after the first one, for decode tokens/s (0: skip decode; "
                           "default 16; --scaling on CPU: 4)")
    grid.add_argument("--max-spread", type=_factor, default=MAX_SPREAD,
                      help="flag a configuration whose timed runs (the method's or its paired baseline's) "
                           "are more than this factor apart, max/min (default: %(default)s)")
    scaling = parser.add_argument_group("scaling (--scaling)")
    scaling.add_argument("--scaling", action="store_true",
                         help="sweep the visual tokens per image and the batch size instead of the budgets "
                              f"(default model: --arch {SCALING_ARCH} with random weights)")
    scaling.add_argument("--scaling-tokens", default=None, type=_int_list,
                         help="visual tokens per image, comma-separated (default: 576,2880,5000,16000 on GPU, "
                              "64,144,576 on CPU)")
    scaling.add_argument("--scaling-batches", default=None, type=_int_list,
                         help="batch sizes, comma-separated (default: 1,4,16 on GPU, 1,2 on CPU)")
    grid.add_argument("--text-tokens", type=int_at_least(2), default=48,
                      help="text tokens of the synthetic prompt (besides the image placeholders)")
    grid.add_argument("--video-frames", type=int_at_least(2), default=None,
                      help="a synthetic video clip of this many frames in each sample instead of the image "
                           "(Qwen2-VL, Qwen2.5-VL, Qwen3-VL: frames of 112 x 112 px, 16 tokens per pair of frames, "
                           "256 for 32 frames: 11 min for 4 methods, --runs 9, at 1/8 depth on 2 CPU cores; "
                           "LLaVA-OneVision: the tower's size, 196 tokens a frame for the 7B), "
                           "for temporal methods such as dycoke, holitom, "
                           "holitom_full; budgets are per clip")
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


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset with the defaults of the mode (bench, or --scaling on this device)."""
    if args.scaling:
        defaults = scaling_defaults(args.device)
        if args.model is None and args.arch is None:
            args.arch, args.random_init = SCALING_ARCH, True
        preset = dict(methods=",".join(defaults["methods"]), budgets=str(SCALING_KEEP),
                      depth_scale=defaults["depth_scale"] if args.arch else 1.0, runs=defaults["runs"],
                      warmup=defaults["warmup"], generate_runs=defaults["generate_runs"],
                      decode_tokens=defaults["decode_tokens"], scaling_tokens=",".join(map(str, defaults["tokens"])),
                      scaling_batches=",".join(map(str, defaults["batches"])))
    else:
        preset = dict(methods=",".join(DEFAULT_METHODS), budgets=",".join(map(str, DEFAULT_BUDGETS)), depth_scale=1.0,
                      runs=11, warmup=1, generate_runs=3, decode_tokens=16)
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def run(args: argparse.Namespace) -> int:
    resolve_defaults(args)
    if args.scaling and getattr(args, "video_frames", None) is not None:
        return _refused(ValueError("--video-frames is for a bench run; --scaling sweeps image sizes"))
    if args.scaling:
        return _run_scaling(args)
    try:
        result = run_bench(
            model=args.model, arch=args.arch, random_init=args.random_init, depth_scale=args.depth_scale,
            methods=split_list(args.methods), budgets=[parse_budget(b) for b in split_list(args.budgets)],
            runs=args.runs, warmup=args.warmup, decode_tokens=args.decode_tokens, text_tokens=args.text_tokens,
            batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
            threads=args.threads, attn_implementation=args.attn, out=args.out, plots=not args.no_plots,
            progress=not args.quiet, command=command_line(args), generate_runs=args.generate_runs,
            max_spread=args.max_spread, video_frames=getattr(args, "video_frames", None),
        )
    except (ValueError, NotImplementedError, OSError) as error:
        return _refused(error)
    return _show(format_table(result), result)


def _refused(error: Exception) -> int:
    print(f"vtoken bench: {error}", file=sys.stderr)
    return 2


def _show(table: str, result: dict[str, Any]) -> int:
    print(table)
    print(f"\nwrote {result['files']}" if result.get("files") else "")
    print(f"rerun with:\n  {result['command']}")
    return 0


def _run_scaling(args: argparse.Namespace) -> int:
    try:
        result = run_scaling(
            args.model, arch=args.arch, random_init=args.random_init, depth_scale=args.depth_scale,
            methods=split_list(args.methods), keep=[parse_budget(b) for b in split_list(args.budgets)],
            tokens=[int(t) for t in split_list(args.scaling_tokens)],
            batches=[int(b) for b in split_list(args.scaling_batches)], runs=args.runs, warmup=args.warmup,
            decode_tokens=args.decode_tokens, generate_runs=args.generate_runs, text_tokens=args.text_tokens,
            seed=args.seed, device=args.device, dtype=args.dtype, threads=args.threads,
            attn_implementation=args.attn, out=args.out, plots=not args.no_plots, progress=not args.quiet,
            command=command_line(args), max_spread=args.max_spread,
        )
    except (ValueError, NotImplementedError, OSError) as error:
        return _refused(error)
    return _show(format_scaling(result), result)


def _int_list(text: str) -> str:
    """``--scaling-tokens`` / ``--scaling-batches``: comma-separated ints >= 1; returns the text."""
    values = split_list(text)
    if not values or not all(v.isdigit() and int(v) >= 1 for v in values):
        raise argparse.ArgumentTypeError(f"bad list {text!r}; expected comma-separated ints >= 1, e.g. 576,2880")
    return text


def _factor(text: str) -> float:
    """``--max-spread``: a factor > 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 1:
        raise argparse.ArgumentTypeError(f"bad factor {text!r}; expected a number > 1 such as 1.5")
    return value


def _checked_list(text: str, check: Any, what: str, example: str) -> str:
    """A comma-separated option with every item checked by ``check`` (an argparse type); returns the text."""
    items = split_list(text)
    if not items:
        raise argparse.ArgumentTypeError(f"no {what} given; pass e.g. {example}")
    for item in items:
        check(item)
    return text


def _method_list(text: str) -> str:
    """``--methods``: every comma-separated spec checked (``vtoken.cli.method_spec``)."""
    from vtoken.cli import method_spec

    return _checked_list(text, method_spec, "method", "--methods dart,kcenter")


def _budget_list(text: str) -> str:
    """``--budgets``: every comma-separated budget checked (``vtoken.cli.budget``)."""
    from vtoken.cli import budget

    return _checked_list(text, budget, "budget", "--budgets 64,128")


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
    parts = ["vtoken", "bench"] + (["--scaling"] if getattr(args, "scaling", False) else [])
    if args.arch:
        parts += ["--arch", args.arch]
        if args.random_init:
            parts.append("--random-init")
        if args.depth_scale != 1:
            parts += ["--depth-scale", fraction_text(args.depth_scale)]
    elif args.model:
        parts += ["--model", args.model]
    parts += ["--methods", args.methods, "--budgets", args.budgets, "--runs", str(args.runs),
              "--warmup", str(args.warmup), "--generate-runs", str(args.generate_runs),
              "--decode-tokens", str(args.decode_tokens), "--text-tokens", str(args.text_tokens)]
    if getattr(args, "scaling", False):
        parts += ["--scaling-tokens", args.scaling_tokens, "--scaling-batches", args.scaling_batches]
    else:
        parts += ["--batch-size", str(args.batch_size)]
        if getattr(args, "video_frames", None) is not None:
            parts += ["--video-frames", str(args.video_frames)]
    parts += ["--seed", str(args.seed), "--device", args.device, "--dtype", args.dtype,
              "--max-spread", f"{args.max_spread:g}"]
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
