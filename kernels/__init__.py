"""Scoring ops for vtoken stages: Triton kernels on CUDA, a torch reference everywhere else.

Import as ``vtoken.kernels``. Every op computes only what a stage needs (a few attention rows, the
similarity to a few pivots, one k-center step at a time) and never an N x N attention map; no path, the
torch reference included, holds an N x N matrix of any kind (the reference's nearest-neighbour pass works
in row blocks), so memory grows linearly with the token count.
"""

from .dispatch import attention_received, attention_rows, backend_for, cosine_to_pivots, kcenter_select

__all__ = ["attention_received", "attention_rows", "backend_for", "cosine_to_pivots", "kcenter_select"]
