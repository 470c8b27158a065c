"""Pipeline: stages composed into one plan.

Stages at different sites run one after the other in forward order (each narrows what the next one
sees). Stages at the same site share that site's budget "commit and fill": each stage but the last
commits its share of the budget, and the next one chooses among the tokens not chosen yet; the site
keeps the union, in original order. That is how ``cls_attn+kcenter`` keeps part of the budget by
importance and the rest by diversity among the remaining tokens, with no special case.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch

from .budget import resolve_keep, scaled_budgets, validate_keep
from .sites import Site
from .stages.base import Stage
from .stats import StageRecord, Stats, clock
from .tokens import Keep, TokenSet

#: the attribute a named pipeline sets on a stage whose site layer is a share of the model's depth
DEPTH_SHARE = "_vtoken_depth_share"
#: site kinds where rows may keep different counts (an adaptive stage's Keep.counts): the projector trims each
#: image's features, llm(K) fills short rows with dead slots; inside an encoder batch every row must stay as long
ADAPTIVE_SITE_KINDS = ("projector", "llm")


def is_adaptive(stage: Stage) -> bool:
    """True for a stage that may keep fewer than its budget, a different count per image (its Keep has
    ``counts``); such a stage sets ``adaptive`` (e.g. a property that is False under ``exact=True``)."""
    return bool(stage.adaptive)


class Pipeline:
    """An ordered plan of stages, e.g. ``Pipeline([ClsAttn(keep=32), KCenter()])``."""

    def __init__(self, stages: Sequence[Stage], keep: int | float | None = None) -> None:
        stages = list(stages)
        if not stages:
            raise ValueError("a Pipeline needs at least one stage")
        for stage in stages:
            if not isinstance(stage, Stage):
                raise TypeError(f"Pipeline takes Stage objects; got {stage!r}")
        if keep is not None:
            validate_keep(keep)
        self.stages = stages
        self.keep = keep
        if keep is not None and not any(stage.budgeted for stage in stages):
            names = ", ".join(stage.name for stage in stages)
            raise ValueError(f"keep={keep!r} was given, but {names} take(s) no budget (fixed ratio); drop keep")
        self._check_sites()

    def _check_sites(self) -> None:
        for site in self.sites:
            at_site = self.stages_at(site)
            if len(at_site) > 1 and any(stage.merging or not stage.budgeted for stage in at_site):
                names = ", ".join(stage.name for stage in at_site)
                raise ValueError(
                    f"stages {names} share {site}, but merging or fixed-ratio stages must run alone at a site; "
                    "put them at different sites"
                )
            for rank, stage in enumerate(at_site):
                if is_adaptive(stage) and rank != len(at_site) - 1:
                    raise ValueError(f"{stage.name} at {site} keeps a different count per image, so it must be the "
                                     "last stage at its site (the stages before it commit fixed shares); move it last")
                if is_adaptive(stage) and site.kind not in ADAPTIVE_SITE_KINDS:
                    raise ValueError(f"{stage.name} keeps a different count per image, which {site} cannot carry "
                                     "(every row of an encoder batch stays as long); run it at the projector or "
                                     "llm(K), or pass exact=True to keep exactly the budget")

    @property
    def sites(self) -> list[Site]:
        """The distinct sites, in forward order."""
        unique = {stage.site: None for stage in self.stages}
        return sorted(unique, key=Site.sort_key)

    def stages_at(self, site: Site) -> list[Stage]:
        return [stage for stage in self.stages if stage.site == site]

    def with_keep(self, keep: int | float | None) -> "Pipeline":
        """The same stages with ``keep`` as the budget of the last budgeted site."""
        return Pipeline(self.stages, keep if keep is not None else self.keep)

    def copy(self) -> "Pipeline":
        """The same plan with stage objects of its own: a wrapped model never shares a stage with the
        caller, so changing (or reusing) the caller's objects later cannot change the wrapped model."""
        return Pipeline([copy.copy(stage) for stage in self.stages], self.keep)

    def resolved(self, layer_counts: dict[str, int]) -> "Pipeline":
        """A copy with negative layer indices turned into absolute ones, given the model's layer count
        per site kind, and a named pipeline's depth shares into layers. The stages here are left as they are."""
        stages = []
        for stage in self.stages:
            stage = copy.copy(stage)
            share = getattr(stage, DEPTH_SHARE, None)
            if share is not None and stage.site.kind in layer_counts:  # a named pipeline's "middle layer"
                count = layer_counts[stage.site.kind]
                stage.site = Site(stage.site.kind, min(max(1, round(share * count)), max(1, count - 1)))
            elif stage.site.layer is not None and stage.site.kind in layer_counts:
                stage.site = stage.site.resolved(layer_counts[stage.site.kind])
            stages.append(stage)
        # a decoder too shallow for a named pyramid puts several of its stages at one layer: the last of them
        # (the smallest budget) stays there
        placed = [getattr(stage, DEPTH_SHARE, None) is not None for stage in stages]
        stages = [stage for i, stage in enumerate(stages) if not placed[i] or not any(
            placed[j] and stages[j].site == stage.site for j in range(i + 1, len(stages)))]
        return Pipeline(stages, self.keep)

    def check_budgets(self) -> None:
        """Refuse, before any model runs, a budgeted site that has no budget from anywhere."""
        for site in self.sites:
            stages = self.stages_at(site)
            if len(stages) == 1:
                if stages[0].budgeted and self.site_keep(site) is None:
                    raise ValueError(_missing_budget(stages[0], site))
            elif self._site_budget(site) is None:
                missing = [stage for stage in stages if stage.keep is None]
                if missing:
                    raise ValueError(_missing_budget(missing[0], site))
        self._check_budgets_shrink()

    def _check_budgets_shrink(self) -> None:
        """Each site chooses among what the sites before it kept (a pyramid such as ``fastv@llm(2)+
        fastv@llm(8)``), so an int budget (tokens per image) cannot exceed an earlier site's int budget."""
        earlier: tuple[Site, int] | None = None
        for site in self.sites:
            count = self._int_budget(site)
            if count is None:
                continue
            if earlier is not None and count > earlier[1]:
                raise ValueError(
                    f"{site} keeps {count} tokens per image, but {earlier[0]} before it keeps only {earlier[1]}: "
                    f"each site chooses among the tokens the earlier sites kept; give {site} at most {earlier[1]} "
                    "(or a fraction in (0, 1] of what reaches it)"
                )
            earlier = (site, count)

    def _int_budget(self, site: Site) -> int | None:
        """The tokens per image ``site`` keeps when its budget is a fixed int (None for fractions)."""
        stages = self.stages_at(site)
        if not all(stage.budgeted for stage in stages):
            return None
        keeps = [self.site_keep(site)] if len(stages) == 1 else (
            [self._site_budget(site)] if self._site_budget(site) is not None else [s.keep for s in stages])
        if all(isinstance(k, int) and not isinstance(k, bool) for k in keeps):
            return sum(keeps)
        return None

    def check_grids(self) -> None:
        """A stage that needs the full token grid (pool, pixel_shuffle) cannot follow a site whose stages
        select a subset: the survivors form no grid any more."""
        broken: Stage | None = None
        for site in self.sites:
            for stage in self.stages_at(site):
                if stage.needs_grid and broken is not None:
                    raise ValueError(
                        f"{stage.name} at {site} needs the tokens on their full grid, but {broken.name} at "
                        f"{broken.site} selects a subset before it, so no grid is left; run {stage.name} "
                        f"first (at an earlier site) or use a selection stage at {site}"
                    )
            if any(not stage.merging for stage in self.stages_at(site)):
                broken = next(stage for stage in self.stages_at(site) if not stage.merging)

    def signals_at(self, site: Site) -> dict[str, dict[str, Any]]:
        """Every signal the stages at ``site`` need; two stages asking for one signal must agree."""
        merged: dict[str, dict[str, Any]] = {}
        for stage in self.stages_at(site):
            for name, params in stage.signals().items():
                if name in merged and merged[name] != params:
                    raise ValueError(f"stages at {site} ask for signal {name!r} with different parameters")
                merged[name] = params
        return merged

    def _site_budget(self, site: Site) -> int | float | None:
        budgeted_sites = [s for s in self.sites if any(st.budgeted for st in self.stages_at(s))]
        if budgeted_sites and site == budgeted_sites[-1] and self.keep is not None:
            return self.keep
        return None

    def site_keep(self, site: Site) -> int | float | None:
        """The budget that applies to the whole of ``site`` (None if the stages there set their own)."""
        stages = self.stages_at(site)
        if len(stages) == 1:
            stage = stages[0]
            for keep in (stage.keep, self._site_budget(site), stage.default_keep):
                if keep is not None:
                    return keep
            return None
        return self._site_budget(site)

    def after_adaptive(self, site: Site) -> bool:
        """True when an adaptive stage runs at a site before ``site``: what reaches ``site`` may then be
        fewer tokens than its budget, and the budget is capped at what is there instead of refused."""
        return any(is_adaptive(stage) for stage in self.stages if Site.sort_key(stage.site) < Site.sort_key(site))

    def stage_budgets(self, site: Site, num_tokens: int, units: int, grid: tuple[int, int] | None = None,
                      total: int | None = None) -> list[int]:
        """Tokens each stage at ``site`` keeps (commits) out of ``num_tokens`` held by ``units`` images.
        ``total`` replaces the site's budget when an integration has already split it (e.g. over views).
        After an adaptive stage (``after_adaptive``) a row may hold fewer tokens than the budget: the budget
        is then capped at the tokens there (the last stages give up the difference), never refused."""
        budgets = self._stage_budgets(site, num_tokens, units, grid, total)
        if not self.after_adaptive(site):
            return budgets
        excess = sum(budgets) - num_tokens
        for i in reversed(range(len(budgets))):
            cut = min(max(excess, 0), budgets[i] - 1)
            budgets[i] -= cut
            excess -= cut
        return budgets

    def _stage_budgets(self, site: Site, num_tokens: int, units: int, grid: tuple[int, int] | None,
                       total: int | None) -> list[int]:
        stages = self.stages_at(site)
        if len(stages) == 1 and not stages[0].budgeted:
            return [stages[0].output_count(num_tokens, grid)]
        site_keep = self._site_budget(site) if total is None else total
        explicit = {i: s.keep for i, s in enumerate(stages) if s.keep is not None}
        if len(stages) == 1:
            keep = total if total is not None else self.site_keep(site)
            if keep is None:
                raise ValueError(_missing_budget(stages[0], site))
            return [self._resolve(site, keep, num_tokens, units, f"keep of {stages[0].name} at {site}")]
        if site_keep is None and len(explicit) < len(stages):
            missing = next(s for s in stages if s.keep is None)
            raise ValueError(_missing_budget(missing, site))
        committed = {
            i: self._resolve(site, k, num_tokens, units, f"keep of {stages[i].name} at {site}")
            for i, k in explicit.items()
        }
        if len(committed) == len(stages):
            budgets = [committed[i] for i in range(len(stages))]
        else:
            total = self._resolve(site, site_keep, num_tokens, units, f"keep at {site}")
            rest = total - sum(committed.values())
            implicit = [i for i in range(len(stages)) if i not in committed]
            if rest < len(implicit):
                raise ValueError(
                    f"at {site} the stages with their own keep take {sum(committed.values())} of {total} tokens, "
                    f"leaving {rest} for {len(implicit)} more stage(s); lower their keep or raise the budget"
                )
            share, extra = divmod(rest, len(implicit))
            for rank, i in enumerate(implicit):
                # the remainder goes to the last stages, so the first one commits the plain share
                committed[i] = share + (1 if rank >= len(implicit) - extra else 0)
            budgets = [committed[i] for i in range(len(stages))]
        if sum(budgets) > num_tokens and not self.after_adaptive(site):
            raise ValueError(f"stages at {site} keep {sum(budgets)} tokens in all, more than the {num_tokens} there")
        return budgets

    def _resolve(self, site: Site, keep: int | float, num_tokens: int, units: int, where: str) -> int:
        """``resolve_keep``, except that after an adaptive stage an int budget above the tokens there is kept
        as it is (``stage_budgets`` caps it) instead of refused."""
        if isinstance(keep, int) and self.after_adaptive(site):
            return resolve_keep(keep, max(num_tokens, keep * units), units, where)
        return resolve_keep(keep, num_tokens, units, where)

    def run(
        self, site: Site, tokens: TokenSet, stats: Stats | None = None, scoring_seconds: float = 0.0,
        total: int | None = None,
    ) -> tuple[TokenSet, Keep]:
        """Run the stages at ``site`` on ``tokens``; return the tokens after the site and the combined
        Keep (positions into ``tokens``). ``total``: an already-split budget for these rows."""
        stages = self.stages_at(site)
        budgets = self.stage_budgets(site, tokens.num_tokens, tokens.units, tokens.grid, total)
        device = tokens.features.device
        batch, n = tokens.batch_size, tokens.num_tokens
        chosen: list[torch.Tensor] = []
        remaining = torch.arange(n, device=device).expand(batch, n)
        result_keep: Keep | None = None
        pins: torch.Tensor | None = None  # [B, n] the positions a stage sharing the site pinned
        for rank, (stage, k) in enumerate(zip(stages, budgets)):
            view = tokens if rank == 0 else tokens.take(remaining)
            start = clock(device)
            keep = stage.select(view, k)
            seconds = clock(device) - start
            check_keep(keep, view, k, stage.name)
            if keep.counts is not None and (site.kind not in ADAPTIVE_SITE_KINDS or rank != len(stages) - 1):
                raise RuntimeError(f"stage {stage.name} returned per-row counts at {site}, where every row keeps its "
                                   "budget (an encoder batch, or a share committed before another stage); give the "
                                   "stage adaptive = True so wrap refuses it there, or return no counts")
            if stats is not None:
                stats.add(StageRecord(
                    stage=stage.name, site=str(site), tokens_in=view.num_tokens // max(tokens.units, 1),
                    tokens_out=kept_per_unit(keep, tokens.units),
                    scoring_ms=1000 * scoring_seconds if rank == 0 else 0.0, select_ms=1000 * seconds,
                ))
            if len(stages) == 1:
                result_keep = keep
                break
            picked = remaining.gather(1, keep.indices)
            if keep.pinned is not None:  # stages pick distinct positions: each one's pins go to its own
                pins = (torch.zeros(batch, n, dtype=torch.bool, device=device) if pins is None else pins)
                pins = pins.scatter(1, picked, keep.pinned)
            if rank == len(stages) - 1:
                result_keep = _union(chosen, picked, keep, n)
                break
            chosen.append(picked)
            left = torch.ones(batch, n, dtype=torch.bool, device=device)
            for p in chosen:
                left.scatter_(1, p, False)
            remaining = left.nonzero()[:, 1].view(batch, -1)
        if pins is not None:
            result_keep.pinned = pins.gather(1, result_keep.indices)
        return tokens.apply(result_keep), result_keep

    def describe(self) -> str:
        return " + ".join(stage.describe() for stage in self.stages)

    def __repr__(self) -> str:
        return f"Pipeline([{self.describe()}], keep={self.keep!r})"


