"""Kernel tests run the Triton kernels through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is defined (the kernel modules are
imported lazily, on the first Triton dispatch), so it is set here, at import time. Run with
TRITON_INTERPRET=0 on a CUDA machine to check the compiled kernels on the GPU instead; add
VTOKEN_TEST_REQUIRE_CUDA=1 (as scripts/gpu_check.sh does) to make a missing GPU or triton fail the run
rather than skip the kernel tests, so that a run meant for the GPU cannot pass without one.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

torch.set_num_threads(1)

INTERPRET = os.environ["TRITON_INTERPRET"].strip().lower() in ("1", "true", "yes", "on")
REQUIRE_CUDA = os.environ.get("VTOKEN_TEST_REQUIRE_CUDA", "").strip().lower() in ("1", "true", "yes", "on")


def _unavailable(reason: str) -> None:
    if REQUIRE_CUDA:
        pytest.fail(f"{reason} (VTOKEN_TEST_REQUIRE_CUDA is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def device() -> str:
    """Where kernel inputs live: CPU under the interpreter, else the GPU."""
    if INTERPRET:
        if REQUIRE_CUDA:
            pytest.fail("TRITON_INTERPRET is on: the kernels would run in the interpreter, not on the GPU",
                        pytrace=False)
        return "cpu"
    if not torch.cuda.is_available():
        _unavailable("TRITON_INTERPRET is off and there is no CUDA device")
    return "cuda"


@pytest.fixture
def triton_backend(monkeypatch, device):
    """Force the Triton path (skipped where triton is not installed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        _unavailable("triton is not installed")
    monkeypatch.setenv("VTOKEN_KERNELS", "triton")
    return "triton"
