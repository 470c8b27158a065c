"""A bench run: load (or build) the model, ask its integration for inputs, counts and dimensions, measure
the baseline and every method x budget, and gather the results."""

from __future__ import annotations

import shlex
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from ..grid import method_grid
from .measure import Workload, measure_baseline, measure_method, relative_to
from .report import MAX_SPREAD, write_results
from .system import run_facts

DEFAULT_METHODS = ("cls_attn", "kcenter", "dart", "pool", "random", "dart@llm(2)")
DEFAULT_BUDGETS = (64, 128, 192)
EMBEDDED_MODEL = "scenes-llava"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_bench(
    model: Any = None, *, arch: str | None = None, random_init: bool = False, depth_scale: float = 1.0,
    methods: Sequence[str] = DEFAULT_METHODS, budgets: Sequence[int | float] = DEFAULT_BUDGETS, runs: int = 5,
    warmup: int = 1, decode_tokens: int = 16, text_tokens: int = 48, batch_size: int = 1, seed: int = 0,
    device: str = "auto", dtype: str | torch.dtype = "auto", threads: int | None = None,
    attn_implementation: str = "sdpa", out: str | Path | None = None, plots: bool = True, progress: bool = True,
    command: str | None = None, generate_runs: int = 3, max_spread: float = MAX_SPREAD,
    video_frames: int | None = None,
) -> dict[str, Any]:
    """Benchmark ``methods`` x ``budgets`` on a model; returns the results (and writes them to ``out``).

    model: a loaded model, a Hugging Face id or folder, or None for the embedded model; or ``arch``
    (with ``random_init=True``) for a random-weight architecture scaled by ``depth_scale``.
    Each method's timed runs alternate with the unpruned model's (``generate_runs`` generate() pairs);
    a configuration whose runs spread more than ``max_spread`` (max/min) is flagged.
    ``video_frames``: each sample holds a synthetic clip of that many frames instead of an image (the
    family's ``synthetic_video_inputs``; visual counts then count each temporal patch as an image).
    """
    import vtoken

    check_counts(runs, warmup, decode_tokens, text_tokens, batch_size, generate_runs, max_spread)
    device, torch_dtype = setup_machine(device, dtype, threads)
    started = time.perf_counter()
    model, model_name = load_model(model, arch, random_init, depth_scale, torch_dtype, device, attn_implementation,
                                   seed)
    work = workload(model, text_tokens, batch_size, seed, device, torch_dtype, video_frames=video_frames)
    grid = method_grid(methods, budgets)
    for spec, keep in grid:  # a method the model cannot take fails before the long part
        with vtoken.wrapped(model, spec.method, keep=keep, **spec.options):
            pass
    bar = _progress(1 + len(grid), progress)
    rows = []
    bar.set_postfix_str("no pruning")
    baseline = measure_baseline(work, runs, warmup, decode_tokens)
    rows.append(baseline)
    bar.update(1)
    for spec, keep in grid:
        bar.set_postfix_str(f"{spec.label} keep={keep}")
        row = measure_method(work, spec, keep, runs, warmup, decode_tokens, generate_runs)
        relative_to(row, baseline)
        rows.append(row)
        bar.update(1)
    bar.close()
    result = {
        "command": command or _api_command(model_name, methods, budgets, runs, warmup, decode_tokens, text_tokens,
                                           batch_size, seed, device, torch_dtype, threads, out, video_frames),
        "model": model_name + (f", {video_frames}-frame video" if video_frames is not None else ""),
        "random_init": bool(arch), "depth_scale": depth_scale if arch else 1.0,
        **run_facts(model, device, torch_dtype), "attn_implementation": attn_implementation,
        "max_spread": max_spread, "generate_runs": generate_runs,
        "text_tokens": work.text_tokens, "visual_tokens_per_image": work.counts.tokens,
        "video_frames": video_frames, "visual_tokens_per_sample": work.counts.tokens * work.counts.images,
        "batch_size": batch_size, "runs": runs, "warmup": warmup, "decode_tokens": decode_tokens,
        "dims": work.dims.to_dict(), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "wall_s": None, "rows": rows,
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if out is not None:
        result["files"] = write_results(result, Path(out), plots)
    return result


def check_counts(runs: int, warmup: int, decode_tokens: int, text_tokens: int, batch_size: int,
                 generate_runs: int, max_spread: float) -> None:
    if runs < 1 or warmup < 0 or decode_tokens < 0 or text_tokens < 2 or batch_size < 1 or generate_runs < 1:
        raise ValueError("need runs >= 1, warmup >= 0, decode_tokens >= 0, text_tokens >= 2, batch_size >= 1, "
                         "generate_runs >= 1")
    if not max_spread > 1:
        raise ValueError(f"max_spread={max_spread}; expected a factor > 1 (e.g. 1.5)")


def setup_machine(device: str, dtype: str | torch.dtype, threads: int | None) -> tuple[torch.device, torch.dtype]:
    """Threads, denormals flushed, and the device and dtype ``auto`` stands for."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    resolved = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                            ("cpu" if device == "auto" else device))
    return resolved, resolve_dtype(dtype, resolved)


def workload(model: Any, text_tokens: int, batch_size: int, seed: int, device: torch.device,
             dtype: torch.dtype, visual_tokens: int | None = None, video_frames: int | None = None) -> Workload:
    """What the run measures on, from the model's integration: synthetic inputs (``visual_tokens`` per
    image where the family can set it, or a clip of ``video_frames`` frames), their visual counts and the
    model's FLOPs dimensions (a family that lacks one of them refuses here, before any timing)."""
    from vtoken.integrations.base import Integration

    family = Integration.for_model(model)
    if video_frames is None:
        inputs = family.synthetic_inputs(text_tokens, batch_size, seed, device, dtype, visual_tokens=visual_tokens)
    else:
        if visual_tokens is not None:
            raise ValueError("a synthetic clip's frame size is the family's own; give video_frames or "
                             "visual_tokens, not both")
        make = getattr(family, "synthetic_video_inputs", None)
        if make is None:
            raise NotImplementedError(f"the {family.family} integration gives no synthetic video clip for the "
                                      "bench (--video-frames); Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision do")
        inputs = make(text_tokens, batch_size, seed, device, dtype, frames=video_frames)
    return Workload(model=model, family=family, inputs=inputs, counts=family.visual_counts(inputs),
                    dims=family.model_dims(), device=device)


