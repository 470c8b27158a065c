"""One comparison: the unpruned model and the wrapped model on the same image and question.

The model is shared by every request: each comparison runs the unpruned model, wraps it, runs it again
and unwraps it while holding one lock per model, so concurrent requests never see each other's method
or budget, and a request that fails (say, a budget above the image's token count) leaves the model
unwrapped. Everything a request can get wrong (image, question, budget, method, site) is a ValueError
or TypeError with a message meant for the person who sent it.
"""

from __future__ import annotations

import base64
import io
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vtoken
from vtoken.budget import parse_budget
from vtoken.registry import PIPELINES, STAGES
from vtoken.sites import Site
from vtoken.stats import clock

from .overlay import legend_text, model_view, render_overlay, trace_tokens
from .prompts import PromptFormat, image_token_id_of, prompt_format

IMAGE_KINDS = "a PNG, JPEG, WebP or BMP image"
MAX_NEW_TOKENS = 1024
_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """One lock per model object: whoever wraps, runs and unwraps it holds this lock."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


# --- request values --------------------------------------------------------------------------------
def read_image(value: Any) -> Image.Image:
    """An RGB image from a PIL image, an array, a file path or an uploaded file (Gradio's file record).

    Raises ValueError saying what is wrong for nothing, an empty file or one that is not an image."""
    if value is None:
        raise ValueError("upload an image or choose a sample scene first")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        try:
            return Image.fromarray(value).convert("RGB")
        except (TypeError, ValueError) as error:
            raise ValueError(f"cannot read an image from an array of shape {value.shape} and dtype "
                             f"{value.dtype}: {error}") from None
    name = None
    if isinstance(value, dict):  # Gradio's FileData: an uploaded file in the server's cache
        name = value.get("orig_name")
        url = value.get("url") or ""
        if value.get("path"):
            value = value["path"]
        elif url.startswith("data:"):
            try:
                data = base64.b64decode(url.split(",", 1)[1])
            except (IndexError, ValueError):
                raise ValueError("the pasted image is not valid base64 data") from None
            return _open(io.BytesIO(data), name or "the pasted image", len(data))
        else:
            raise ValueError("upload an image or choose a sample scene first")
    if not isinstance(value, (str, Path)):
        raise TypeError(f"cannot read an image from {type(value).__name__}; give {IMAGE_KINDS}")
    path = Path(value)
    name = name or path.name
    if not path.is_file():
        raise ValueError(f"no image file at {path}")
    return _open(path, name, path.stat().st_size)


def _open(source: Any, name: str, size: int) -> Image.Image:
    if size == 0:
        raise ValueError(f"the image {name!r} is empty (0 bytes); upload {IMAGE_KINDS}")
    try:
        # verify() reads the whole file and refuses a truncated one even when another library has set
        # Pillow's global ImageFile.LOAD_TRUNCATED_IMAGES (lmms-eval does); it leaves the image unusable
        with Image.open(source) as probe:
            probe.verify()
        if hasattr(source, "seek"):
            source.seek(0)
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise ValueError(f"the image {name!r} is too large to decode safely") from None
    except Exception as error:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError... for damaged files
        detail = str(error) if isinstance(source, io.BytesIO) else str(error).replace(str(source), name)
        if "cannot identify image file" in detail:
            detail = "not an image file Pillow can read"
        raise ValueError(f"cannot read the image {name!r}: {detail}; upload {IMAGE_KINDS}") from None


# --- methods ---------------------------------------------------------------------------------------
def demo_methods() -> list[str]:
    """Every registered method that runs on one image, each at a site the demo picks (see ``method_setup``);
    the video-only ones (``needs_clip``: DyCoke, HoliTom, and named pipelines holding one) are left out,
    the demo takes an image."""
    def stages_of(name: str) -> list[str]:
        named = PIPELINES.get(name)
        return [part.split("@")[0] for part in named.spec.split("+")] if named else [name]

    return [name for name in vtoken.list_methods()
            if not any(getattr(STAGES.get(stage), "needs_clip", False) for stage in stages_of(name))]


def family_of(model: Any) -> Any:
    """The model's integration, asked what the demo needs to know of its family (site layers, patch
    grids, the image region they cover); raises vtoken's ValueError for a model it does not support."""
    from vtoken.integrations.base import Integration  # imported when asked, as vtoken.wrap imports it

    return Integration.for_model(model)


