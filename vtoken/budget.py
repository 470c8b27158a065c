"""The token budget: ``keep`` is tokens per image (int) or a fraction of the tokens (float in (0, 1])."""

from __future__ import annotations

import math


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
