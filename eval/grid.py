"""Method specs and the methods x budgets grid shared by ``vtoken eval`` and ``vtoken bench``.

A spec is what ``vtoken.wrap`` takes as its method: a name or pipeline (``"cls_attn+kcenter"``), each
stage with an optional site after ``@`` (``"dart@llm(2)"``, ``"cls_attn@vision(8)+kcenter"``). Methods
with a fixed ratio (no budget, e.g. ``pixel_shuffle``) appear once in the grid, with ``keep=None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from vtoken.budget import parse_budget  # noqa: F401  (the one budget parser; the bench imports it from here)


@dataclass
class MethodSpec:
    """A method spec as the command line gave it; ``method`` goes to ``vtoken.wrap`` unchanged."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "MethodSpec":
        spec = spec.strip()
        if not spec.partition("@")[0].strip():
            raise ValueError(f"empty method in spec {spec!r}; write e.g. 'dart' or 'dart@llm(2)'")
        return cls(label=spec, method=spec)

    def budgeted(self) -> bool:
        """Whether any stage of the method takes a budget (the spec is checked on the way)."""
        import vtoken

        return any(stage.budgeted for stage in vtoken.build_pipeline(self.method, None, dict(self.options)).stages)


def method_grid(specs: Sequence[str], budgets: Sequence[int | float],
                check: bool = True) -> list[tuple[MethodSpec, int | float | None]]:
    """(spec, keep) for every spec x budget; fixed-ratio methods once with ``keep=None``. A malformed
    spec raises here, before any long work starts. ``check=False`` (methods that a custom wrapper, not
    vtoken, interprets): every spec x budget, unchecked."""
    grid = []
    for text in specs:
        spec = MethodSpec.parse(text)
        for keep in (budgets if not check or spec.budgeted() else [None]):
            grid.append((spec, keep))
    return grid
