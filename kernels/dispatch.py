"""Dispatch between the Triton kernels and the torch reference.

Triton when the tensors are on CUDA and triton is importable, the torch reference otherwise.
``VTOKEN_KERNELS=auto|torch|triton`` forces either (``triton`` on CPU tensors runs Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported: how the tests check the
kernels without a GPU). Stages and integrations call only the functions here.

triton is imported only once the Triton path is taken, so ``import vtoken.kernels`` works without it.
The kernel modules are named after the kernels' subject (``attention``, ``received_attention``,
``similarity``, ``kcenter``) rather than after these functions: importing a submodule binds its name on
the package, which would otherwise replace the exported function of the same name.
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

from . import reference

BACKENDS = ("auto", "torch", "triton")


def backend_for(tensor: Tensor) -> str:
    """The backend that will run an op on ``tensor``: 'torch' or 'triton'."""
    choice = os.environ.get("VTOKEN_KERNELS", "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"VTOKEN_KERNELS={choice!r}; accepted: {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    has_triton = importlib.util.find_spec("triton") is not None
    if choice == "triton":
        if not has_triton:
            raise ValueError("VTOKEN_KERNELS=triton but triton is not installed "
                             "(pip install 'vtoken[kernels]')")
        return "triton"
    return "triton" if tensor.is_cuda and has_triton else "torch"


def _check_attention_args(q: Tensor, k: Tensor, key_mask: Tensor | None, causal_limit: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("q and k must be [B, H, rows, d] and [B, H, N, d]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}")
    batch, heads, rows, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: same batch and head dim, "
                         "and query heads a multiple of key heads")
    if key_mask is not None and tuple(key_mask.shape) != (batch, k.shape[2]):
        raise ValueError(f"key_mask must be [B, N] = {(batch, k.shape[2])}; got {tuple(key_mask.shape)}")
    if causal_limit is not None and tuple(causal_limit.shape) != (batch, rows):
        raise ValueError(f"causal_limit must be [B, rows] = {(batch, rows)}; got {tuple(causal_limit.shape)}")


def attention_rows(q: Tensor, k: Tensor, *, scale: float | None = None, key_mask: Tensor | None = None,
                   causal_limit: Tensor | None = None) -> Tensor:
    """Mean over heads of softmax(q k^T * scale) for a few query rows: ``[B, Q, N]`` float32.
    See ``reference.attention_rows`` for the exact semantics."""
    _check_attention_args(q, k, key_mask, causal_limit)
    if backend_for(q) == "triton":
        from .attention import attention_rows_triton

        return attention_rows_triton(q, k, scale=scale, key_mask=key_mask, causal_limit=causal_limit)
    return reference.attention_rows(q, k, scale=scale, key_mask=key_mask, causal_limit=causal_limit)


def attention_received(q: Tensor, k: Tensor, *, scale: float | None = None,
                       key_mask: Tensor | None = None) -> Tensor:
    """The attention each key receives, mean over query heads and query rows: ``[B, N]`` float32 (the
    column means of the head-averaged map, never built). See ``reference.attention_received``."""
    _check_attention_args(q, k, key_mask, None)
    if backend_for(q) == "triton":
        from .received_attention import attention_received_triton

        return attention_received_triton(q, k, scale=scale, key_mask=key_mask)
    return reference.attention_received(q, k, scale=scale, key_mask=key_mask)


def cosine_to_pivots(x: Tensor, pivots: Tensor) -> Tensor:
    """Cosine similarity of every token ``[B, N, D]`` to every pivot ``[B, P, D]``: ``[B, P, N]``
    float32, each norm clamped below at ``reference.COSINE_EPS``."""
    if x.dim() != 3 or pivots.dim() != 3 or pivots.shape[0] != x.shape[0] or pivots.shape[2] != x.shape[2]:
        raise ValueError("x must be [B, N, D] and pivots [B, P, D]; "
                         f"got {tuple(x.shape)}, {tuple(pivots.shape)}")
    if backend_for(x) == "triton":
        from .similarity import cosine_to_pivots_triton

        return cosine_to_pivots_triton(x, pivots)
    return reference.cosine_to_pivots(x, pivots)


def kcenter_select(x: Tensor, k: int, *, valid: Tensor | None = None) -> Tensor:
    """Greedy k-center selection on cosine distance: ``[B, k]`` indices in selection order.
    See ``reference.kcenter_select`` for the exact semantics."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D]; got {tuple(x.shape)}")
    if valid is not None and tuple(valid.shape) != tuple(x.shape[:2]):
        raise ValueError(f"valid must be [B, N] = {tuple(x.shape[:2])}; got {tuple(valid.shape)}")
    if backend_for(x) == "triton":
        from .kcenter import kcenter_select_triton

        return kcenter_select_triton(x, k, valid=valid)
    return reference.kcenter_select(x, k, valid=valid)
