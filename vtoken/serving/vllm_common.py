"""What every vLLM family of the plugin shares (imported by vLLM only): the plan from the model config,
cache keys per plan, and vtoken's projector step on the features vLLM's tower produced."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from vtoken.integrations.hf_vlm import HFVisionLanguage
from vtoken.integrations.visual_blocks import Encoded, VisualUnit
from vtoken.stats import Stats

from .plan import CONFIG_KEY, PROJECTOR, QWEN_POSITIONS, ServingPlan, parse_plan, plan_from_config


def plan_of(hf_config: Any, positions: tuple[str, str] = QWEN_POSITIONS) -> ServingPlan:
    entry = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(entry, dict):
        return plan_from_config(hf_config, positions)  # raises, naming what is missing
    return _parsed(json.dumps(entry, sort_keys=True), positions)


@functools.lru_cache(maxsize=16)
def _parsed(entry: str, positions: tuple[str, str]) -> ServingPlan:
    """The processor asks for the plan per request: it is parsed once per distinct entry."""
    return parse_plan(json.loads(entry), positions)


class PlanKeyedProcessor:
    """In front of a vLLM multimodal processor: every cache key carries the plan's digest, an item's
    client-given UUID too (which vLLM otherwise uses as it is), so an item processed or encoded under one
    plan is never reused under another."""

    positions: tuple[str, str] = QWEN_POSITIONS

    def plan(self) -> ServingPlan:
        return plan_of(self.info.get_hf_config(), self.positions)

    def _get_mm_hashes(self, inputs: Any) -> dict[str, list[str]]:
        keys = super()._get_mm_hashes(inputs)
        digest = self.plan().digest
        return {modality: [f"{key}+vtoken-{digest}" for key in items] for modality, items in keys.items()}


def select_kept(plan: ServingPlan, features: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]],
                token_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image (its features ``[N, D]`` after the projector, on ``grid``): the kept features and their
    slots, by the transformers integrations' own projector step (same grouping of equal-size images, same
    ``Pipeline.run``), so the same weights give the same selections."""
    units = [VisualUnit(block=0, features=f, grid=grid) for f, grid in zip(features, grids)]
    encoded = Encoded.one_block_per_unit(token_id, units)
    return HFVisionLanguage._run_projector(SimpleNamespace(pipeline=plan.pipeline), encoded, PROJECTOR, Stats())
