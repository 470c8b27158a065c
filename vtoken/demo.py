"""``vtoken demo``: a Gradio page that runs one question on one image twice, with every visual token and
with a vtoken method, and shows both answers, their latency and token counts, and which tokens were kept.

    vtoken demo                                  # the embedded scenes model, http://127.0.0.1:7860
    vtoken demo --model llava-hf/llava-1.5-7b-hf --port 8080

From Python::

    from vtoken.demo import Comparer, build_demo
    demo = build_demo(model_path="path/to/llava")         # or build_demo(model, processor)
    demo.launch()
    Comparer(model, processor).compare(image, "what is left of the cube?", "dart", 64)   # a plain dict

The model is shared by every request: each comparison runs the unpruned model, wraps it, runs it again
and unwraps it while holding one lock, so concurrent requests never see each other's method or budget,
and a request that fails (say, a budget above the image's token count) leaves the model unwrapped.
"""

from __future__ import annotations

import argparse
import colorsys
import importlib.util
import json
import logging
import sys
import threading
import weakref
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

if importlib.util.find_spec("gradio") is None:  # the `demo` extra; the CLI turns this into an install hint
    raise ImportError("vtoken demo needs gradio: pip install 'vtoken[demo]'")

import numpy as np
import torch
from PIL import Image, ImageDraw

import vtoken
from vtoken.registry import STAGES
from vtoken.sites import Site
from vtoken.stats import clock

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
EMBEDDED_MODEL = "scenes-llava"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_QUESTION = "What is in the image?"
#: used when the processor has no chat template; {image} is the processor's image token
FALLBACK_PROMPT = "USER: {image}\n{question} ASSISTANT:"
OVERLAY_WIDTH = 448
EMPTY_ANSWER = "(no text: the model generated only special tokens)"
LOG = logging.getLogger(__name__)
_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """One lock per model object: whoever wraps, runs and unwraps it holds this lock."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


# --- model and samples -----------------------------------------------------------------------------
def embedded_model_path() -> Path:
    """Where the embedded scenes model lives inside the installed package (it may not be there)."""
    return Path(str(resources.files("vtoken.assets"))) / EMBEDDED_MODEL


def samples_path() -> Path:
    return Path(str(resources.files("vtoken.assets"))) / "samples"


def missing_model_message(path: Path) -> str:
    return (
        f"the embedded scenes model is not in this installation (looked in {path}).\n"
        f"It is a LLaVA model saved with save_pretrained into vtoken/assets/{EMBEDDED_MODEL}/; "
        "install a vtoken version that ships it, or place it there.\n"
        "Or run the demo on any supported model: vtoken demo --model <Hugging Face id or local directory> "
        "(LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; e.g. --model llava-hf/llava-1.5-7b-hf)."
    )


def load_model(model_path: str | Path | None = None, device: str | None = None,
               dtype: str | torch.dtype | None = None) -> tuple[Any, Any]:
    """Load a model and its processor with ``from_pretrained`` (the embedded model when no path is given).

    Raises FileNotFoundError, saying how to get a model, when the embedded model is absent.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if model_path is None:
        path = embedded_model_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(missing_model_message(path))
        model_path = path
    elif Path(model_path).expanduser().exists():
        model_path = Path(model_path).expanduser()
        if not (model_path / "config.json").is_file():
            raise FileNotFoundError(f"{model_path} holds no model (no config.json); pass a directory written by "
                                    "save_pretrained or a Hugging Face model id")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device).eval()
    return model, processor


