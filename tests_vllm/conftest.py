"""Fixtures for the vLLM plugin's tests (run in .venv-vllm: `.venv-vllm/bin/python -m pytest -q tests_vllm`).

vLLM's engine cannot start on these CPU machines (its wheel has no CPU ops), so the tests build the parts
the plugin replaces: vLLM's multimodal processor from a ModelConfig, and the model classes themselves on
the CPU inside ``set_current_vllm_config`` with a one-process gloo group, on tiny random Qwen2.5-VL,
Qwen3-VL and LLaVA-1.5 checkpoints written with ``save_pretrained`` (tests/tiny_models.py's configs).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# the helpers beside this file (pytest's importlib mode leaves this folder off sys.path)
sys.path.insert(0, str(Path(__file__).parent))
from vllm_helpers import FAMILIES, model_config  # noqa: E402


def _tiny(family: str):
    """The tiny model and its processor (patch 2, 2x2 merge, at most 32 x 32 px per image)."""
    from tiny_models import Q_PATCH, tiny_llava, tiny_qwen, tiny_qwen3_vl
    from tiny_processors import tiny_llava_processor, tiny_qwen3_vl_processor, word_tokenizer

    if family == "qwen3_vl":
        return tiny_qwen3_vl(), tiny_qwen3_vl_processor()
    if family == "llava":
        return tiny_llava(), tiny_llava_processor()
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    sizes = dict(patch_size=Q_PATCH, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8, max_pixels=32 * 32)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=word_tokenizer(),
                                    video_processor=Qwen2VLVideoProcessor(**sizes))
    return tiny_qwen("2.5"), processor


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> a checkpoint folder written with save_pretrained (made on first use)."""
    from tiny_processors import LLAVA_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE, save_tiny_checkpoint

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            model, processor = _tiny(family)
            template = LLAVA_CHAT_TEMPLATE if family == "llava" else QWEN_CHAT_TEMPLATE
            made[family] = save_tiny_checkpoint(model, processor, tmp_path_factory.mktemp(family), template)
        return made[family]

    return get


def _name_missing_cpu_ops() -> None:
    """vLLM's QuickGELU (CLIP, so LLaVA) looks up ``torch.ops._C.gelu_quick`` when it is built, though on an
    x86 CPU its forward is the native torch one; this wheel ships no CPU ops, so the op is defined here
    (calling it would raise) to let the layer be built. Nothing the tests compare runs through it."""
    if not hasattr(torch.ops._C, "gelu_quick"):
        library = torch.library.Library("_C", "FRAGMENT")  # noqa: F841 (kept alive by torch's registry)
        library.define("gelu_quick(Tensor(a!) out, Tensor x) -> ()")
        _LIBRARIES.append(library)


_LIBRARIES: list = []


def _hub_names(family: str, weights: dict) -> dict:
    """transformers 5.20 saves LLaVA's CLIP tower as ``vision_tower.embeddings...``; the hub's LLaVA-1.5
    checkpoints, which vLLM's loader maps, name it ``vision_tower.vision_model.embeddings...``."""
    if family != "llava":
        return weights
    prefix = "vision_tower."
    return {(prefix + "vision_model." + name[len(prefix):] if name.startswith(prefix)
             and not name.startswith(prefix + "vision_model.") else name): value for name, value in weights.items()}


@pytest.fixture(scope="session")
def vllm_models(checkpoints):
    """family -> (the plugin's model class built by vLLM's registry on the CPU with the checkpoint's weights
    loaded through vLLM's load_weights, its VllmConfig); call the model inside set_current_vllm_config."""
    from safetensors.torch import load_file
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.utils.network_utils import get_open_port

    built: dict[str, tuple] = {}
    _name_missing_cpu_ops()

    def get(family: str):
        if family in built:
            return built[family]
        checkpoint = checkpoints(family)
        config = model_config(checkpoint, {"method": "kcenter", "keep": 0.25}, FAMILIES[family]["arch"])
        vllm_config = VllmConfig(model_config=config)
        with set_current_vllm_config(vllm_config):
            if not model_parallel_is_initialized():  # one process group for the session
                init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                             distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}")
                initialize_model_parallel(1)
            cls, _ = ModelRegistry.resolve_model_cls(config.architectures, config)
            model = cls(vllm_config=vllm_config)
            model.load_weights(_hub_names(family, load_file(str(checkpoint / "model.safetensors"))).items())
            process_weights_after_loading(model, config, torch.device("cpu"))
        built[family] = (model.eval(), vllm_config)
        return built[family]

    return get
