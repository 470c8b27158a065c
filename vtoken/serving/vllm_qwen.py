"""What vtoken's pruning changes in vLLM's Qwen vision-language models (imported by vLLM only).

Three parts of vLLM's own classes are replaced, nothing else is copied; the family files
(``vllm_qwen2_5_vl.py``, ``vllm_qwen3_vl.py``) put these mixins in front of vLLM's classes:
- the processor gives each image exactly K placeholders, K = what the plan keeps of its merged grid
  (``ServingPlan.tokens_per_image``), and its multimodal cache keys carry the plan (``vllm_common``);
- ``embed_multimodal`` runs vLLM's vision tower, then vtoken's stages on each image's merged features
  through the transformers integrations' own projector step (``vllm_common.select_kept``); it returns
  the K kept features;
- positions: kept tokens keep their full-grid M-RoPE positions and the text after an image starts where
  it would after the whole image, as the transformers integrations (``positions='original'``) compute
  them. The prompt's layout is known before the model runs but which tokens are kept is not, so
  ``get_mrope_input_positions`` lays out the text (and provisional image positions), and the kept
  tokens' positions travel as four extra channels of each image's embeddings -- (t, h, w) on the full
  grid and the image's extent, max position + 1 -- which ``recompute_mrope_positions`` writes into the
  prompt's positions and strips before the decoder. That is the runner's hook vLLM built for its video
  pruning (EVS), overridden here; the model runner calls it only while
  ``MultiModalConfig.is_multimodal_pruning_enabled()`` holds, which vLLM ties to ``--video-pruning-rate``,
  so the model turns it on for its own config instead. A video pruning rate is refused: EVS and vtoken
  would both shape the same positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from .vllm_common import PlanKeyedProcessor, plan_of, select_kept

#: channels appended to each item's embeddings: t, h, w on the full grid, and the item's extent
POSITION_CHANNELS = 4


def refuse_video_pruning(multimodal_config: Any) -> None:
    if multimodal_config.video_pruning_rate:
        raise ValueError("vtoken's architectures lay out M-RoPE positions themselves; drop --video-pruning-rate "
                         "(vLLM's EVS) when serving one")


class PruningProcessor(PlanKeyedProcessor):
    """In front of a vLLM Qwen multimodal processor: K placeholders per image, cache keys per plan."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs: Any) -> Sequence[PromptReplacement]:
        refuse_video_pruning(self.info.ctx.get_mm_config())
        plan = self.plan()
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        image = next(update for update in updates if update.modality == "image")
        token = image.target[0]

        def kept_placeholders(item_idx: int) -> list[int]:
            _, h, w = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            return [token] * plan.tokens_per_image((h // merge, w // merge))

        replaced = PromptReplacement(modality="image", target=image.target, replacement=kept_placeholders)
        return [replaced if update is image else update for update in updates]


class PruningModel:
    """In front of a vLLM Qwen model: the pruned image embeddings and their M-RoPE positions."""

    def __init__(self, *, vllm_config: Any, prefix: str | None = None) -> None:
        # vLLM's loader looks for both keywords in the signature; a missing prefix keeps the model's own default
        super().__init__(vllm_config=vllm_config, **({} if prefix is None else {"prefix": prefix}))
        self._init_pruning()

    def _init_pruning(self) -> None:
        self.vtoken_plan = plan_of(self.config)
        refuse_video_pruning(self.multimodal_config)
        # the runner recomputes positions from the appended channels only while this holds (module docstring)
        object.__setattr__(self.multimodal_config, "is_multimodal_pruning_enabled", lambda: True)
        self.is_multimodal_pruning_enabled = True  # also keeps encoder CUDA graphs off, as for EVS
        #: per image of the last embed_multimodal call: the kept slots on its merged grid (for tests)
        self.last_kept: list[torch.Tensor] = []

    def _prune_images(self, features: Sequence[torch.Tensor], grids: list[list[int]],
                      scored_width: int | None = None) -> list[torch.Tensor]:
        """Each image's kept rows of ``features`` with their position channels; the stages see the first
        ``scored_width`` columns (the merger's output, as in the transformers integration), the rows keep
        all of them (Qwen3-VL's DeepStack levels ride behind)."""
        merge = self.visual.spatial_merge_size
        kept = select_kept(self.vtoken_plan, [f[:, :scored_width] for f in features],
                           [(h // merge, w // merge) for _, h, w in grids], self.config.image_token_id)
        self.last_kept = [slots for _, slots in kept]
        out = []
        for full, (values, slots), grid in zip(features, kept, grids):
            if scored_width is not None:  # a merged token carries its own slot's remaining columns
                values = torch.cat([values, full[slots, scored_width:]], dim=1)
            out.append(with_positions(values, self.full_positions(grid)[slots.to("cpu")]))
        return out

    def full_positions(self, grid: list[int], second_per_grid: int | None = None) -> torch.Tensor:
        """``[N, 4]``: (t, h, w) of each merged token on the item's full grid, relative to its first token,
        and the extent (max position + 1) after which the next text starts."""
        extra = {}
        if second_per_grid is not None:
            extra = dict(tokens_per_second=self.config.vision_config.tokens_per_second,
                         video_second_per_grid=second_per_grid)
        positions = compute_mrope_for_media(grid, self.visual.spatial_merge_size, **extra)
        positions[:, 3] = positions[:, :3].max() + 1
        return positions

    @staticmethod
    def lay_out(input_tokens: list[int], items: Iterable[tuple[int, int, int, int, int, float]],
                ) -> tuple[torch.Tensor, int]:
        """Positions of a prompt whose items (offset, placeholders, t, h, w, t_factor) span their full
        grid's extent; an item's placeholders get the first positions of its grid until
        ``recompute_mrope_positions`` replaces them with the kept tokens' own."""
        pieces: list[np.ndarray] = []
        start, next_position = 0, 0
        for offset, count, t, h, w, t_factor in items:
            text = offset - start
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            base = next_position + text
            grid = np.indices((t, h, w)).reshape(3, -1)
            grid[0] = (grid[0] * t_factor).astype(np.int64)
            pieces.append(grid[:, :count] + base)
            next_position = base + int(grid.max()) + 1
            start = offset + count
        rest = len(input_tokens) - start
        pieces.append(np.broadcast_to(np.arange(rest), (3, rest)) + next_position)
        positions = np.concatenate(pieces, axis=1)
        return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(self, input_ids: list[int] | torch.Tensor,
                                  multimodal_embeddings: Sequence[torch.Tensor], mrope_positions: torch.Tensor,
                                  num_computed_tokens: int) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """The runner's call once per prefill chunk, with the parts of the items' embeddings inside it: their
        placeholders take the kept tokens' positions, ``base + (t, h, w)`` with ``base`` one past the
        item's ``<|vision_start|>``. Text positions do not depend on which tokens were kept, so
        ``get_mrope_input_positions`` has them right already. (vLLM's own version, written for EVS, also
        re-lays the text after each item and tracks chunk boundaries itself; in 0.33.0, with two images in
        a prompt, it raised for chunk boundaries inside an image. tests_vllm checks chunks against one pass.)"""
        device = mrope_positions.device
        ids = torch.as_tensor(input_ids, device=device).long()
        media = ((ids == self.config.image_token_id) | (ids == self.config.video_token_id)).nonzero()[:, 0]
        rows = torch.zeros(3, 0, dtype=torch.long, device=device)
        if multimodal_embeddings:  # the (t, h, w) channels, one column per embedding of this chunk
            channels = torch.cat([e[:, -POSITION_CHANNELS:] for e in multimodal_embeddings])
            rows = channels[:, :3].long().to(device).T
        # the media tokens this chunk fills: the first ones not computed yet, as many as it has embeddings for
        slots = media[media >= num_computed_tokens][: rows.shape[1]]
        starts = (ids == self.config.vision_start_token_id).nonzero()[:, 0]
        opening = starts[torch.searchsorted(starts, slots) - 1]  # each slot's <|vision_start|>
        positions = mrope_positions.clone()
        positions[:, slots] = positions[0, opening] + 1 + rows
        delta = int(positions.max()) + 1 - ids.numel()
        return [e[:, :-POSITION_CHANNELS] for e in multimodal_embeddings], positions, delta


def with_positions(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Features with the position channels appended, as ``recompute_mrope_positions`` reads them."""
    return torch.cat([features, positions.to(device=features.device, dtype=features.dtype)], dim=1)
