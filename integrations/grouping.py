"""One way every site runs its stages over a batch of units (images, frames, merge-group segments, rows).

Units whose shapes agree (token count, grid, image count, budget: the caller's ``key``) are stacked into
one TokenSet and selected together. Stages treat rows independently, so this equals one unit at a
time, at the cost of one call per shape instead of one per unit. The projector, the vision(L) sites of
Qwen's tower and the llm(K) site all group this way; each scatters the results back itself.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence

from vtoken.pipeline import Pipeline
from vtoken.sites import Site
from vtoken.stats import Stats
from vtoken.tokens import Keep, TokenSet


def run_in_groups(
    pipeline: Pipeline, site: Site, keys: Sequence[Hashable | None], make_tokens: Callable[[list[int]], TokenSet],
    stats: Stats, scoring_seconds: float = 0.0, total: Callable[[Hashable], int | None] | None = None,
) -> Iterator[tuple[list[int], TokenSet, Keep]]:
    """For each group of units with equal keys (a None key leaves its unit out): the members' indices,
    the tokens after ``site`` and the Keep, one row per member in ``members`` order.

    make_tokens: the stacked TokenSet of some members; scoring_seconds: the signals' time for all units,
    shared out by group size in the stats; total: a group's already-split budget (None: the site's).
    """
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(index)
    for key, members in groups.items():
        share = scoring_seconds * len(members) / len(keys)
        after, keep = pipeline.run(site, make_tokens(members), stats, scoring_seconds=share,
                                   total=None if total is None else total(key))
        yield members, after, keep
