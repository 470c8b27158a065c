"""The token budget: ``keep`` is tokens per image (int) or a fraction of the tokens (float in (0, 1])."""

from __future__ import annotations

import math
from typing import Any

#: how a budget is written, for messages
BUDGET_FORMS = "tokens per image (an int such as 64) or a fraction of them in (0, 1] (such as 0.25)"


def validate_keep(keep: object, where: str = "keep") -> None:
    """Raise a ValueError naming the accepted values unless ``keep`` is a valid budget."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{where} must be an int (tokens per image) or a float in (0, 1]; got {keep!r}")
    if isinstance(keep, int) and keep <= 0:
        raise ValueError(f"{where}={keep}: an int budget is tokens per image and must be >= 1")
    if isinstance(keep, float) and not (0.0 < keep <= 1.0):
        raise ValueError(f"{where}={keep}: a float budget is a fraction of the tokens and must be in (0, 1]")


def resolve_keep(keep: int | float, num_tokens: int, units: int = 1, where: str = "keep") -> int:
    """Number of tokens to keep out of ``num_tokens`` held by ``units`` images.

    An int is per image, so it is multiplied by ``units``; a fraction is of ``num_tokens`` and rounds to
    the nearest count, at least 1 per unit. A budget above the token count is an error, never a clamp.
    """
    validate_keep(keep, where)
    if isinstance(keep, float):
        return max(units, min(num_tokens, int(math.floor(keep * num_tokens + 0.5))))
    total = keep * units
    if total > num_tokens:
        per_unit = num_tokens // max(units, 1)
        raise ValueError(
            f"{where}={keep} tokens per image exceeds the {per_unit} visual tokens per image here; "
            f"use an int in [1, {per_unit}] or a fraction in (0, 1]"
        )
    return total


def scaled_budgets(keep: int | float, factors: tuple[float, ...]) -> list[int | float]:
    """Budgets of stages in sequence, each ``factors[i]`` times ``keep`` (the count after the last stage).

    An int keep gives ints: ``round(keep * factor)`` tokens per image at each stage. A fraction f gives the
    first stage ``min(1, f * factor)`` of the tokens and each later one its share of what reaches it, so
    the last keeps about f of the original tokens (each site rounds its own count).
    """
    validate_keep(keep)
    if isinstance(keep, int):
        return [max(1, round(keep * factor)) for factor in factors]
    budgets: list[int | float] = []
    reaching = 1.0
    for factor in factors:
        share = min(1.0, keep * factor)
        budgets.append(min(1.0, share / reaching))
        reaching = share
    return budgets


def parse_budget(value: Any) -> int | float:
    """A budget as ``vtoken.wrap`` takes it, from a number or from text (a command line, a form field):
    ``"64"`` is 64 tokens per image, ``"0.25"`` (or ``"1.0"``) a fraction of the tokens. Raises
    ValueError/TypeError naming the accepted forms."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"set the budget: {BUDGET_FORMS}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"the budget {text!r} is not a number; give {BUDGET_FORMS}") from None
    elif hasattr(value, "item") and not isinstance(value, (int, float)):  # a numpy or torch scalar
        value = value.item()
    validate_keep(value)
    return value
