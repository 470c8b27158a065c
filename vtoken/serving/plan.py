"""What a server prunes: the ``vtoken`` entry of the model config, checked and turned into a Pipeline.

A server sizes each prompt (its placeholder tokens, its KV-cache blocks) from the request alone, before
the model runs, so a stage is servable only if the number of tokens it keeps is a function of the image
grid: stages at the projector site, whose budget (``keep``) or fixed ratio gives the count from the token
grid. They are refused with the reason otherwise:
- ``llm(K)`` stages choose inside the decoder, from the prompt's own hidden states, after the server has
  laid the prompt out; ``decode`` stages change the KV cache while generating, which the server owns;
- stages that score against the prompt's text (``cdpruner``) depend on the prompt, not the image;
- ``vision(L)`` stages, and stages that need a signal from inside the vision tower (``cls_attn``,
  ``visionzip``, ``hiprune``: attention), would need the server's tower instrumented, which the plugin
  does not do: it takes the tower's output features;
- video stages (``dycoke``, ``holitom``) need clips, and the plugin prunes images (videos pass whole).

The entry is ``{"method": "kcenter", "keep": 0.25, ...}``: ``method`` and ``keep`` as ``vtoken.wrap``
takes them (``"a+b"`` pipelines too), any other key a stage option (e.g. ``"image_pivots": 4`` for
dart). ``positions`` is the family's own: ``"original"`` for Qwen (kept tokens keep their M-RoPE
positions, as the Qwen integrations do), ``"compact"`` for LLaVA (the server numbers the shortened prompt
without gaps, as the LLaVA integration does by default).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from vtoken import signals
from vtoken.api import build_pipeline
from vtoken.budget import parse_budget
from vtoken.pipeline import Pipeline, is_adaptive
from vtoken.sites import Site

#: the key of the model config (``--hf-overrides``) that holds the plan
CONFIG_KEY = "vtoken"
PROJECTOR = Site("projector")
EXAMPLE = '{"method": "kcenter", "keep": 0.25}'
SERVABLE = "use a stage that scores the image's features alone ('kcenter', 'dart', 'random', 'pool', 'pixel_shuffle')"


@dataclass(frozen=True)
class ServingPlan:
    """A checked pipeline and the entry it came from (canonical JSON, for cache keys)."""

    pipeline: Pipeline
    key: str

    @property
    def digest(self) -> str:
        """A short stable name of the plan, for cache keys."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:16]

    def tokens_per_image(self, grid: tuple[int, int]) -> int:
        """Placeholders an image whose merged token grid is ``grid`` gets: what the stages keep of it."""
        count = grid[0] * grid[1]
        return sum(self.pipeline.stage_budgets(PROJECTOR, count, 1, grid))


#: the positions mode each served family uses, and why it is the only one
QWEN_POSITIONS = ("original", "served Qwen models keep each kept token's M-RoPE position")
LLAVA_POSITIONS = ("compact", "the server numbers a prompt's positions itself, without gaps")


def plan_from_config(hf_config: Any, positions: tuple[str, str] = QWEN_POSITIONS) -> ServingPlan:
    """The plan in ``hf_config.vtoken`` (a dict set with ``--hf-overrides``); a clear error without one."""
    entry = getattr(hf_config, CONFIG_KEY, None)
    if entry is None:
        raise ValueError(f"this architecture prunes visual tokens with vtoken and needs its plan: pass "
                         f'--hf-overrides \'{{"{CONFIG_KEY}": {EXAMPLE}, "architectures": [...]}}\'')
    return parse_plan(entry, positions)


def parse_plan(entry: Any, positions: tuple[str, str] = QWEN_POSITIONS) -> ServingPlan:
    """The checked plan; ``positions``: the family's one positions mode and why."""
    if not isinstance(entry, dict) or "method" not in entry:
        raise ValueError(f"the {CONFIG_KEY!r} entry must be an object with a method, e.g. {EXAMPLE}; got {entry!r}")
    options = {name: value for name, value in entry.items() if name not in ("method", "keep", "positions")}
    mode, why = positions
    if entry.get("positions", mode) != mode:
        raise ValueError(f"positions={entry['positions']!r}: {why}; accepted: {mode!r}")
    keep = entry.get("keep")
    pipeline = build_pipeline(entry["method"], None if keep is None else parse_budget(keep), options)
    for stage in pipeline.stages:  # before the budget checks: the reason a stage cannot serve comes first
        _check_servable(stage)
    pipeline.check_budgets()
    pipeline.check_grids()
    return ServingPlan(pipeline=pipeline, key=json.dumps(entry, sort_keys=True, separators=(",", ":")))


def _check_servable(stage: Any) -> None:
    where = f"{stage.name}@{stage.site} cannot be served"
    kind = stage.site.kind
    if kind in ("llm", "decode"):
        raise ValueError(
            f"{where}: it is prompt-dependent, {'an llm(K)' if kind == 'llm' else 'a decode'} stage chooses from the "
            "prompt's hidden states inside the decoder, but the server lays the prompt and its KV cache out before "
            f"the model runs, so the count must follow from the image alone; {SERVABLE}"
        )
    if kind != "projector":
        raise ValueError(f"{where}: the plugin prunes at the projector only (the server's vision tower is left as "
                         f"it is); drop the site to run it at the projector, or {SERVABLE}")
    if is_adaptive(stage):
        raise ValueError(f"{where}: it keeps a different count per image, known only when the model runs, but the "
                         "server sizes each image's placeholders before; give it a fixed count (exact=True where it "
                         f"has one), or {SERVABLE}")
    needs = set(stage.signals())
    if signals.PROMPT_TEXT in needs:
        raise ValueError(f"{where}: it is prompt-dependent, scoring the image's tokens against the prompt's text, "
                         f"so the same image would need a different count per prompt; {SERVABLE}")
    if needs:
        raise ValueError(
            f"{where}: it needs {signals.describe(needs)} from inside the vision tower, and the plugin takes only "
            f"the tower's output features from the server; {SERVABLE}"
        )
    if getattr(stage, "needs_clip", False):
        raise ValueError(f"{where}: it prunes video clips, and the plugin prunes images (videos pass whole); "
                         f"{SERVABLE}")
