"""``vtoken demo``: a Gradio page that runs one question on one image twice, with every visual token and
with a vtoken method, and shows both answers, their latency and token counts, and which tokens were kept.

    vtoken demo                                  # the embedded scenes model, http://127.0.0.1:7860
    vtoken demo --model llava-hf/llava-1.5-7b-hf --port 8080

From Python::

    from vtoken.demo import Comparer, build_demo, launch
    demo = build_demo(model_path="path/to/llava")         # or build_demo(model, processor)
    launch(demo)
    Comparer(model, processor).compare(image, "what is left of the cube?", "dart", 64)   # a plain dict

Modules: ``prompts`` (the prompt format each model family expects, checked at start-up), ``comparison``
(the two runs under one lock per model), ``overlay`` (kept tokens drawn on the image), ``loading``
(model and sample scenes), ``page`` (the Gradio page).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

if importlib.util.find_spec("gradio") is None:  # the `demo` extra; the CLI turns this into an install hint
    raise ImportError("vtoken demo needs gradio: pip install 'vtoken[demo]'")

from .comparison import Comparer, demo_methods, method_setup, model_lock, parse_budget, read_image
from .loading import (
    DEFAULT_QUESTION,
    EMBEDDED_MODEL,
    embedded_model_path,
    load_model,
    load_samples,
    model_name,
    samples_path,
)
from .overlay import legend_text, model_view, render_overlay, trace_tokens
from .page import DEFAULT_HOST, DEFAULT_PORT, build_demo, launch
from .prompts import PromptError, PromptFormat, prompt_format

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_QUESTION",
    "EMBEDDED_MODEL",

    "Comparer",
    "PromptError",
    "PromptFormat",
    "add_arguments",
    "build_demo",
    "demo_methods",
    "embedded_model_path",
    "launch",
    "legend_text",
    "load_model",
    "load_samples",
    "method_setup",
    "model_lock",
    "model_name",
    "model_view",
    "parse_budget",
    "prompt_format",
    "read_image",
    "render_overlay",
    "run",
    "samples_path",
    "trace_tokens",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face model id or local directory (default: the embedded scenes model)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, help="torch dtype, e.g. bfloat16 (default: float16 on cuda, "
                        "float32 on cpu)")
    parser.add_argument("--samples", default=None, help="folder of sample images and questions "
                        "(default: the package's assets/samples)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default 32)")
    parser.add_argument("--prompt-template", default=None,
                        help="prompt with {image} where the image goes and {question}, e.g. "
                        "'USER: {image}\\n{question} ASSISTANT:' (default: the processor's chat template, "
                        "else the model family's plain format; checked at start-up)")


def run(args: argparse.Namespace) -> int:
    from . import loading

    try:
        model, processor = loading.load_model(args.model, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as error:  # no such model, or no access to it
        print(f"vtoken demo: cannot load {args.model or 'the embedded model'}: {error}", file=sys.stderr)
        return 1
    try:
        demo = build_demo(model, processor, samples=args.samples, max_new_tokens=args.max_new_tokens,
                          prompt_template=args.prompt_template)
    except PromptError as error:
        print(f"vtoken demo: {model_name(model)}: {error}", file=sys.stderr)
        return 1
    prompt = demo.comparer.prompt("{question}")
    print(f"vtoken demo: {model_name(model)} on {next(model.parameters()).device}; prompt from "
          f"{demo.comparer.prompt_format.source}: {prompt!r}", flush=True)
    print(f"vtoken demo: serving on http://{args.host}:{args.port}", flush=True)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0
