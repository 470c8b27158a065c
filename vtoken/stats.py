"""What the last wrapped call did: tokens in/out and time per stage (``model.vtoken.stats``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class StageRecord:
    """One stage's work in the last forward pass that pruned (summed over image groups).

    tokens_in / tokens_out are per budget unit (per image; per sample at an llm site without images
    counted), scoring_ms is the time the integration spent computing the stage's signals, select_ms
    the time of the selection itself. An adaptive stage (a different count per image) reports as
    tokens_out the mean kept per unit over the rows it selected together, a float (2 decimals).
    """

    stage: str
    site: str
    tokens_in: int
    tokens_out: int | float
    scoring_ms: float = 0.0
    select_ms: float = 0.0
    calls: int = 1


@dataclass
class Stats:
    records: list[StageRecord] = field(default_factory=list)
    #: visual tokens each decoder layer saw in the last prefill (per sample, first sample of the batch)
    llm_layer_tokens: list[int] = field(default_factory=list)
    #: per site, one entry per row (image at the projector, sample at llm(K)): the kept positions in
    #: that site's token order (for a merging stage, the central token of each merged group)
    kept: dict[str, list] = field(default_factory=dict)
    #: per site with a merging stage, one entry per image: the merged token each input token went to
    merged: dict[str, list] = field(default_factory=dict)

    def reset(self) -> None:
        self.records.clear()
        self.llm_layer_tokens = []
        self.kept = {}
        self.merged = {}

    def add(self, record: StageRecord) -> None:
        for existing in self.records:
            if (existing.stage, existing.site, existing.tokens_in, existing.tokens_out) == (
                record.stage, record.site, record.tokens_in, record.tokens_out
            ):
                existing.scoring_ms += record.scoring_ms
                existing.select_ms += record.select_ms
                existing.calls += record.calls
                return
        self.records.append(record)

    @property
    def total_ms(self) -> float:
        return sum(r.scoring_ms + r.select_ms for r in self.records)

    def __str__(self) -> str:
        if not self.records:
            return "no pruning recorded yet (run a forward pass with images)"
        lines = [f"{'stage':<12} {'site':<10} {'in':>6} {'out':>6} {'scoring ms':>11} {'select ms':>10}"]
        for r in self.records:
            lines.append(
                f"{r.stage:<12} {r.site:<10} {r.tokens_in:>6} {r.tokens_out:>6} "
                f"{r.scoring_ms:>11.3f} {r.select_ms:>10.3f}"
            )
        return "\n".join(lines)


def clock(device: torch.device) -> float:
    """Wall-clock seconds that include queued GPU work (synchronises on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
