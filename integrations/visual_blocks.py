"""The visual placeholders of a prompt, as blocks and units: pure tensor code, no hooks.

A vision-language prompt holds runs of placeholder tokens, one run (block) per image or clip. The
integration encodes the images into units (an image, a view, a clip or a frame: the budget unit), the
stages keep some of each unit's features, and ``assemble_blocks`` turns what each unit kept back into
per-block keep masks and the feature each kept placeholder receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


@dataclass
class VisualBlock:
    """The run of placeholder tokens one image (or clip) fills in ``input_ids``.

    Blocks of one ``token_id`` fill that kind's placeholders in order. ``size`` is the number of
    placeholders. ``fill`` ``[size, D]`` holds the features of structural slots that belong to no unit
    (LLaVA-NeXT's row-end ``image_newline``); ``finalize`` turns the slots the units keep into the
    block's final keep mask (e.g. keeping a row's newline when the row keeps any token).
    """

    token_id: int
    size: int
    fill: Tensor | None = None
    finalize: Callable[[Tensor], Tensor] | None = None


@dataclass
class VisualUnit:
    """One budget unit at the projector: an image, a view of an image, a video clip or a frame.

    block:    index of the VisualBlock whose placeholders the unit's features go to.
    features: ``[N, D]`` features after the projector; grid: ``(h, w)`` when they form one.
    signals:  per-token signals ``[N, ...]`` the stages asked for.
    index:    the block slot of each feature, ascending (None: slots 0..N-1).
    """

    block: int
    features: Tensor
    grid: tuple[int, int] | None
    signals: dict[str, Tensor] = field(default_factory=dict)
    index: Tensor | None = None
    #: this unit's share of a budget the integration split itself (e.g. over an image's views)
    budget: int | None = None

    def slots(self) -> Tensor:
        if self.index is not None:
            return self.index
        return torch.arange(self.features.shape[0], device=self.features.device)


@dataclass
class Encoded:
    blocks: list[VisualBlock]
    units: list[VisualUnit]
    scoring_seconds: float = 0.0

    @classmethod
    def one_block_per_unit(cls, token_id: int, units: list[VisualUnit], slots: int | None = None,
                           scoring_seconds: float = 0.0) -> "Encoded":
        """The common layout: each unit fills its own block (of ``slots`` placeholders, default its size)."""
        blocks = []
        for i, unit in enumerate(units):
            unit.block = i
            blocks.append(VisualBlock(token_id=token_id, size=slots or unit.features.shape[0]))
        return cls(blocks=blocks, units=units, scoring_seconds=scoring_seconds)


@dataclass
class Prefill:
    """What the LLM-site hooks need to know about the sequence the language model is about to see."""

    visual: Tensor  # [B, L] bool: visual-token positions of the language model's input
    units: Tensor  # [B] images per row
    attention_mask: Tensor | None


def assemble_blocks(encoded: Encoded,
                    kept: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """Per block: the keep mask of its placeholder slots and the feature each slot receives."""
    masks, values = [], []
    for b, block in enumerate(encoded.blocks):
        mine = [i for i, unit in enumerate(encoded.units) if unit.block == b]
        dim = kept[mine[0]][0].shape[-1]
        device = kept[mine[0]][0].device
        value = block.fill.clone() if block.fill is not None else torch.zeros(
            block.size, dim, dtype=kept[mine[0]][0].dtype, device=device)
        mask = torch.zeros(block.size, dtype=torch.bool, device=device)
        for i in mine:
            features, slots = kept[i]
            if slots.numel() > 1 and not bool((slots[1:] > slots[:-1]).all()):
                raise RuntimeError("kept tokens must stay in placeholder order")
            mask[slots] = True
            value[slots] = features.to(value.dtype)
        if block.finalize is not None:
            mask = block.finalize(mask)
        masks.append(mask)
        values.append(value)
    return masks, values

def blocks_per_row(input_ids: Tensor, blocks: list[VisualBlock]) -> Tensor:
    """How many visual blocks (images or clips: the per-image budget unit) each row holds."""
    counts = torch.zeros(input_ids.shape[0], dtype=torch.long)
    for token_id in dict.fromkeys(block.token_id for block in blocks):
        sizes = iter([block.size for block in blocks if block.token_id == token_id])
        for row, tokens in enumerate((input_ids == token_id).sum(1).tolist()):
            while tokens > 0:
                tokens -= next(sizes)
                counts[row] += 1
    return counts.to(input_ids.device)