def _union(chosen: list[torch.Tensor], picked: torch.Tensor, last: Keep, n: int) -> Keep:
    """The site's Keep from the positions the committing stages chose and the last stage's ``picked``
    (its Keep ``last``, positions into the site's tokens): ascending, an adaptive last stage's padding after
    the kept entries, so the site keeps its count per row."""
    batch = picked.shape[0]
    if last.counts is None:
        return Keep(indices=torch.cat([*chosen, picked], dim=1).sort(dim=1).values)
    live = last.live()
    kept = torch.zeros(batch, n, dtype=torch.bool, device=picked.device)
    for positions in chosen:
        kept.scatter_(1, positions, True)
    kept.scatter_(1, picked, live)  # picked holds unique positions, none of them chosen before
    position = torch.arange(n, device=picked.device).expand(batch, n)
    padding = torch.zeros_like(kept).scatter_(1, picked, ~live)
    rank = torch.where(kept, position, torch.where(padding, n + position, 2 * n + position))
    width = sum(p.shape[1] for p in chosen) + picked.shape[1]
    return Keep(indices=rank.argsort(dim=1)[:, :width], counts=kept.sum(dim=1))


def kept_per_unit(keep: Keep, units: int) -> int | float:
    """Tokens kept per budget unit: an int, or for an adaptive Keep the mean over its rows (2 decimals)."""
    if keep.counts is None:
        return keep.num_kept // max(units, 1)
    return round(keep.counts.float().mean().item() / max(units, 1), 2)


