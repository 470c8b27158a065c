"""Fixtures for the vLLM plugin's tests (run in .venv-vllm: `.venv-vllm/bin/python -m pytest -q tests_vllm`).

vLLM's engine cannot start on these CPU machines (its wheel has no CPU ops), so the tests build the parts
the plugin replaces: vLLM's multimodal processor from a ModelConfig, and the model class itself on the CPU
inside ``set_current_vllm_config`` with a one-process gloo group, on a tiny random Qwen2.5-VL checkpoint
written with ``save_pretrained`` (tests/tiny_models.py's config).
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
from vllm_helpers import model_config  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint folder with its processor (patch 2, 2x2 merge, at most 32 x 32 px)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from tiny_models import Q_PATCH, tiny_qwen
    from tiny_processors import QWEN_CHAT_TEMPLATE, save_tiny_checkpoint, word_tokenizer

    sizes = dict(patch_size=Q_PATCH, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8, max_pixels=32 * 32)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=word_tokenizer(),
                                    video_processor=Qwen2VLVideoProcessor(**sizes))
    folder = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    return save_tiny_checkpoint(tiny_qwen("2.5"), processor, folder, QWEN_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def vllm_model(checkpoint):
    """The plugin's model class built by vLLM's registry on the CPU, weights loaded from the checkpoint."""
    from safetensors.torch import load_file
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.utils.network_utils import get_open_port

    config = model_config(checkpoint, {"method": "kcenter", "keep": 0.25})
    vllm_config = VllmConfig(model_config=config)
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}")
        initialize_model_parallel(1)
        cls, _ = ModelRegistry.resolve_model_cls(config.architectures, config)
        model = cls(vllm_config=vllm_config)
        model.load_weights(load_file(str(checkpoint / "model.safetensors")).items())
        process_weights_after_loading(model, config, torch.device("cpu"))
        yield model.eval(), vllm_config
