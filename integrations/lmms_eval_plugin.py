"""lmms-eval plugin: ``vtoken_llava_hf``, ``vtoken_llava_onevision``, ``vtoken_internvl``, ``vtoken_qwen2_vl``,
``vtoken_qwen2_5_vl``, ``vtoken_qwen3_vl`` (Qwen3-VL, dense and MoE) and ``vtoken_qwen3_5`` (Qwen3.5).

Each model subclasses lmms-eval's own class (so its prompt building, batching and generation loop stay
lmms-eval's), then wraps the loaded model with vtoken. vtoken's arguments are taken out of
``--model_args`` before the parent sees them: anything the parent's ``__init__`` does not accept is a
vtoken argument (``method``, ``keep``, ``site``, ``positions``, stage options...). ``method=none``
evaluates the unwrapped model, for the full-token baseline in the same run setup. A configuration vtoken
refuses ends lmms-eval's command line with vtoken's message and exit status 2 (see ``_refuse``).

    lmms-eval --model vtoken_llava_hf \\
        --model_args "pretrained=llava-hf/llava-1.5-7b-hf,method=dart,keep=64" --tasks gqa

Registered through the ``lmms_eval.models`` entry-point group (see pyproject.toml); this module is
imported only by lmms-eval.
"""

from __future__ import annotations

import inspect
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

from lmms_eval.models.chat.internvl_hf import InternVLHf
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.models.simple.llava_hf import LlavaHf
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL
from lmms_eval.models.simple.qwen3_5 import Qwen3_5
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL

import vtoken

NO_PRUNING = ("none", "full")


