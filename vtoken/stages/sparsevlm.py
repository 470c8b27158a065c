"""SparseVLM: visual tokens rated by visual-relevant text, pruned inside the decoder, the pruned recycled.

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (Zhang et
al., ICML 2025; authors' code github.com/Gumpest/SparseVLMs). Followed:
- Raters: from the decoder input, per visual token a softmax over the prompt text after the image of its
  dot products with the text tokens; averaged over the visual tokens, the text tokens above the mean
  are the raters (chosen once per prompt, used at every site).
- Score (``rater_attn``): the raters' attention to each visual token, mean over heads and raters.
- Keep the top-scoring visual tokens; of the deleted ones, the top 30 % by score (``int(0.3 d) + 1``)
  are recycled: clustered by density peaks over k nearest neighbours (DPC-KNN: local density from the
  k = c nearest distances, distance to the nearest denser token, centres = the c largest
  density x distance, every candidate to its nearest centre) into ``c = int(candidates / 10) + 1``
  tokens, each the plain mean of its members' hidden states. Later sites rate the merged tokens too.
- The authors' LLaVA-1.5 schedule prunes after decoder layers 2, 6 and 15 (0-based) with the layer's own
  attention; vtoken's llm(K) prunes before layer K with layer K-1's attention, which is the same place:
  ``llm(3)``, ``llm(7)``, ``llm(16)``. Their 192-token setting keeps 300, 200 and 110 tokens and adds
  9, 4 and 3 recycled ones: ``Pipeline([SparseVLM(site="llm(3)", keep=309), SparseVLM(site="llm(7)",
  keep=204), SparseVLM(site="llm(16)", keep=113)])``.
Where vtoken differs, and why:
- Count: the paper sets each layer's count from the rank of the raters' attention matrix
  (lambda x (L_v - rank)), which makes it input-dependent; the authors' released code fixes the counts
  per layer instead (its rank is 0). vtoken follows the code and its own exact-budget convention: ``k``
  visual tokens, kept plus recycled, leave the site, exactly. The kept count m is the largest with
  m + c(m) = k, c(m) being the authors' cluster count for the tokens that m leaves deleted (none
  recycled when even m = 0 leaves too many clusters for k).
- The merged tokens keep the sequence position (and rotary position) of their cluster's centre; the code
  appends them after the kept visual tokens and renumbers every position. vtoken keeps original
  positions everywhere so that cached decoding and padded batches stay exact.
- Ties: the authors add 1e-6 noise to the densities; vtoken breaks ties by the lower index (deterministic).
- The attention is recomputed from layer K-1's q/k (no attention map asked of the model), over each
  row's own positions, so a padded batch equals its rows alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..registry import register_stage
from ..tokens import Keep, TokenSet, sorted_topk
from .base import Stage, option

#: share of the deleted tokens recycled, and candidates per merged token (the authors' constants)
RECYCLE_SHARE = 0.3
PER_CLUSTER = 10


def recycled_counts(deleted: int) -> tuple[int, int]:
    """(candidates, clusters) for ``deleted`` pruned tokens, as the authors' code counts them."""
    if deleted <= 0:
        return 0, 0
    candidates = int(deleted * RECYCLE_SHARE) + 1
    return candidates, int(candidates / PER_CLUSTER) + 1


def split_budget(n: int, k: int, recycle: bool) -> int:
    """Kept tokens m out of ``n`` such that m plus the recycled clusters is exactly ``k``."""
    if not recycle or k >= n:
        return min(k, n)
    for kept in range(k - 1, -1, -1):
        if kept + recycled_counts(n - kept)[1] == k:
            return kept
    return k  # too small a budget for any cluster: plain pruning


def density_peaks(x: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN over ``x`` ``[n, D]``: the centres (in choice order) and each token's cluster ``[n]``."""
    dist = torch.cdist(x[None], x[None])[0] / x.shape[-1] ** 0.5
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:clusters]
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(clusters, device=x.device)
    return centres, assign


@register_stage("sparsevlm")
class SparseVLM(Stage):
    recycle: bool = option(True, "merge the best-rated pruned tokens into a few recycled tokens (counted in keep); "
                                 "False: prune only")

    site_kinds: ClassVar[tuple[str, ...]] = ("llm",)
    default_site: ClassVar[str] = "llm(3)"
    merging: ClassVar[bool] = True

    def signals(self) -> dict[str, Any]:
        return {"rater_attn": {}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        score = tokens.signals["rater_attn"].float()
        batch, n = score.shape
        kept = split_budget(n, k, self.recycle)
        if kept == k:
            return Keep(indices=sorted_topk(score, k))
        hidden = tokens.context.get("hidden", tokens.features)
        rows = [self._select_row(score[row], hidden[row], kept, k) for row in range(batch)]
        indices, assign = (torch.stack(parts) for parts in zip(*rows))
        members = (assign[..., None] == torch.arange(k, device=score.device)).to(hidden.dtype)  # [B, N, k]
        features = members.transpose(1, 2) @ hidden / members.sum(1)[..., None]
        return Keep(indices=indices, features=features, assign=assign)

    def _select_row(self, score: Tensor, hidden: Tensor, kept: int, k: int) -> tuple[Tensor, Tensor]:
        n = score.shape[0]
        order = torch.sort(score, descending=True, stable=True).indices
        deleted = order[kept:]  # best-rated first
        candidates, clusters = recycled_counts(n - kept)
        pool = deleted[:candidates]
        centres, cluster = density_peaks(hidden[pool].float(), clusters)
        slots = torch.cat([order[:kept], pool[centres]]).sort().values
        assign = torch.full((n,), -1, dtype=torch.long, device=score.device)
        slot_of = torch.empty(n, dtype=torch.long, device=score.device)
        slot_of[slots] = torch.arange(k, device=score.device)
        assign[order[:kept]] = slot_of[order[:kept]]
        assign[pool] = slot_of[pool[centres]][cluster]
        return slots, assign
