"""lmms-eval plugin: ``vtoken_llava_hf``, ``vtoken_qwen2_vl`` and ``vtoken_qwen2_5_vl``.

Each model subclasses lmms-eval's own class (so its prompt building, batching and generation loop stay
lmms-eval's), then wraps the loaded model with vtoken. vtoken's arguments are taken out of
``--model_args`` before the parent sees them: anything the parent's ``__init__`` does not accept is a
vtoken argument (``method``, ``keep``, ``site``, ``positions``, stage options...). ``method=none``
evaluates the unwrapped model, for the full-token baseline in the same run setup.

    lmms-eval --model vtoken_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=dart,keep=64 --tasks gqa

Registered through the ``lmms_eval.models`` entry-point group (see pyproject.toml); this module is
imported only by lmms-eval.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.models.simple.llava_hf import LlavaHf
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

import vtoken

NO_PRUNING = ("none", "full")


def _split_arguments(parent: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    accepted = set(inspect.signature(parent.__init__).parameters) - {"self", "kwargs"}
    own = {key: value for key, value in kwargs.items() if key not in accepted}
    return {key: value for key, value in kwargs.items() if key in accepted}, own


def _wrap(model: Any, options: dict[str, Any]) -> None:
    method = options.pop("method", "kcenter")
    if str(method).lower() in NO_PRUNING:
        options.pop("keep", None)
        if options:
            raise ValueError(f"method={method} runs the full model; it takes no other vtoken options: {sorted(options)}")
        return
    keep = options.pop("keep", None)
    vtoken.wrap(model, method, keep=keep, **options)


class _VTokenMixin:
    """Wraps ``self.model`` after the parent lmms-eval class has loaded it."""

    def _init_vtoken(self, parent: type, kwargs: dict[str, Any]) -> None:
        parent_kwargs, own = _split_arguments(parent, kwargs)
        parent.__init__(self, **parent_kwargs)
        _wrap(self.model, own)


class VTokenLlavaHf(_VTokenMixin, LlavaHf):
    def __init__(self, **kwargs: Any) -> None:
        # LlavaHf's default device_map="" reaches from_pretrained, which transformers 5 refuses; a
        # single-process run loads on `device` instead (what lmms-eval's Qwen2-VL class does)
        if not kwargs.get("device_map") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            kwargs["device_map"] = str(kwargs.get("device", "cuda"))
        self._init_vtoken(LlavaHf, kwargs)


class VTokenQwen2VL(_VTokenMixin, Qwen2_VL):
    def __init__(self, **kwargs: Any) -> None:
        self._init_vtoken(Qwen2_VL, kwargs)


class VTokenQwen25VL(_VTokenMixin, Qwen2_5_VL):
    def __init__(self, **kwargs: Any) -> None:
        self._init_vtoken(Qwen2_5_VL, kwargs)


def llava_hf_manifest() -> ModelManifest:
    return ModelManifest(model_id="vtoken_llava_hf", simple_class_path=f"{__name__}.VTokenLlavaHf")


def qwen2_vl_manifest() -> ModelManifest:
    return ModelManifest(model_id="vtoken_qwen2_vl", simple_class_path=f"{__name__}.VTokenQwen2VL")


def qwen2_5_vl_manifest() -> ModelManifest:
    return ModelManifest(model_id="vtoken_qwen2_5_vl", simple_class_path=f"{__name__}.VTokenQwen25VL")
