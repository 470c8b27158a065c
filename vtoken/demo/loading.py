"""Loading the model (the embedded scenes model by default) and the sample scenes with their questions."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from vtoken.eval.scenes_model import EMBEDDED_MODEL, embedded_model_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_QUESTION = "What is in the image?"


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


def model_name(model: Any) -> str:
    """The model's id, or its folder's name when it was loaded from a local directory."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    if not name:
        return type(model).__name__
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name
