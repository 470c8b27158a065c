"""The signals a site can compute for its stages, named in one place.

A stage asks for signals by these names (``Stage.signals()``); each integration declares which ones it
provides at each site, and ``wrap`` refuses a pipeline whose stages ask a site for a signal it does not
provide, listing what the site offers.
"""

from __future__ import annotations

from typing import Iterable

#: attention of the [CLS] token to every patch (Qwen: the mean attention each patch receives)
CLS_ATTN = "cls_attn"
#: L2 norm of the update a vision block's MLP adds to each token (Representation Shift)
MLP_SHIFT = "mlp_shift"
#: attention of the last prompt token to every position at the layer before an llm(K) site (FastV)
LAST_QUERY_ATTN = "last_query_attn"
#: L1 norm of each position's key at the layer before an llm(K) site (DART's pivot score)
KEY_NORM = "key_norm"
#: the text tokens after the image with their normalised hidden states and key norms (DART's text pivots)
TEXT_TOKENS = "text_tokens"
#: TransPrune's token transition variation: per position, summed over decoder layers before an llm(K) site,
#: how much the attention and MLP blocks change it (output/input norm ratio x softmax of 1 - cosine)
TOKEN_TRANSITION = "token_transition"
#: attention of the text after the image (the instruction) to every position, with layer K's own q/k
INSTRUCTION_ATTN = "instruction_attn"
#: SparseVLM: attention of the raters (prompt text after the image most similar to the visual tokens at the
#: decoder input) to every position at the layer before an llm(K) site, mean over heads and raters
RATER_ATTN = "rater_attn"
#: MustDrop: ``[B, L, 2]``, the attention of the text after the image to every position at the layer before an
#: llm(K) site, mean over heads; column 0 summed over the text tokens (global), column 1 their maximum
TEXT_ATTN_DUAL = "text_attn_dual"
#: at a decode step: the new token's attention to each cached visual entry, mean over heads (and layers)
DECODE_ATTN = "decode_attn"
#: attention each patch receives in chosen encoder layers, mean over heads and queries, one column per layer
ENCODER_ATTN = "encoder_attn"
#: the language model's input embeddings of the text after a row's last visual token (the instruction)
PROMPT_TEXT = "prompt_text"
#: ``[B, N]`` bool: the tokens an earlier site's stage pinned (``Keep.pinned``, e.g. MustDrop's key set), carried
#: with the tokens from the projector into the decoder; a stage that asks for it decides what pins mean to it
PINNED = "pinned"

DESCRIPTIONS = {
    CLS_ATTN: "[CLS] attention",
    MLP_SHIFT: "MLP update norm",
    LAST_QUERY_ATTN: "last-prompt-token attention",
    KEY_NORM: "key L1 norms",
    TEXT_TOKENS: "text tokens after the image",
    TOKEN_TRANSITION: "token transition variation in the layers before K",
    INSTRUCTION_ATTN: "the instruction's attention at layer K",
    RATER_ATTN: "the visual-relevant text raters' attention at layer K-1",
    TEXT_ATTN_DUAL: "the text's summed and maximum attention at layer K-1",
    DECODE_ATTN: "the new token's attention to the cached visual entries",
    ENCODER_ATTN: "attention received in encoder layers",
    PROMPT_TEXT: "embeddings of the prompt text after the image",
    PINNED: "tokens an earlier site pinned",
}

VISION = frozenset({CLS_ATTN, MLP_SHIFT})
LLM = frozenset({LAST_QUERY_ATTN, KEY_NORM, TEXT_TOKENS, TOKEN_TRANSITION, INSTRUCTION_ATTN, RATER_ATTN,
                 TEXT_ATTN_DUAL})
DECODE = frozenset({DECODE_ATTN})


def describe(names: Iterable[str]) -> str:
    """``'cls_attn' ([CLS] attention), ...`` in a stable order."""
    return ", ".join(f"{name!r} ({DESCRIPTIONS.get(name, 'custom')})" for name in sorted(names))