def _split_arguments(parent: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    accepted = _parent_parameters(parent)
    own = {key: value for key, value in kwargs.items() if key not in accepted}
    return {key: value for key, value in kwargs.items() if key in accepted}, own


def _parent_parameters(parent: type) -> set[str]:
    """The keyword arguments the parent's ``__init__`` takes, following ``**kwargs`` up its classes
    (lmms-eval's Qwen3_5 passes its ``**kwargs`` on to Qwen3_VL)."""
    accepted: set[str] = set()
    for cls in parent.__mro__:
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters
        accepted |= {name for name, p in parameters.items()
                     if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            break
    return accepted


def _parent_defaults(parent: type) -> dict[str, Any]:
    """Default values of the parent's ``__init__`` arguments, the nearest class's first."""
    defaults: dict[str, Any] = {}
    for cls in parent.__mro__:
        if "__init__" in vars(cls):
            for name, p in inspect.signature(cls.__init__).parameters.items():
                if p.default is not p.empty:
                    defaults.setdefault(name, p.default)
    return defaults


def _device_map_follows_device(parent: type, kwargs: dict[str, Any]) -> None:
    """A single-process run without ``device_map`` loads the model on ``device`` (``--device``).

    The parents' default device_maps do not follow ``--device``: LlavaHf's ``""`` reaches
    ``from_pretrained``, which transformers 5 refuses; Qwen2_VL's ``"cuda"`` loads on the GPU under
    ``--device cpu``. Qwen2_5_VL's ``"auto"`` (layers spread over the GPUs) is kept on CUDA devices.
    """
    if kwargs.get("device_map") or int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return
    parameters = _parent_defaults(parent)
    device = str(kwargs.get("device") or parameters.get("device", "cuda"))
    default_map = parameters.get("device_map", "")
    if default_map == "auto" and device.startswith("cuda"):
        return
    kwargs["device_map"] = device


def _wrap(model: Any, options: dict[str, Any]) -> None:
    method = options.pop("method", "kcenter")
    if str(method).lower() in NO_PRUNING:
        options.pop("keep", None)
        if options:
            raise ValueError(f"method={method} runs the full model; it takes no other vtoken options: "
                             f"{sorted(options)}")
        return
    keep = options.pop("keep", None)
    vtoken.wrap(model, method, keep=keep, **options)


class _VTokenMixin:
    """Wraps ``self.model`` after the parent lmms-eval class (the next class in the MRO) has loaded it."""

    model_id = ""
    #: model_args defaults of this model that differ from the parent's
    defaults: dict[str, Any] = {}

    def __init__(self, **kwargs: Any) -> None:
        mro = type(self).__mro__
        parent = mro[mro.index(_VTokenMixin) + 1]
        kwargs = {**self.defaults, **kwargs}
        _device_map_follows_device(parent, kwargs)
        parent_kwargs, own = _split_arguments(parent, kwargs)
        parent.__init__(self, **parent_kwargs)
        try:
            _wrap(self.model, own)
        except (ValueError, TypeError) as error:
            _refuse(self.model_id, error)


def _refuse(model_id: str, error: Exception) -> None:
    """vtoken refused the configuration: re-raise it, except under lmms-eval's command line.

    lmms-eval's ``cli_evaluate`` catches every exception of a run, prints it and exits with status 0,
    so a refused configuration would read as a finished run. Under that command line the message goes
    to stderr and the process exits with status 2 (SystemExit passes through its ``except Exception``).
    """
    if not _under_lmms_eval_cli():
        raise error
    print(f"lmms-eval --model {model_id}: vtoken refused the model_args: {error}", file=sys.stderr)
    raise SystemExit(2)


def _under_lmms_eval_cli() -> bool:
    """Whether lmms-eval's ``cli_evaluate`` (``lmms-eval ...`` or ``python -m lmms_eval ...``) is running."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "cli_evaluate" and Path(code.co_filename).match("lmms_eval/__main__.py"):
            return True
        frame = frame.f_back
    return False


class VTokenLlavaHf(_VTokenMixin, LlavaHf):
    model_id = "vtoken_llava_hf"


class VTokenLlavaOnevision(_VTokenMixin, LlavaHf):
    """LLaVA-OneVision through lmms-eval's ``llava_hf`` class (it loads transformers'
    ``LlavaOnevisionForConditionalGeneration`` and feeds images or videos through the processor)."""

    model_id = "vtoken_llava_onevision"
    defaults = {"pretrained": "llava-hf/llava-onevision-qwen2-7b-ov-hf"}


class VTokenInternVL(_VTokenMixin, InternVLHf):
    """InternVL through lmms-eval's chat class ``internvl_hf`` (transformers' ``InternVLForConditionalGeneration``:
    it loads in bfloat16 and feeds tiles or video frames through the processor)."""

    model_id = "vtoken_internvl"


class VTokenQwen2VL(_VTokenMixin, Qwen2_VL):
    model_id = "vtoken_qwen2_vl"


class VTokenQwen25VL(_VTokenMixin, Qwen2_5_VL):
    model_id = "vtoken_qwen2_5_vl"


class VTokenQwen3VL(_VTokenMixin, Qwen3_VL):
    model_id = "vtoken_qwen3_vl"


class VTokenQwen35(_VTokenMixin, Qwen3_5):
    model_id = "vtoken_qwen3_5"


def _manifest(cls: type[_VTokenMixin], chat: bool = False) -> ModelManifest:
    path = f"{__name__}.{cls.__name__}"
    return ModelManifest(model_id=cls.model_id, **{"chat_class_path" if chat else "simple_class_path": path})


# The entry points of the ``lmms_eval.models`` group (pyproject.toml): each returns its model's manifest.
llava_hf_manifest = partial(_manifest, VTokenLlavaHf)
llava_onevision_manifest = partial(_manifest, VTokenLlavaOnevision)
# a chat model: lmms-eval builds its messages from a task's doc_to_visual / doc_to_text
internvl_manifest = partial(_manifest, VTokenInternVL, chat=True)
qwen2_vl_manifest = partial(_manifest, VTokenQwen2VL)
qwen2_5_vl_manifest = partial(_manifest, VTokenQwen25VL)
qwen3_vl_manifest = partial(_manifest, VTokenQwen3VL)
qwen3_5_manifest = partial(_manifest, VTokenQwen35)
