"""Kernel tests run the Triton kernels through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is defined (the kernel modules are
imported lazily, on the first Triton dispatch), so it is set here, at import time. Run with
TRITON_INTERPRET=0 on a CUDA machine to check the compiled kernels on the GPU instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

torch.set_num_threads(1)

INTERPRET = os.environ["TRITON_INTERPRET"].strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture
def device() -> str:
    """Where kernel inputs live: CPU under the interpreter, else the GPU."""
    if INTERPRET:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")
    return "cuda"


@pytest.fixture
def triton_backend(monkeypatch, device):
    """Force the Triton path (skipped where triton is not installed)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("VTOKEN_KERNELS", "triton")
    return "triton"