def load_samples(folder: str | Path | None = None) -> list[tuple[str, str]]:
    """(image path, question) pairs from a samples folder (default: the package's ``assets/samples``).

    Questions come from a ``<image stem>.txt`` beside the image (first non-empty line), or from JSON /
    JSON-lines files in the folder: a mapping ``{"image name or stem": "question" | ["question", ...]}`` or
    records with an image (``image``/``file``/``path``/``filename``) and ``question``/``questions``.
    """
    folder = samples_path() if folder is None else Path(folder)
    if not folder.is_dir():
        return []
    questions: dict[str, list[str]] = {}

    def add(name: Any, value: Any) -> None:
        if not isinstance(name, str) or value is None:
            return
        values = value if isinstance(value, list) else [value]
        key = Path(name).name
        for q in values:
            if isinstance(q, dict):
                q = q.get("question") or q.get("text")
            if isinstance(q, str) and q.strip():
                questions.setdefault(key, []).append(q.strip())
                questions.setdefault(Path(key).stem, []).append(q.strip())

    def add_record(record: Any) -> None:
        if isinstance(record, dict):
            name = next((record[k] for k in ("image", "file", "path", "filename") if k in record), None)
            add(name, record.get("questions", record.get("question")))

    for meta in sorted(folder.glob("*.json")) + sorted(folder.glob("*.jsonl")):
        try:
            text = meta.read_text(encoding="utf-8")
            data = ([json.loads(line) for line in text.splitlines() if line.strip()]
                    if meta.suffix == ".jsonl" else json.loads(text))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and not any(k in data for k in ("image", "file", "path", "filename")):
            items = data.get("samples", data)
            if isinstance(items, list):
                for record in items:
                    add_record(record)
            else:
                for name, value in items.items():
                    add(name, value)
        elif isinstance(data, list):
            for record in data:
                add_record(record)
        else:
            add_record(data)
    samples = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        found = questions.get(image.name) or questions.get(image.stem)
        sidecar = image.with_suffix(".txt")
        if not found and sidecar.is_file():
            found = [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()][:1]
        samples.append((str(image), (found or [DEFAULT_QUESTION])[0]))
    return samples


# --- methods ---------------------------------------------------------------------------------------
def demo_methods() -> list[str]:
    """Every registered method; each runs at a site the demo picks (see ``method_setup``)."""
    return vtoken.list_methods()


def _vision_layers(model: Any) -> int | None:
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    for name in ("num_hidden_layers", "depth"):
        if vision is not None and isinstance(getattr(vision, name, None), int):
            return getattr(vision, name)
    return None


