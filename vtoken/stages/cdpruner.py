"""Conditional diversity: a determinantal point process over the visual tokens, conditioned on the
instruction (CDPruner).

Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
(Zhang et al., NeurIPS 2025); the authors' code (Theia-4869/CDPruner) is the reference for the procedure.
Inputs: the visual tokens after the projector, and the instruction's text tokens (``prompt_text``: the
input embeddings of the row's text after its last visual token). Per image:
1. Similarity ``S = cos(x_i, x_j)`` between the visual tokens.
2. Relevance ``r_i``: the mean cosine between token i and the text tokens, min-max normalised over the
   image's tokens (plus 1e-6, as the reference). With ``theta`` set, ``r = exp(theta / (2 (1 - theta)) r)``
   (the paper's relevance weighting; the reference code leaves it off, as does the default).
3. Kernel ``L = diag(r) S diag(r)``; selection: the greedy MAP of the DPP with kernel L (Chen et al.'s
   fast greedy MAP: incremental Cholesky rows, each step adds the token with the largest marginal gain,
   i.e. the largest determinant ``det(L_S+j)``). Kept tokens are returned in original order.

Where vtoken differs, and why:
- Relevance space: the reference embeds the instruction with CLIP's text tower and compares it with the
  CLIP image embeddings, and negates the similarity; vtoken needs no second model: it compares the
  projected visual tokens with the language model's own input embeddings of the instruction, which live
  in the same space, so relevance is the plain (not negated) similarity.
- Normalisation is per image: the reference takes min and max over the whole batch, which would make a
  row's selection depend on the other rows.
- When the kernel is exhausted (more tokens asked than its rank, e.g. keep-all), the remaining tokens are
  taken in order of their leftover gain (lower position first on ties) instead of dividing by a zero or
  negative pivot, which in the reference gives NaN.
- No text after the image (e.g. the question comes first): relevance is uniform, and the DPP keeps the
  most diverse tokens.
- The N x N kernel is never built (the reference builds it): each greedy step needs only its diagonal and
  the chosen token's row, so memory grows as k * N, which matters at Qwen's thousands of tokens per image.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..registry import register_stage
from ..tokens import Keep, TokenSet
from .base import Stage, option

#: a pivot (leftover gain) at or below this is treated as zero: the kernel has no direction left
EXHAUSTED = 1e-10


@register_stage("cdpruner")
class CDPruner(Stage):
    theta: float | None = option(None, "relevance weight in (0, 1): r = exp(theta / (2 (1 - theta)) r); None: r as it "
                                       "is (the authors' code)")

    site_kinds: ClassVar[tuple[str, ...]] = ("projector",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.theta is not None and not 0.0 < self.theta < 1.0:
            raise ValueError(f"cdpruner theta={self.theta!r}; accepted: None or a float in (0, 1)")

    def signals(self) -> dict[str, dict[str, Any]]:
        return {"prompt_text": {}}

    def relevance(self, tokens: TokenSet) -> Tensor:
        """``[B, N]`` relevance of each visual token to its row's instruction."""
        x = torch.nn.functional.normalize(tokens.features.float(), dim=-1)
        text = torch.nn.functional.normalize(tokens.context["prompt_text"].float(), dim=-1)
        if text.shape[1] == 0:
            return torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        mean = (x @ text.transpose(1, 2)).mean(-1)
        low, high = mean.amin(-1, keepdim=True), mean.amax(-1, keepdim=True)
        relevance = (mean - low + 1e-6) / (high - low).clamp(min=1e-12)
        if self.theta is not None:
            relevance = torch.exp(self.theta / (2 * (1 - self.theta)) * relevance)
        return relevance

    def select(self, tokens: TokenSet, k: int) -> Keep:
        x = torch.nn.functional.normalize(tokens.features.float(), dim=-1)
        return Keep(indices=greedy_map(x, self.relevance(tokens), k).sort(dim=-1).values)


def greedy_map(x: Tensor, r: Tensor, k: int) -> Tensor:
    """The greedy MAP of the DPP with kernel ``L = diag(r) (x x^T) diag(r)`` for unit rows ``x`` ``[B, N, D]``
    and relevance ``r`` ``[B, N]``: ``[B, k]`` positions in the order chosen. L is never built: each step
    needs its diagonal and the chosen token's row, so memory grows as k * N, not N^2."""
    batch, n, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    # diag(L) = d_i^2, what token i adds to log det: r_i^2 for a unit row (exactly, so that equal relevance ties
    # exactly and the lower position wins, rather than the rounding of |x_i|^2), 0 for an all-zero token
    gains = r.square() * (x.abs().sum(-1) > 0)
    factors = x.new_zeros(k, batch, n)  # the Cholesky rows of the chosen tokens
    chosen = torch.empty(batch, k, dtype=torch.long, device=x.device)
    taken = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    for step in range(k):
        j = gains.masked_fill(taken, -float("inf")).argmax(dim=-1)  # first maximum on ties
        chosen[:, step] = j
        taken[rows, j] = True
        pivot = gains[rows, j]
        live = pivot > EXHAUSTED
        kernel_row = r * (x @ x[rows, j][:, :, None])[..., 0] * r[rows, j][:, None]  # L[j, :]
        projection = torch.einsum("tb,tbn->bn", factors[:step, rows, j], factors[:step])
        row = (kernel_row - projection) / pivot.clamp(min=EXHAUSTED).sqrt()[:, None]
        row = torch.where(live[:, None], row, torch.zeros_like(row))
        factors[step] = row
        gains = gains - row.square()
    return chosen
