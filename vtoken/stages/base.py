"""The Stage interface: a training-free token selection or merge that runs at one site."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ..budget import validate_keep
from ..sites import Site
from ..tokens import Keep, TokenSet, sorted_topk


def option(default: Any, help: str) -> Any:
    """A stage option: a dataclass field with a default and the help text that the CLI and docs show."""
    return field(default=default, metadata={"help": help})


@dataclass
class Stage:
    """Base class of every stage. Subclasses are dataclasses whose fields are their options.

    A stage declares where it can run (``sites``), the signals it needs from the integration
    (``signals()``), and ``select(tokens, k) -> Keep``: pure tensor code, deterministic for a given
    input (and seed).
    """

    keep: int | float | None = option(None, "tokens per image (int) or fraction of the tokens (float in (0, 1]); None: "
                                            "the budget given to wrap()")
    site: Any = option(None, "where the stage runs, e.g. 'projector' or 'llm(2)'")

    name: ClassVar[str] = ""
    #: site kinds this stage can run at
    site_kinds: ClassVar[tuple[str, ...]] = ("projector",)
    default_site: ClassVar[str | None] = "projector"
    #: False for stages with a fixed reduction (no budget), e.g. a 2x2 pixel shuffle
    budgeted: ClassVar[bool] = True
    #: True when the stage produces new (merged) features instead of selecting existing tokens
    merging: ClassVar[bool] = False
    #: True when the stage needs the tokens on their full (h, w) grid (spatial merging)
    needs_grid: ClassVar[bool] = False
    #: budget used when neither the stage nor wrap() gives one (None: a budget is required)
    default_keep: ClassVar[int | float | None] = None
    #: True when the stage may keep a different count per image, at most its budget (its Keep has
    #: ``counts``); it must then be the last stage at a projector or llm(K) site. A stage with an
    #: ``exact`` option may make this a property (``longtail``)
    adaptive: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.site is None and self.default_site is None:
            raise ValueError(f"stage {self.name!r} needs its encoder layer: pass layer=L (or site='vision(L)')")
        if self.keep is not None:
            validate_keep(self.keep, f"{self.name or type(self).__name__}.keep")
        self.site = Site.parse(self.site if self.site is not None else self.default_site)
        if self.site.kind not in self.site_kinds:
            accepted = ", ".join(_site_example(kind) for kind in self.site_kinds)
            raise ValueError(f"stage {self.name!r} cannot run at {self.site}; accepted sites: {accepted}")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def output_count(self, num_tokens: int, grid: tuple[int, int] | None) -> int:
        """Tokens left after a fixed-ratio (unbudgeted) stage."""
        raise NotImplementedError

    def signals(self) -> dict[str, dict[str, Any]]:
        """Signals the integration must compute for this stage, by name, with their parameters."""
        return {}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        """Return which ``k`` tokens of each row to keep (or how to merge them into ``k``)."""
        raise NotImplementedError

    def describe(self) -> str:
        options = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name not in ("site",)
        )
        return f"{self.name}@{self.site}({options})"


@dataclass
class TopKBySignal(Stage):
    """A stage that keeps, per row, the ``k`` tokens with the largest value of one per-token signal
    (``score_signal``, asked for with ``signal_options()``); ties go to the lower index."""

    score_signal: ClassVar[str] = ""

    def signal_options(self) -> dict[str, Any]:
        return {}

    def signals(self) -> dict[str, dict[str, Any]]:
        return {self.score_signal: self.signal_options()}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        return Keep(indices=sorted_topk(tokens.signals[self.score_signal], k))


@dataclass
class EncoderStage(Stage):
    """A stage that runs inside the vision encoder, addressed by ``layer=L`` (shorthand for
    ``site='vision(L)'``). It has no default layer: where to prune inside an encoder is the user's call."""

    layer: int | None = option(None, "shorthand for site='vision(layer)'")

    default_site: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if self.layer is not None:
            if self.site is not None:
                raise ValueError(f"{self.name} takes layer= or site=, not both")
            self.site = f"vision({self.layer})"
        super().__post_init__()


def check_encoder_layers(stage: Stage, names: tuple[str, ...]) -> None:
    """Options naming an encoder layer: None (the family's default), a layer counted from 1, or a negative
    one counted from the end (as ``vision_feature_layer`` counts); anything else is refused."""
    for name in names:
        value = getattr(stage, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value == 0):
            raise ValueError(f"{stage.name} {name}={value!r}; accepted: None, an encoder layer counted from 1, or "
                             "a negative one counted from the end")


def check_in_range(stage: Stage, name: str, low: float, high: float, what: str = "a float",
                   allow_none: bool = False) -> None:
    """A numeric option in the closed range [low, high] (a bool or a string is refused, not compared)."""
    value = getattr(stage, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        prefix = "None or " if allow_none else ""
        raise ValueError(f"{stage.name} {name}={value!r}; accepted: {prefix}{what} in [{low:g}, {high:g}]")


def check_count(stage: Stage, name: str, minimum: int, unit: str = "", allow_none: bool = False) -> None:
    """An int option of at least ``minimum`` (``unit`` says what it counts, for the error)."""
    value = getattr(stage, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        prefix = "None or " if allow_none else ""
        raise ValueError(f"{stage.name} {name}={value!r}; accepted: {prefix}an int >= {minimum}"
                         + (f" ({unit})" if unit else ""))


def _site_example(kind: str) -> str:
    return {"vision": "vision(L)", "projector": "projector", "llm": "llm(K)",
            "decode": "'decode', 'decode(n)' (a choice every n decoding steps)"}[kind]
