"""Dynamic pruning of visual KV-cache entries while decoding, DyCoke's second part (``dycoke_kv``).

Paper: Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (CVPR
2025); the authors' public code (KD-TAO/DyCoke: ``PrunableDynamicCache.dycoke_pruning`` and the decoder
forward in their ``modeling_qwen2.py``) is the reference for the procedure.

What the authors do, at every decoding step: the attention the new token pays in decoder layer L-1
(L=3, so layer 2), mean over heads, is read at the visual positions; if its cosine similarity with the
previous step's row is below 0.9 (always at the first step), the top ``(1 - p)`` share (p=0.8) of the
*whole* visual set by that row is chosen; layers L and later then attend to the text, the chosen visual
entries and the generated tokens. Their cache keeps every entry and only gathers the chosen ones per
step, so an entry dropped at one step can be chosen again at a later one.

This stage runs on vtoken's ``decode`` site (default ``decode``: a choice after every step, as the
authors), scored by the site's ``decode_attn`` row at ``layer=2`` (the authors' L-1) and keeping the
top-k by it (ties keep the lower position). Composed with the temporal merging before the LLM:
``wrap(model, "dycoke+dycoke_kv@decode", keep=k_kv, dycoke={"keep": k_ttm})``.

Where vtoken differs, and why:
- Dropped entries do not come back. The ``decode`` site frees what a choice removes (every layer's key
  and value tensors are gathered into shorter ones), so each choice is among the entries still cached.
  Bringing entries back would need the site to keep the whole prompt's entries aside and mask them per
  step instead, which gives up the memory saving the site exists for; it is not built. With an int
  budget (entries per clip) the first choice, after the first decoding step, is the authors' choice at
  that step (the whole visual set is still cached then); every later choice keeps the same entries,
  because the cap is already reached. A fraction budget is of the entries present at each choice and
  compounds, as for every decode-site stage: to prune the authors' 80 %, give the int ``0.2 x`` the
  clip's tokens as ``keep``.
- The similarity gate (re-choose only when the attention row changed, cosine < 0.9) is left out: with
  entries that cannot come back it would only decide whether a later choice re-ranks a set it cannot
  grow, and with an int budget those choices change nothing anyway.
- One choice serves every layer: the authors prune only layers L and later (layers before L keep the
  whole prompt); the site keeps one set of entries for all layers, which frees more memory.
- Candidates are visual entries only (any visual token, a video clip's or an image's); text and
  generated tokens always stay, as in the authors' code.
"""

from __future__ import annotations

from ..registry import register_stage
from .base import option
from .decode_topk import DecodeTopK


@register_stage("dycoke_kv")
class DyCokeKV(DecodeTopK):
    """``decode_topk`` with the authors' scoring layer as its default."""

    layer: int | None = option(2, "decoder layer whose attention row scores the entries (2: the authors' L-1 with L=3; "
                                  "negative counts from the end; None: the mean of every layer's row)")

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"dycoke_kv layer={self.layer!r}; accepted: an int (a decoder layer, negative from "
                             "the end) or None (the mean of every layer)")
        super().__post_init__()