def _default_vision_layer(model: Any) -> int:
    """A middle encoder layer before the one that produces the features the language model reads."""
    count = _vision_layers(model) or 2
    feature = getattr(model.config, "vision_feature_layer", -1)
    feature = min(feature) if isinstance(feature, (list, tuple)) else feature
    first_block = (feature if feature >= 0 else count + 1 + feature) - 1  # hidden state h comes out of block h-1
    return max(0, min(count // 2, first_block - 1))


def method_setup(model: Any, method: str, keep: int | float, site: str | None,
                 grid: tuple[int, int] | None) -> tuple[dict[str, Any], str]:
    """The ``vtoken.wrap`` keyword arguments for one request, and a note on what the demo chose.

    - ``site``: the user's site, else each stage's own default; encoder stages with no default run at
      the projector when they can (so merges show as groups) or at a middle vision layer.
    - stages with a fixed ratio and no budget (``pixel_shuffle``): the budget picks the ratio whose
      token count is closest to it.
    """
    names = [name.strip() for name in method.split("+")]
    classes = [STAGES[name] for name in names if name in STAGES]
    options: dict[str, Any] = {"keep": keep}
    notes = []
    if site:
        Site.parse(site)  # a clear error for a malformed site
        options["site"] = site.strip()
    elif len(classes) == len(names):
        for name, cls in zip(names, classes):
            if cls.default_site is None:
                chosen = "projector" if "projector" in cls.site_kinds else f"vision({_default_vision_layer(model)})"
                options.setdefault(name, {})["site"] = chosen
                notes.append(f"{name} runs at {chosen}")
    if classes and len(classes) == len(names) and not any(cls.budgeted for cls in classes):
        options["keep"] = None
        if all("ratio" in cls.option_names() for cls in classes) and grid is not None and isinstance(keep, int):
            ratio = _closest_ratio(grid, keep)
            for name in names:
                options.setdefault(name, {})["ratio"] = ratio
            notes.append(f"{method} has a fixed ratio, not a budget: the budget picks ratio {ratio}")
        else:
            notes.append(f"{method} has a fixed ratio: the budget is not used")
    return options, "; ".join(notes)


def _closest_ratio(grid: tuple[int, int], keep: int) -> int:
    h, w = grid
    ratios = [r for r in range(1, min(h, w) + 1) if h % r == 0 and w % r == 0]
    return min(ratios, key=lambda r: (abs((h // r) * (w // r) - keep), r))


# --- the comparison --------------------------------------------------------------------------------
@dataclass
class _Run:
    answer: str
    latency_ms: float
    output_tokens: int


class Comparer:
    """Runs the unpruned and the wrapped model on one image and question; safe to call from many threads."""

    def __init__(self, model: Any, processor: Any, max_new_tokens: int = 32, prompt_template: str | None = None):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.prompt_template = prompt_template
        self.lock = model_lock(model)
        self._warm = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokens_per_image(self) -> int | None:
        grid = self.grid()
        return None if grid is None else grid[0] * grid[1]

    def grid(self) -> tuple[int, int] | None:
        """The patch grid of a LLaVA-1.5-style model (fixed image size), else None."""
        config = getattr(self.model.config, "vision_config", None)
        if getattr(self.model.config, "model_type", "") != "llava" or config is None:
            return None
        side = config.image_size // config.patch_size
        return side, side

    def prompt(self, question: str) -> str:
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        if self.prompt_template:
            return self.prompt_template.format(image=image_token, question=question)
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return FALLBACK_PROMPT.format(image=image_token, question=question)

    def compare(self, image: Any, question: str, method: str, keep: int | float, site: str | None = None,
                max_new_tokens: int | None = None) -> dict[str, Any]:
        """Answer ``question`` about ``image`` without and with ``method`` at budget ``keep``.

        Returns a dict: ``baseline`` and ``pruned`` (answer, latency_ms), ``visual_tokens`` (``in`` per
        image, ``kept`` after the method), ``stages`` (vtoken's per-stage records), ``overlay`` (a PIL image
        of the kept tokens, or None where the model has no single patch grid), ``legend`` and ``note``.
        Raises ValueError (vtoken's message) for an invalid request; the model is left unwrapped.
        """
        image = _as_image(image)
        question = (question or "").strip()
        if not question:
            raise ValueError("ask a question about the image")
        method = (method or "").strip()
        if not method:
            raise ValueError(f"choose a method; registered: {', '.join(vtoken.list_methods())}")
        keep = _as_budget(keep)
        max_new_tokens = int(max_new_tokens or self.max_new_tokens)
        inputs = self.processor(images=image, text=self.prompt(question), return_tensors="pt")
        inputs = _to_device(inputs, self.device, self.model.dtype)
        image_token = getattr(self.model.config, "image_token_id", None)
        tokens_in = int((inputs["input_ids"] == image_token).sum()) if image_token is not None else None
        grid = self._token_grid(inputs, tokens_in)
        options, note = method_setup(self.model, method, keep, site, grid)
        keep_option = options.pop("keep")

        with self.lock:
            if hasattr(self.model, vtoken.api.ATTRIBUTE):  # never run on a wrap left by someone else
                vtoken.unwrap(self.model)
            if not self._warm:  # one-time costs (kernel selection, allocator) stay out of the timings
                self._generate(inputs, 1)
                self._warm = True
            baseline = self._generate(inputs, max_new_tokens)
            with vtoken.wrapped(self.model, method, keep=keep_option, **options):
                pruned = self._generate(inputs, max_new_tokens)
                state = getattr(self.model, vtoken.api.ATTRIBUTE)
                sites = list(state.pipeline.sites)
                stats = state.stats
                records = [{"stage": r.stage, "site": r.site, "tokens_in": r.tokens_in, "tokens_out": r.tokens_out,
                            "scoring_ms": round(r.scoring_ms, 3), "select_ms": round(r.select_ms, 3)}
                           for r in stats.records]
                kept = {name: [None if t is None else t.detach().cpu() for t in rows]
                        for name, rows in stats.kept.items()}
                merged = {name: [None if t is None else t.detach().cpu() for t in rows]
                          for name, rows in stats.merged.items()}
                overhead_ms = stats.total_ms
                described = state.pipeline.describe()

        if tokens_in is None and records:
            tokens_in = records[0]["tokens_in"]
        last_site = str(sites[-1])
        tokens_kept = sum(r["tokens_out"] for r in records if r["site"] == last_site) if records else tokens_in
        overlay, legend, owner = None, "no overlay: this model has no single patch grid per image", None
        if grid is not None:
            owner = trace_tokens(sites, kept, merged, grid[0] * grid[1])
            view = model_view(image, self.processor, grid, inputs)
            merging = any(str(s) in merged for s in sites)
            overlay = render_overlay(view, grid, owner, merging)
            legend = _legend(owner, grid, merging, sites)
        return {
            "method": method,
            "pipeline": described,
            "keep": keep_option,
            "site": ", ".join(str(s) for s in sites),
            "question": question,
            "baseline": {"answer": baseline.answer, "latency_ms": round(baseline.latency_ms, 1),
                         "new_tokens": baseline.output_tokens},
            "pruned": {"answer": pruned.answer, "latency_ms": round(pruned.latency_ms, 1),
                       "new_tokens": pruned.output_tokens, "vtoken_overhead_ms": round(overhead_ms, 2)},
            "visual_tokens": {"in": tokens_in, "kept": tokens_kept},
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "stages": records,
            "grid": list(grid) if grid is not None else None,
            # per patch of the grid (row-major): the visual token it went to, -1 where it was dropped
            "patch_tokens": None if owner is None else owner.tolist(),
            "overlay": overlay,
            "legend": legend,
            "note": note,
        }

    def _generate(self, inputs: dict[str, Any], max_new_tokens: int) -> _Run:
        start = clock(self.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        seconds = clock(self.device) - start
        new = output[0, inputs["input_ids"].shape[1]:]
        decode = getattr(self.processor, "decode", None) or self.processor.tokenizer.decode
        return _Run(answer=decode(new, skip_special_tokens=True).strip(), latency_ms=1000 * seconds,
                    output_tokens=int(new.numel()))

    def _token_grid(self, inputs: dict[str, Any], tokens_in: int | None) -> tuple[int, int] | None:
        """(rows, columns) of this image's visual tokens when they form one grid in the prompt."""
        grid = self.grid()
        thw = inputs.get("image_grid_thw")
        if grid is None and thw is not None and thw.shape[0] == 1:  # Qwen2-VL: patches merged m x m
            merge = getattr(self.model.config.vision_config, "spatial_merge_size", 2)
            _, h, w = (int(v) for v in thw[0])
            grid = (h // merge, w // merge)
        if grid is None or tokens_in != grid[0] * grid[1]:
            return None
        return grid


def _as_image(image: Any) -> Image.Image:
    if image is None:
        raise ValueError("upload an image or choose a sample first")
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot read an image from {type(image).__name__}")
    return image.convert("RGB")


def _as_budget(keep: Any) -> int | float:
    if keep is None or (isinstance(keep, str) and not keep.strip()):
        raise ValueError("set the kept-token budget: tokens per image (int) or a fraction in (0, 1]")
    if isinstance(keep, str):
        keep = float(keep)
    if isinstance(keep, float) and keep.is_integer() and keep > 1:
        keep = int(keep)
    return keep


def _to_device(inputs: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    moved = {}
    for key, value in dict(inputs).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


# --- the overlay -----------------------------------------------------------------------------------
def trace_tokens(sites: list[Site], kept: dict[str, list], merged: dict[str, list], patches: int) -> np.ndarray:
    """For every patch of the image's grid, the visual token it ends up in (0..k-1), or -1 if dropped.

    Follows the sites in forward order: a selection at a vision or projector site records original patch
    positions; one at an llm site records positions among the visual tokens that reached it; a merge
    records, for each token that reached it, the merged token it went to.
    """
    owner = np.arange(patches)  # token of each patch
    positions = np.arange(patches)  # patch position of each current token (centre for merges)
    for site in sites:
        rows = kept.get(str(site))
        if not rows or rows[0] is None:
            continue
        chosen = rows[0].numpy().astype(np.int64)
        groups = merged.get(str(site))
        alive = owner >= 0
        if groups and groups[0] is not None:
            assign = groups[0].numpy().astype(np.int64)
            owner = np.where(alive, assign[np.clip(owner, 0, None)], -1)
            positions = chosen
            continue
        if site.kind == "llm":
            token_of = chosen  # positions into the current tokens
        else:
            where = {int(p): t for t, p in enumerate(positions)}
            token_of = np.array([where[int(p)] for p in chosen if int(p) in where], dtype=np.int64)
        remap = np.full(len(positions), -1, dtype=np.int64)
        remap[token_of] = np.arange(len(token_of))
        owner = np.where(alive, remap[np.clip(owner, 0, None)], -1)
        positions = positions[token_of]
    return owner


def model_view(image: Image.Image, processor: Any, grid: tuple[int, int], inputs: dict[str, Any]) -> Image.Image:
    """The part of the image the model's patch grid covers: resized and centre-cropped as the processor
    does for fixed-size encoders (CLIP), or resized whole for native-resolution ones (Qwen2-VL)."""
    ip = getattr(processor, "image_processor", None)
    if "image_grid_thw" in inputs:  # the whole image, resized to whole merged patches
        return image
    size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
    shortest = _size_value(size, "shortest_edge")
    if getattr(ip, "do_resize", True) and shortest:
        scale = shortest / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC)
    elif getattr(ip, "do_resize", True) and _size_value(size, "height") and _size_value(size, "width"):
        image = image.resize((_size_value(size, "width"), _size_value(size, "height")), Image.BICUBIC)
    ch, cw = _size_value(crop, "height"), _size_value(crop, "width")
    if getattr(ip, "do_center_crop", False) and ch and cw:
        left, top = (image.width - cw) // 2, (image.height - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
    return image


def _size_value(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def group_colours(count: int) -> np.ndarray:
    """``count`` well-separated RGB colours (golden-ratio hues), uint8 ``[count, 3]``."""
    colours = [colorsys.hsv_to_rgb((0.13 + i * 0.618033988749895) % 1.0, 0.75, 1.0) for i in range(count)]
    return (np.array(colours, dtype=np.float32).reshape(-1, 3) * 255).astype(np.uint8)


def render_overlay(view: Image.Image, grid: tuple[int, int], owner: np.ndarray, merging: bool,
                   width: int = OVERLAY_WIDTH) -> Image.Image:
    """Kept patches bright, dropped ones dimmed; with merging, each merged token's patches in one colour."""
    rows, cols = grid
    cell = max(4, round(width / cols))
    base = np.asarray(view.convert("RGB").resize((cols * cell, rows * cell), Image.BICUBIC), dtype=np.float32)
    owner_px = np.repeat(np.repeat(owner.reshape(rows, cols), cell, axis=0), cell, axis=1)
    kept = owner_px >= 0
    grey = base.mean(axis=-1, keepdims=True)
    out = np.where(kept[..., None], base, (0.4 * base + 0.6 * grey) * 0.28)
    if merging and kept.any():
        colours = group_colours(int(owner.max()) + 1).astype(np.float32)
        tint = colours[np.clip(owner_px, 0, None)]
        out = np.where(kept[..., None], 0.6 * base + 0.4 * tint, out)
        edge = np.zeros_like(kept)
        edge[:, 1:] |= owner_px[:, 1:] != owner_px[:, :-1]
        edge[1:, :] |= owner_px[1:, :] != owner_px[:-1, :]
        out[edge] = 255.0
    else:  # a faint grid over the kept patches shows the token size
        line = np.zeros_like(kept)
        line[::cell, :] = True
        line[:, ::cell] = True
        out = np.where((line & kept)[..., None], 0.75 * out + 0.25 * 255.0, out)
    picture = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    ImageDraw.Draw(picture).rectangle([0, 0, picture.width - 1, picture.height - 1], outline=(90, 90, 90))
    return picture


def _legend(owner: np.ndarray, grid: tuple[int, int], merging: bool, sites: list[Site]) -> str:
    patches = grid[0] * grid[1]
    tokens = int(owner.max()) + 1 if (owner >= 0).any() else 0
    alive = int((owner >= 0).sum())
    where = ", ".join(str(s) for s in sites)
    if merging:
        text = (f"{patches} visual tokens ({grid[0]}x{grid[1]} grid) merged into {tokens} at {where}: each colour "
                f"is one merged token")
        if alive < patches:
            text += f"; the dimmed ones ({patches - alive}) were dropped"
        return text
    text = (f"{tokens} of {patches} visual tokens ({grid[0]}x{grid[1]} grid) kept at {where}: kept bright, "
            f"dropped dimmed")
    if any(s.kind == "llm" for s in sites):
        text += " (the first decoder layers still see every token)"
    return text


# --- the page --------------------------------------------------------------------------------------
CSS = """
#vtoken-status:empty { display: none; }
.vtoken-error { color: #b42318; }
"""


def build_demo(model: Any = None, processor: Any = None, model_path: str | Path | None = None, *,
               samples: str | Path | list[tuple[str, str]] | None = None, max_new_tokens: int = 32,
               prompt_template: str | None = None, comparer: Comparer | None = None,
               concurrency_limit: int = 4) -> Any:
    """The demo page as a ``gradio.Blocks`` (call ``.launch()`` on it).

    Give a loaded ``model`` and ``processor``, or a ``model_path`` (an id or directory), or nothing for the
    embedded scenes model. ``samples``: a folder of sample images with questions (default
    ``assets/samples``) or ``(image path, question)`` pairs. The handler is also the ``/compare`` API
    endpoint; ``demo.comparer`` is the Comparer behind it.
    """
    import gradio as gr

    if comparer is None:
        if model is None:
            model, processor = load_model(model_path)
        elif processor is None:
            raise ValueError("build_demo(model=...) needs its processor too")
        comparer = Comparer(model, processor, max_new_tokens=max_new_tokens, prompt_template=prompt_template)
    examples = samples if isinstance(samples, list) else load_samples(samples)
    methods = demo_methods()
    per_image = comparer.tokens_per_image()
    default_keep = max(1, per_image // 9) if per_image else 64
    name = model_name(comparer.model)
    budget_info = (f"visual tokens per image to keep (this model has {per_image}); a merge makes that many"
                   if per_image else "visual tokens per image to keep")

    def run(image, question, method, keep, site, new_tokens):
        try:
            result = comparer.compare(image, question, method, keep, site=site or None,
                                      max_new_tokens=new_tokens)
        except Exception as error:  # shown in the page; the next request starts from a clean model
            if not isinstance(error, (ValueError, TypeError)):
                LOG.exception("comparison failed")
            message = str(error) or type(error).__name__
            return (f'<div class="vtoken-error"><b>Could not run this comparison:</b> {_escape(message)}</div>',
                    "", "", "", "", None, "", {"error": message})
        base, pruned, tokens = result["baseline"], result["pruned"], result["visual_tokens"]
        base_info = (f"**{base['latency_ms']:.0f} ms** to generate {base['new_tokens']} tokens  \n"
                     f"visual tokens: **{tokens['in']}**")
        speedup = base["latency_ms"] / pruned["latency_ms"] if pruned["latency_ms"] else float("nan")
        pruned_info = (f"**{pruned['latency_ms']:.0f} ms** to generate {pruned['new_tokens']} tokens "
                       f"({speedup:.2f}x)  \nvisual tokens: **{tokens['kept']}** of {tokens['in']} "
                       f"at {result['site']}  \nvtoken's own work: {pruned['vtoken_overhead_ms']:.1f} ms")
        details = {k: v for k, v in result.items() if k not in ("overlay", "patch_tokens")}
        legend = result["legend"] + (f"  \n_{result['note']}_" if result["note"] else "")
        return ("", base["answer"] or EMPTY_ANSWER, base_info, pruned["answer"] or EMPTY_ANSWER, pruned_info,
                result["overlay"], legend, details)

    with gr.Blocks(title="vtoken demo", analytics_enabled=False) as demo:
        gr.Markdown(
            "# vtoken: fewer visual tokens, same model\n"
            f"One question about one image, answered by **{_escape(name)}** twice: with every visual token, "
            "and with a training-free token pruning or merging method. The overlay shows which image "
            "patches the language model still sees."
        )
        with gr.Row():
            with gr.Column(scale=5):
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], height=320,
                                 elem_id="vtoken-image")
                question = gr.Textbox(label="Question", value=examples[0][1] if examples else DEFAULT_QUESTION,
                                      lines=2, elem_id="vtoken-question")
                with gr.Row():
                    method = gr.Dropdown(methods, value="dart" if "dart" in methods else methods[0],
                                         label="Method", allow_custom_value=True, elem_id="vtoken-method",
                                         info="or a pipeline such as cls_attn+kcenter")
                    keep = gr.Number(value=default_keep, precision=0, minimum=1, label="Kept tokens",
                                     info=budget_info, elem_id="vtoken-keep")
                with gr.Accordion("Advanced", open=False):
                    site = gr.Textbox(label="Site", placeholder="the method's default",
                                      info="where the method runs: projector, llm(K) or vision(L)")
                    new_tokens = gr.Slider(1, 256, value=max_new_tokens, step=1, label="Max new tokens")
                button = gr.Button("Compare", variant="primary", elem_id="vtoken-run")
                if examples:
                    gr.Examples(examples=[list(e) for e in examples], inputs=[image, question],
                                label="Sample scenes")
            with gr.Column(scale=7):
                status = gr.HTML("", elem_id="vtoken-status")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### Unpruned")
                        base_answer = gr.Textbox(label="Answer", interactive=False, lines=3,
                                                 elem_id="vtoken-baseline-answer")
                        base_info = gr.Markdown(elem_id="vtoken-baseline-info")
                    with gr.Column():
                        gr.Markdown("### With vtoken")
                        pruned_answer = gr.Textbox(label="Answer", interactive=False, lines=3,
                                                   elem_id="vtoken-pruned-answer")
                        pruned_info = gr.Markdown(elem_id="vtoken-pruned-info")
                overlay = gr.Image(label="Kept tokens", type="pil", interactive=False, height=380,
                                   elem_id="vtoken-overlay", format="png")
                legend = gr.Markdown(elem_id="vtoken-legend")
                with gr.Accordion("Details", open=False):
                    details = gr.JSON(label="Result", elem_id="vtoken-details")
        outputs = [status, base_answer, base_info, pruned_answer, pruned_info, overlay, legend, details]
        inputs = [image, question, method, keep, site, new_tokens]
        button.click(run, inputs=inputs, outputs=outputs, api_name="compare", concurrency_limit=concurrency_limit)
        question.submit(run, inputs=inputs, outputs=outputs, api_name=False, concurrency_limit=concurrency_limit)
    demo.comparer = comparer
    return demo


def model_name(model: Any) -> str:
    """The model's id, or its folder's name when it was loaded from a local directory."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    if not name:
        return type(model).__name__
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def launch(demo: Any, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, share: bool = False,
           **kwargs: Any) -> Any:
    """Launch the page (on 127.0.0.1 unless told otherwise; no public share link unless ``share``)."""
    return demo.launch(server_name=host, server_port=port, share=share, css=CSS, **kwargs)


# --- command line ----------------------------------------------------------------------------------
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
                        help="prompt with {image} and {question} (default: the processor's chat template)")


def run(args: argparse.Namespace) -> int:
    try:
        model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as error:  # no such model, or no access to it
        print(f"vtoken demo: cannot load {args.model or 'the embedded model'}: {error}", file=sys.stderr)
        return 1
    demo = build_demo(model, processor, samples=args.samples, max_new_tokens=args.max_new_tokens,
                      prompt_template=args.prompt_template)
    print(f"vtoken demo: {model_name(model)} on {next(model.parameters()).device}; "
          f"serving on http://{args.host}:{args.port}", flush=True)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    from vtoken.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
