"""HoliTom's merging inside the LLM: at decoder layer K the visual tokens the last prompt token attends to
least are merged into the kept visual token each is most similar to.

Paper: Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (NeurIPS 2025),
its inner-LLM similarity-based merging; the authors' public code (cokeshao/HoliTom,
``holitom/modeling_qwen2.py``, ``HOLITOM_k`` / ``HOLITOM_r``) is the reference for the procedure.
Followed:
- Attention: the last prompt token's attention row in decoder layer K-1, the mean over heads (vtoken's
  ``last_query_attn`` signal, as FastV's); the ``k`` visual tokens it attends to most are kept.
- Similarity: the cosine similarity of the residual-stream hidden states entering layer K (not normed);
  each pruned visual token goes to its most similar kept visual token (ties: the more attended one, as
  the authors' max over their attention-ordered kept tokens picks it).
- Layer and share: the authors prune at layer index 18 of LLaVA-OneVision-7B's 28 with layer 17's
  attention, keeping half (``HOLITOM_k=18``, ``HOLITOM_r=0.5``). vtoken's ``llm(K)`` prunes before layer
  K with layer K-1's attention, the same place: the default site is ``llm(18)`` and the default keep 0.5.
  The named pipeline ``holitom_full`` (HoliTom's outer merge at the projector, this stage at 18/28 of the
  wrapped decoder's depth, keeping half of what the outer merge keeps) is the authors' full method.
Where vtoken differs, and why:
- Averaging weights: the authors' code folds the pruned tokens into their targets one at a time, in
  position order, each time replacing the target by the mean of it and the newcomer, so the last token
  merged weighs 1/2 and the kept token itself 1/2^m. vtoken gives a kept token and the m tokens merged
  into it equal weights, 1/(m + 1): that is the merge the ``llm(K)`` site applies for every merging stage,
  the same in the cached prefill and in the no-cache recomputation of a generate call, and it does not
  depend on the order of positions. With one merged token (m = 1) the two rules agree.
- Budget: ``k`` per row exactly (the authors' ``round(N * (1 - r))``), ties in attention to the lower
  position (a stable sort; the authors' ``topk`` leaves them unspecified).
- Batches: each row is scored on its own attention and positions (the authors' code reads row 0's
  image span and assumes a batch of one).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..registry import register_pipeline, register_stage
from ..tokens import Keep, TokenSet
from .fastv import FastV


@register_stage("holitom_llm")
class HoliTomLLM(FastV):
    """FastV's choice (its site kind, signal and default half), with the pruned tokens merged in."""

    default_site: ClassVar[str] = "llm(18)"
    merging: ClassVar[bool] = True

    def select(self, tokens: TokenSet, k: int) -> Keep:
        score = tokens.signals["last_query_attn"].float()
        hidden = tokens.context.get("hidden", tokens.features)
        by_attention = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]  # most attended first
        indices = by_attention.sort(dim=-1).values
        assign = merge_targets(hidden.float(), by_attention, indices)
        members = (assign[..., None] == torch.arange(k, device=score.device)).to(hidden.dtype)  # [B, N, k]
        features = members.transpose(1, 2) @ hidden / members.sum(1)[..., None]
        return Keep(indices=indices, features=features, assign=assign)


def merge_targets(hidden: Tensor, by_attention: Tensor, indices: Tensor) -> Tensor:
    """``[B, N]``: the slot (position in ``indices``) each token joins: its own for a kept token, else the kept
    token of highest cosine similarity, the first of ``by_attention`` on ties."""
    batch, n, _ = hidden.shape
    unit = torch.nn.functional.normalize(hidden, dim=-1)
    kept = unit.gather(1, by_attention[..., None].expand(-1, -1, unit.shape[-1]))  # [B, k, D], attention order
    best = (unit @ kept.transpose(1, 2)).argmax(-1)  # [B, N], first maximum
    slot_of = torch.empty(batch, n, dtype=torch.long, device=hidden.device)
    slot_of.scatter_(1, indices, torch.arange(indices.shape[1], device=hidden.device).expand_as(indices))
    assign = slot_of.gather(1, by_attention.gather(1, best))
    return assign.scatter_(1, indices, slot_of.gather(1, indices))


# HoliTom with its inner-LLM merging: the outer merge at the projector keeps 2 x keep (the authors' r = 0.5
# halves it inside the LLM), then this stage at layer 18 of 28 (their LLaVA-OneVision-7B setting), at the
# same share of the wrapped model's depth.
register_pipeline("holitom_full", "holitom@projector+holitom_llm@llm(18)", factors=(2, 1), depths=(None, 18 / 28))