def embedded_model_path() -> Path | None:
    """The embedded scenes model (``vtoken/assets/scenes-llava``), when it is installed."""
    try:
        path = Path(str(resources.files("vtoken.assets").joinpath(EMBEDDED_MODEL)))
    except (ModuleNotFoundError, TypeError):
        return None
    return path if (path / "config.json").exists() else None


def load_model(model: Any, arch: str | None, random_init: bool, depth_scale: float, dtype: torch.dtype,
               device: torch.device, attn_implementation: str, seed: int) -> tuple[Any, str]:
    """The model to measure (given, loaded from a folder or id, the embedded one, or built from ``arch``
    with random weights) on ``device`` in ``dtype``, and its name for the results."""
    if arch is not None:
        if model is not None:
            raise ValueError("give either a model (--model) or an architecture (--arch), not both")
        if not random_init:
            raise ValueError(f"--arch {arch} builds random weights; add --random-init to confirm (speed-only "
                             "numbers), or pass --model for real weights")
        from vtoken.eval.archs import build_arch

        built = build_arch(arch, depth_scale, dtype=dtype, device=device, attn_implementation=attn_implementation,
                           seed=seed)
        return built, f"{arch} (random init, depth x{fraction_text(depth_scale)})"
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


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def archs() -> list[str]:
    from vtoken.eval.archs import ARCHS

    return list(ARCHS)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="vtoken bench", unit="config", disable=not enabled, file=sys.stderr)


def _api_command(model_name, methods, budgets, runs, warmup, decode_tokens, text_tokens, batch_size, seed, device,
                 dtype, threads, out, video_frames=None) -> str:
    dtype_name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype))
    parts = ["vtoken", "bench", "--model", model_name, "--methods", ",".join(methods),
             "--budgets", ",".join(map(str, budgets)), "--runs", str(runs), "--warmup", str(warmup),
             "--decode-tokens", str(decode_tokens), "--text-tokens", str(text_tokens), "--batch-size",
             str(batch_size), "--seed", str(seed), "--device", str(device), "--dtype", dtype_name]
    if threads is not None:
        parts += ["--threads", str(threads)]
    if video_frames is not None:
        parts += ["--video-frames", str(video_frames)]
    if out is not None:
        parts += ["--out", str(out)]
    return shlex.join(parts)


def fraction_text(value: float) -> str:
    """A depth scale as the command line takes it: ``1``, ``1/8``, or ``0.3``."""
    if value == 1:
        return "1"
    inverse = 1 / value
    if abs(inverse - round(inverse)) < 1e-9:
        return f"1/{round(inverse)}"
    return f"{value:g}"