def check_keep(keep: Keep, tokens: TokenSet, k: int, stage: str) -> None:
    """A stage's Keep must hold exactly k unique, in-range positions per row, ascending; an adaptive
    Keep's ``counts`` must be in 1..k and only each row's first ``counts`` entries (the kept ones) ascending."""
    idx = keep.indices
    if idx.shape != (tokens.batch_size, k):
        raise RuntimeError(f"stage {stage} returned indices of shape {tuple(idx.shape)}; "
                           f"expected {(tokens.batch_size, k)}")
    if k and (idx.min() < 0 or idx.max() >= tokens.num_tokens):
        raise RuntimeError(f"stage {stage} returned positions outside 0..{tokens.num_tokens - 1}")
    if keep.counts is not None:
        counts = keep.counts
        if counts.shape != (tokens.batch_size,) or counts.dtype != torch.long:
            raise RuntimeError(f"stage {stage} returned counts of shape {tuple(counts.shape)} ({counts.dtype}); "
                               f"expected ({tokens.batch_size},) long")
        if k and (int(counts.min()) < 1 or int(counts.max()) > k):
            raise RuntimeError(f"stage {stage} returned counts outside 1..{k}")
        ordered = idx.sort(dim=1).values
        if k > 1 and not bool((ordered[:, 1:] > ordered[:, :-1]).all()):
            raise RuntimeError(f"stage {stage} returned a position twice in a row")
        if k > 1 and not bool(((idx[:, 1:] > idx[:, :-1]) | ~keep.live()[:, 1:]).all()):
            raise RuntimeError(f"stage {stage} returned kept positions that are not strictly ascending")
    elif k > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        raise RuntimeError(f"stage {stage} returned positions that are not strictly ascending")
    if keep.features is not None and keep.features.shape[:2] != idx.shape:
        raise RuntimeError(f"stage {stage} returned merged features not matching its {k} kept tokens")
    if keep.pinned is not None and (keep.pinned.shape != idx.shape or keep.pinned.dtype != torch.bool):
        raise RuntimeError(f"stage {stage} returned pins of shape {tuple(keep.pinned.shape)} ({keep.pinned.dtype}); "
                           f"expected {tuple(idx.shape)} bool, one per kept token")