def _default_vision_layer(model: Any) -> int:
    """A middle encoder layer among those where the model accepts a vision(L) site (for LLaVA: before the
    block that produces the features the language model reads)."""
    family = family_of(model)
    count = family.site_layers().get("vision")
    if not count:
        return 0  # no vision layers: wrap's message then lists the sites the model has
    return max(0, min(count // 2, family.layer_range("vision").stop - 1))


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
        Site.parse(site.strip())  # vtoken's message for a malformed site
        options["site"] = site.strip()
    elif len(classes) == len(names):
        for name, cls in zip(names, classes):
            chosen = None
            if cls.default_site is None:
                chosen = "projector" if "projector" in cls.site_kinds else f"vision({_default_vision_layer(model)})"
            elif Site.parse(cls.default_site).kind == "llm":  # e.g. llm(7) on a 3-layer language model
                layers = family_of(model).layer_range("llm")
                default = Site.parse(cls.default_site).layer
                if layers and default not in layers:
                    chosen = f"llm({layers.stop - 1})"
            if chosen is not None:
                options.setdefault(name, {})["site"] = chosen
                notes.append(f"{name} runs at {chosen}")
    if classes and len(classes) == len(names) and not any(cls.budgeted for cls in classes):
        options["keep"] = None
        if all("ratio" in cls.option_names() for cls in classes) and grid is not None:
            target = keep if isinstance(keep, int) else max(1, round(keep * grid[0] * grid[1]))
            ratio = _closest_ratio(grid, target)
            for name in names:
                options.setdefault(name, {})["ratio"] = ratio
            notes.append(f"{method} has a fixed ratio, not a budget: the budget picks ratio {ratio}")
        else:
            notes.append(f"{method} has a fixed ratio: the budget is not used")
    return options, "; ".join(notes)


def _final(rows: list) -> list:
    """A site's kept positions per row; at a ``decode`` site, where each row lists (step, kept) choices,
    the visual tokens still in the cache after the last one (None when it made none)."""
    return [(row[-1][1] if row else None) if isinstance(row, list) else row for row in rows]


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
    """Runs the unpruned and the wrapped model on one image and question; safe to call from many threads.

    The prompt format is chosen and checked here (see ``vtoken.demo.prompts``): a model whose prompt
    cannot be built raises ``PromptError`` (a ValueError) now, not on every request.
    """

    def __init__(self, model: Any, processor: Any, max_new_tokens: int = 32, prompt_template: str | None = None):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.prompt_template = prompt_template
        self.prompt_format: PromptFormat = prompt_format(processor, model, prompt_template)
        self.lock = model_lock(model)
        self._warm = False
        self._family: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def family(self) -> Any:
        """The model's integration (``family_of``), found on first use."""
        if self._family is None:
            self._family = family_of(self.model)
        return self._family

    def tokens_per_image(self) -> int | None:
        """Visual tokens every image gives, when the model's count does not depend on the image; None when
        it does, or when vtoken does not support the model (its requests then say so)."""
        try:
            return self.family.tokens_per_image()
        except (ValueError, NotImplementedError):
            return None

    def prompt(self, question: str) -> str:
        """The model's prompt for ``question`` about one image (before the processor expands the image)."""
        return self.prompt_format(question)

    def check_question(self, question: Any) -> str:
        question = question.strip() if isinstance(question, str) else ""
        if not question:
            raise ValueError("ask a question about the image")
        if self.prompt_format.image_token in question:
            raise ValueError(f"leave the image token {self.prompt_format.image_token!r} out of the question; "
                             "the demo places the image itself")
        return question

    def compare(self, image: Any, question: str, method: str, keep: int | float | str, site: str | None = None,
                max_new_tokens: int | None = None) -> dict[str, Any]:
        """Answer ``question`` about ``image`` without and with ``method`` at budget ``keep``.

        ``keep``: tokens per image (int) or a fraction in (0, 1], or text such as ``"64"`` or ``"0.25"``.
        Returns a dict: ``baseline`` and ``pruned`` (answer, latency_ms), ``visual_tokens`` (``in`` per
        image, ``kept`` after the method), ``stages`` (vtoken's per-stage records), ``overlay`` (a PIL image
        of the kept tokens, or None where the model has no single patch grid), ``legend``, ``note`` and
        the ``prompt``. Raises ValueError/TypeError (a message for the user) for an invalid request; the
        model is left unwrapped.
        """
        image = read_image(image)
        question = self.check_question(question)
        method = (method or "").strip() if isinstance(method, str) else method
        if not method:
            raise ValueError(f"choose a method; registered: {', '.join(vtoken.list_methods())}")
        keep = parse_budget(keep)
        site = site.strip() if isinstance(site, str) and site.strip() else None
        max_new_tokens = self._new_tokens(max_new_tokens)
        prompt = self.prompt(question)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        inputs = _to_device(inputs, self.device, self.model.dtype)
        image_token = image_token_id_of(self.model)
        tokens_in = int((inputs["input_ids"] == image_token).sum()) if image_token is not None else None
        grid = self._token_grid(inputs, tokens_in)
        options, note = method_setup(self.model, method, keep, site, grid)
        keep_option = options.pop("keep")
        vtoken.build_pipeline(method, keep_option, dict(options))  # unknown method, bad site: before any work

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
                kept = {name: [None if t is None else t.detach().cpu() for t in _final(rows)]
                        for name, rows in stats.kept.items()}
                merged = {name: [None if t is None else t.detach().cpu() for t in rows]
                          for name, rows in stats.merged.items()}
                overhead_ms = stats.total_ms
                described = state.pipeline.describe()

        if tokens_in is None and records:
            tokens_in = records[0]["tokens_in"]
        last_site = str(sites[-1])
        final = kept.get(last_site) or [None]
        if final[0] is not None:  # what the last site left (a decode site: after its last choice)
            tokens_kept = int(final[0].numel())
        else:
            tokens_kept = sum(r["tokens_out"] for r in records if r["site"] == last_site) if records else tokens_in
        overlay, legend, owner = None, "no overlay: this model has no single patch grid per image", None
        if grid is not None:
            owner = trace_tokens(sites, kept, merged, grid[0] * grid[1])
            view = model_view(image, self.processor, self.family)
            merging = any(str(s) in merged for s in sites)
            overlay = render_overlay(view, grid, owner, merging)
            legend = legend_text(owner, grid, merging, sites)
        return {
            "method": method,
            "pipeline": described,
            "keep": keep_option,
            "site": ", ".join(str(s) for s in sites),
            "question": question,
            "prompt": prompt,
            "prompt_format": self.prompt_format.source,
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

    def _new_tokens(self, value: Any) -> int:
        if value is None or value == "":
            return int(self.max_new_tokens)
        try:
            count = int(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"max new tokens must be a whole number; got {value!r}") from None
        if not 1 <= count <= MAX_NEW_TOKENS:
            raise ValueError(f"max new tokens must be in [1, {MAX_NEW_TOKENS}]; got {count}")
        return count

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
        """(rows, columns) of this image's visual tokens when they form one grid in the prompt: the image
        is one visual unit whose grid (``Integration.unit_grids``) holds every visual token."""
        try:
            grids = self.family.unit_grids(inputs)
        except NotImplementedError:  # a family that does not say: no overlay
            return None
        grid = grids[0] if len(grids) == 1 else None
        if grid is None or tokens_in != grid[0] * grid[1]:
            return None
        return tuple(grid)


def _to_device(inputs: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    moved = {}
    for key, value in dict(inputs).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved
