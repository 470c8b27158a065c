"""Shared fixtures: tiny random-init models built from configs, fully offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from tiny_models import llava_batch, tiny_llava  # noqa: E402,F401


@pytest.fixture(params=["eager", "sdpa"])
def attn_implementation(request) -> str:
    return request.param