def _missing_budget(stage: Stage, site: Site) -> str:
    return (
        f"stage {stage.name} at {site} has no budget: pass keep= to wrap() (an int, tokens per image, or a "
        "float in (0, 1], a fraction of the tokens), or give the stage its own keep (stages before the last "
        "budgeted site of a pipeline, and all but one stage sharing a site, need one)"
    )


def build_named(name: str, keep: int | float | None, options: dict[str, Any],
                build: Callable[[str, Any, dict[str, Any]], Pipeline]) -> Pipeline:
    """The registered pipeline ``name`` (``register_pipeline``) with ``keep`` split over its stages by
    its factors (``scaled_budgets``); ``build`` turns its spec into a Pipeline. A stage's own options
    (``fastv={"site": "llm(8)", "keep": 20}``) replace the registered site and its share of the budget."""
    from .registry import PIPELINES

    named = PIPELINES[name]
    parts, moved = [], []
    for part in named.spec.split("+"):
        stage = part.partition("@")[0].strip()
        own = options.get(stage)
        moved.append(isinstance(own, dict) and (own.get("site") is not None or own.get("layer") is not None))
        parts.append(stage if moved[-1] else part)
    pipeline = build("+".join(parts), None, options)
    for stage, share, own_site in zip(pipeline.stages, named.depths, moved):
        if share is not None and not own_site:
            setattr(stage, DEPTH_SHARE, share)
    if keep is None:
        return pipeline
    budgets = scaled_budgets(keep, named.factors)
    for stage, budget in zip(pipeline.stages[:-1], budgets):
        if stage.keep is None:
            stage.keep = budget
    return Pipeline(pipeline.stages, budgets[-1])


def stages_from_names(names: Iterable[str]) -> list[type[Stage]]:
    from .registry import PIPELINES, STAGES, list_methods

    classes = []
    for name in names:
        if name in PIPELINES:
            raise ValueError(f"{name!r} is a named pipeline ({PIPELINES[name].spec}); it cannot be joined with "
                             "other stages: write its stages out instead")
        if not name:
            raise ValueError(f"empty method name in {'+'.join(names)!r}: join registered names with '+', e.g. "
                             f"'cls_attn+kcenter'; registered methods: {', '.join(list_methods())}")
        if name not in STAGES:
            raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(list_methods())} "
                             "(combine them with '+')")
        classes.append(STAGES[name])
    return classes
