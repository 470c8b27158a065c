"""``vtoken`` command line: ``vtoken eval``, ``vtoken bench``, ``vtoken demo``, ``vtoken methods``.

Each subcommand lives with its feature; this file only wires them. A feature module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable

SUBCOMMANDS = {
    "eval": ("vtoken.eval.scenes_benchmark", "accuracy vs kept tokens on the offline scenes benchmark"),
    "bench": ("vtoken.eval.bench", "prefill latency, decode speed, memory and FLOPs vs the zero-overhead oracle"),
    "demo": ("vtoken.demo", "Gradio demo: answers side by side and the kept tokens on the image"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtoken", description="Training-free visual token pruning and merging for vision-language models."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = commands.add_parser("methods", help="list the registered methods and supported models; with a "
                                  "method's name, its stages, sites and options")
    listing.add_argument("name", nargs="?", help="a method (stage or named pipeline) to describe")
    listing.set_defaults(handler=_list)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:  # an optional extra is missing
            sub.set_defaults(handler=_missing(name, error))
            continue
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


def _list(args: argparse.Namespace) -> int:
    import vtoken

    if args.name is None:
        print("methods:", ", ".join(vtoken.list_methods()))
        print("models: ", ", ".join(vtoken.list_models()))
        return 0
    from .registry import PIPELINES, STAGES

    if args.name in PIPELINES:
        named = PIPELINES[args.name]
        print(f"{args.name}: the pipeline {named.spec}, budgets {named.factors} x keep")
        names = [part.split("@")[0] for part in named.spec.split("+")]
    elif args.name in STAGES:
        names = [args.name]
    else:
        print(f"unknown method {args.name!r}; registered: {', '.join(vtoken.list_methods())}", file=sys.stderr)
        return 2
    for name in names:
        stage = STAGES[name]
        print(f"{name}: sites {', '.join(stage.site_kinds)} (default {stage.default_site})")
        for option in dataclasses.fields(stage):
            print(f"  {option.name} = {option.default!r}: {option.metadata.get('help', '')}")
    return 0


def _missing(name: str, error: ImportError):
    def handler(args: argparse.Namespace) -> int:
        print(f"vtoken {name} needs an optional dependency that is not installed: {error}", file=sys.stderr)
        print("install it with: pip install 'vtoken[all]'", file=sys.stderr)
        return 1

    return handler


# --- argument types shared by the subcommands ---------------------------------------------------------
# Each raises argparse.ArgumentTypeError with the accepted values, so a bad argument ends in argparse's
# one-line "error: argument --x: ..." on stderr and exit status 2, before any model is loaded.
BUDGET_FORMS = "tokens per image (an int >= 1, e.g. 64) or a fraction of the tokens in (0, 1] (e.g. 0.25)"


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int; expected an int >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is out of range; expected an int >= {minimum}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def budget(text: str) -> int | float:
    """An argparse type: one budget, ``64`` (tokens per image) or ``0.25`` (a fraction of the tokens)."""
    from vtoken.budget import parse_budget

    try:
        value = parse_budget(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"bad budget {text!r}; a budget is {BUDGET_FORMS}") from None
    return value


def method_spec(text: str) -> str:
    """An argparse type: a method spec as ``vtoken.wrap`` takes it (``dart``, ``cls_attn+kcenter``,
    ``dart@llm(2)``, ``cls_attn@vision(8)+kcenter``), checked by building its pipeline: an unknown method
    or site is refused with the accepted values. Returns it as given."""
    import vtoken

    try:
        vtoken.build_pipeline(text.strip(), None, {})
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"bad method {text!r}: {error}") from None
    return text


def device_name(text: str) -> str:
    """An argparse type: a torch device (``cpu``, ``cuda``, ``cuda:1``, ``mps``); CUDA only where present."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"bad device {text!r}; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available here; use cpu")
    return text


if __name__ == "__main__":
    sys.exit(main())
