"""``vtoken`` command line: ``vtoken eval``, ``vtoken bench``, ``vtoken demo``, ``vtoken methods``.

Each subcommand lives with its feature; this file only wires them. A feature module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
    listing = commands.add_parser("methods", help="list the registered methods and supported models")
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

    print("methods:", ", ".join(vtoken.list_methods()))
    print("models: ", ", ".join(vtoken.list_models()))
    return 0


def _missing(name: str, error: ImportError):
    def handler(args: argparse.Namespace) -> int:
        print(f"vtoken {name} needs an optional dependency that is not installed: {error}", file=sys.stderr)
        print("install it with: pip install 'vtoken[all]'", file=sys.stderr)
        return 1

    return handler


if __name__ == "__main__":
    sys.exit(main())
