"""Dispatch between the Triton kernels and the torch reference.

Triton when the tensors are on CUDA and triton is importable, the torch reference otherwise.
``VTOKEN_KERNELS=auto|torch|triton`` forces either (``triton`` on CPU tensors runs Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported: how the tests check the
kernels without a GPU). Stages and integrations call only the functions here.
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

from . import reference

BACKENDS = ("auto", "torch", "triton")


def backend_for(tensor: Tensor) -> str:
    """The backend that will run an op on ``tensor``: 'torch' or 'triton'."""
    choice = os.environ.get("VTOKEN_KERNELS", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"VTOKEN_KERNELS={choice!r}; accepted: {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("VTOKEN_KERNELS=triton but triton is not installed (pip install 'vtoken[kernels]')")
        return "triton"
    if tensor.is_cuda and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


def attention_rows(q: Tensor, k: Tensor, *, scale: float | None = None, key_mask: Tensor | None = None,
                   causal_limit: Tensor | None = None) -> Tensor:
    """Mean over heads of softmax(q k^T * scale) for a few query rows: ``[B, Q, N]`` float32.
    See ``reference.attention_rows`` for the exact semantics."""
    if backend_for(q) == "triton":
        from .attention_rows import attention_rows_triton

        return attention_rows_triton(q, k, scale=scale, key_mask=key_mask, causal_limit=causal_limit)
    return reference.attention_rows(q, k, scale=scale, key_mask=key_mask, causal_limit=causal_limit)


def cosine_to_pivots(x: Tensor, pivots: Tensor) -> Tensor:
    """Cosine similarity of every token ``[B, N, D]`` to every pivot ``[B, P, D]``: ``[B, P, N]``."""
    if backend_for(x) == "triton":
        from .similarity import cosine_to_pivots_triton

        return cosine_to_pivots_triton(x, pivots)
    return reference.cosine_to_pivots(x, pivots)


def kcenter_select(x: Tensor, k: int, *, valid: Tensor | None = None) -> Tensor:
    """Greedy k-center selection on cosine distance: ``[B, k]`` indices in selection order."""
    if backend_for(x) == "triton":
        from .kcenter import kcenter_select_triton

        return kcenter_select_triton(x, k, valid=valid)
    return reference.kcenter_select(x, k, valid=valid)
