"""The long-tail dynamic budget (``longtail``) and adaptive budgets in the core (a different count per image).

The selection against a slow reference written here (index for index, fixed fp32 inputs), a constructed
curve whose inflection point is known, the pipeline's checks of adaptive stages, and unequal counts through
the wrapped LLaVA-1.5 (keep-all, padded batches, cached generation in every mode, labels, an adaptive stage
at llm(K)), LLaVA-NeXT and Qwen2/2.5-VL tiny models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

import vtoken
from contract_models import ATTENTION, CASES_BY_NAME, SiteStage
from test_contract import GENERATION_MODES
from test_contract import test_cached_generate_equals_recomputation as generate_clause
from test_contract import test_deepcopy_is_an_independent_wrapped_model as deepcopy_clause
from test_contract import test_keep_all_matches_unwrapped_logits as keep_all_clause
from test_contract import test_labels_give_the_loss_of_the_returned_logits as labels_clause
from test_contract import test_padded_batch_equals_members_alone as batch_clause
from test_contract import test_pickle_works_or_says_to_unwrap_first as pickle_clause
from test_contract import test_threads_give_each_calls_single_result as threads_clause
from test_contract import test_unwrap_restores_parameters_hooks_and_outputs as unwrap_clause
from vtoken.pipeline import Pipeline, check_keep
from vtoken.registry import register_stage
from vtoken.sites import Site
from vtoken.stages import ClsAttn, KCenter, LongTail
from vtoken.tokens import Keep, TokenSet, adaptive_keep


# --- slow reference -------------------------------------------------------------------------------
def knee_reference(ranked: list[float]) -> int:
    """Tokens up to the knee of a descending curve: the point farthest from the chord of the curve drawn in
    the unit square (point-to-line distance, signed positive below the chord), first on ties; all of them
    when no point lies below the chord (a flat or concave curve has no long tail)."""
    n = len(ranked)
    if n == 1 or ranked[0] == ranked[-1]:
        return n
    points = [(i / (n - 1), (s - ranked[-1]) / (ranked[0] - ranked[-1])) for i, s in enumerate(ranked)]
    (x0, y0), (x1, y1) = points[0], points[-1]
    length = math.hypot(x1 - x0, y1 - y0)
    best, best_distance = 0, -math.inf
    for i, (x, y) in enumerate(points):
        # the cross product of chord and point: positive for points below the chord of a descending curve
        distance = ((x1 - x0) * (y0 - y) - (x0 - x) * (y1 - y0)) / length
        if distance > best_distance:
            best, best_distance = i, distance
    return best + 1 if best_distance > 0 else n


def longtail_reference(scores: list[float], k: int) -> tuple[list[int], list[int]]:
    """One row: (kept positions ascending, padding positions ascending) for budget ``k``."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    count = min(max(knee_reference([scores[i] for i in order]), 1), k)
    return sorted(order[:count]), sorted(order[count:k])


def tokens_with(scores: torch.Tensor) -> TokenSet:
    return TokenSet.from_features(torch.randn(*scores.shape, 4), signals={"cls_attn": scores})


# --- the selection --------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 17, 40])
def test_selection_matches_slow_reference(k):
    torch.manual_seed(0)
    scores = torch.rand(5, 40) ** torch.tensor([1.0, 3.0, 6.0, 10.0, 0.5])[:, None]  # tails of every length
    keep = LongTail().select(tokens_with(scores), k)
    check_keep(keep, tokens_with(scores), k, "longtail")
    for row in range(scores.shape[0]):
        kept, padding = longtail_reference(scores[row].tolist(), k)
        count = int(keep.counts[row])
        assert count == len(kept), f"row {row}, k={k}: keeps {count}, the reference {len(kept)}"
        assert keep.indices[row, :count].tolist() == kept, f"row {row}, k={k}: kept positions differ"
        assert keep.indices[row, count:].tolist() == padding, f"row {row}, k={k}: padding positions differ"
    if k >= 17:
        assert len(set(keep.counts.tolist())) > 1, "the rows should keep different counts"


def knee_curve(n: int, m: int) -> torch.Tensor:
    """A descending curve of two straight pieces meeting at index m-1: 1 down to 0.1 over the head (steep),
    then 0.1 down to 0 over the tail (flat); its point farthest from the chord is that corner."""
    head = torch.linspace(1.0, 0.1, m)
    tail = torch.linspace(0.1, 0.0, n - m + 1)[1:]
    return torch.cat([head, tail])


@pytest.mark.parametrize("n,m", [(64, 10), (576, 40), (36, 5)])
def test_known_inflection_point(n, m):
    curve = knee_curve(n, m)
    place = torch.randperm(n, generator=torch.Generator().manual_seed(n))  # curve[j] goes to position place[j]
    scores = torch.empty(n).scatter_(0, place, curve)[None]
    keep = LongTail().select(tokens_with(scores), n)
    assert int(keep.counts[0]) == m, f"the knee of a curve bending at index {m - 1} gives {int(keep.counts[0])}"
    assert keep.indices[0, :m].tolist() == sorted(place[:m].tolist()), "the head of the curve is not what is kept"
    capped = LongTail().select(tokens_with(scores), m - 2)
    assert int(capped.counts[0]) == m - 2, "keep below the knee caps the count"
    assert capped.indices[0].tolist() == sorted(place[: m - 2].tolist())


def test_a_curve_without_a_long_tail_keeps_the_budget():
    flat = torch.full((30,), 0.25)
    concave = 1 - torch.linspace(0, 1, 30) ** 2  # bends the other way: every point above the chord
    keep = LongTail().select(tokens_with(torch.stack([flat, concave])), 12)
    assert keep.counts.tolist() == [12, 12], "a curve with no tail has no knee: it keeps the budget"
    assert keep.indices.tolist() == [list(range(12))] * 2, "the top 12 (equal scores: the lowest positions)"


def test_exact_keeps_the_budget_as_cls_attn_does():
    torch.manual_seed(1)
    tokens = tokens_with(torch.rand(3, 50) ** 5)
    exact = LongTail(exact=True).select(tokens, 20)
    assert exact.counts is None and exact.num_kept == 20
    assert torch.equal(exact.indices, ClsAttn().select(tokens, 20).indices)


# --- adaptive budgets in the core ------------------------------------------------------------------
def test_adaptive_keep_puts_padding_after_the_kept_entries():
    order = torch.tensor([[4, 0, 3, 1, 2], [1, 2, 0, 4, 3]])
    keep = adaptive_keep(order, torch.tensor([2, 3]), 4)
    assert keep.indices.tolist() == [[0, 4, 1, 3], [0, 1, 2, 4]]
    assert keep.live().tolist() == [[True, True, False, False], [True, True, True, False]]


def test_check_keep_refuses_bad_counts():
    tokens = tokens_with(torch.rand(2, 10))
    good = Keep(indices=torch.tensor([[1, 5, 0], [2, 3, 4]]), counts=torch.tensor([2, 3]))
    check_keep(good, tokens, 3, "t")
    bad = {
        "counts outside 1..3": Keep(indices=good.indices, counts=torch.tensor([0, 3])),
        "counts outside": Keep(indices=good.indices, counts=torch.tensor([4, 3])),
        "not strictly ascending": Keep(indices=torch.tensor([[5, 1, 0], [2, 3, 4]]), counts=torch.tensor([2, 3])),
        "twice": Keep(indices=torch.tensor([[1, 5, 1], [2, 3, 4]]), counts=torch.tensor([2, 3])),
        "expected (2,) long": Keep(indices=good.indices, counts=torch.tensor([2.0, 3.0])),
    }
    for message, keep in bad.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            check_keep(keep, tokens, 3, "t")


def test_wrap_refuses_adaptive_stages_where_counts_cannot_work():
    with pytest.raises(ValueError, match=r"vision\(1\) cannot carry.*projector or llm\(K\).*exact=True"):
        Pipeline([LongTail(site="vision(1)")], keep=8)
    Pipeline([LongTail(site="vision(1)", exact=True)], keep=8)  # a fixed count runs anywhere
    with pytest.raises(ValueError, match="must be the last stage at its site"):
        Pipeline([LongTail(keep=4), KCenter()], keep=8)
    with pytest.raises(ValueError, match="exact=1"):
        LongTail(exact=1)
    model = CASES_BY_NAME["llava"].model()
    with pytest.raises(ValueError, match="cannot carry"):
        vtoken.wrap(model, "longtail", keep=8, site="vision(1)")


def test_counts_from_a_stage_not_declared_adaptive_are_refused_where_they_cannot_work():
    class Undeclared(LongTail):  # returns counts, but says it is not adaptive
        adaptive = False

    tokens = tokens_with(torch.rand(2, 30) ** 8)
    for pipeline, site in ((Pipeline([Undeclared(site="vision(1)")], keep=10), "vision(1)"),
                           (Pipeline([Undeclared(keep=5), KCenter()], keep=10), "projector")):
        with pytest.raises(RuntimeError, match="returned per-row counts"):
            pipeline.run(Site.parse(site), tokens)


def test_a_server_refuses_an_adaptive_stage():
    from vtoken.serving.plan import parse_plan

    with pytest.raises(ValueError, match="different count per image.*sizes each image's placeholders before"):
        parse_plan({"method": "longtail", "keep": 64})


def test_commit_and_fill_with_an_adaptive_last_stage():
    torch.manual_seed(2)
    tokens = tokens_with(torch.rand(3, 30) ** 8)
    pipeline = Pipeline([KCenter(keep=4), LongTail()], keep=12)
    _, keep = pipeline.run(Site.parse("projector"), tokens)
    first = KCenter().select(tokens, 4).indices
    for row in range(3):
        rest = [p for p in range(30) if p not in first[row].tolist()]
        kept, padding = longtail_reference([tokens.signals["cls_attn"][row, p].item() for p in rest], 8)
        expected = sorted(first[row].tolist() + [rest[p] for p in kept])
        count = int(keep.counts[row])
        assert keep.indices[row, :count].tolist() == expected, f"row {row}: the site keeps another set"
        assert sorted(keep.indices[row, count:].tolist()) == sorted(rest[p] for p in padding)


def test_a_later_budget_is_capped_at_what_an_adaptive_stage_left():
    pipeline = Pipeline([LongTail(keep=20), KCenter(site="llm(2)")], keep=16)
    assert pipeline.stage_budgets(Site.parse("llm(2)"), 7, 1) == [7], "16 per image capped at the 7 tokens there"
    assert pipeline.stage_budgets(Site.parse("llm(2)"), 30, 1) == [16]
    fixed = Pipeline([ClsAttn(keep=20), KCenter(site="llm(2)")], keep=16)
    with pytest.raises(ValueError, match="exceeds"):
        fixed.stage_budgets(Site.parse("llm(2)"), 7, 1)

    case = CASES_BY_NAME["llava"]
    model = case.model()
    vtoken.wrap(model, "longtail+kcenter@llm(2)", keep=8, longtail={"keep": 8})
    with torch.no_grad():
        model(**case.batch("left"))
    kept = model.vtoken.stats.kept
    vtoken.unwrap(model)
    for row, (front, inside) in enumerate(zip(kept["projector"], kept["llm(2)"])):
        assert len(inside) == len(front) <= 8, f"row {row}: llm(2) keeps {len(inside)} of the {len(front)} there"


# --- through the wrapped models ----------------------------------------------------------------------
def longtail_stage(keep: Any, **options) -> SiteStage:
    """longtail at the projector; keep-all is exact=True with every token (an adaptive count keeps the knee)."""
    return SiteStage("projector", "longtail", dict(keep=keep, **options), dict(keep=1.0, exact=True))


LLAVA_STAGE = longtail_stage(1.0)  # no cap: the tiny model's images keep 6, 7 and 8 of 36


def projector_counts(case, stage) -> list[int]:
    model = case.model()
    vtoken.wrap(model, stage.method, **stage.prune)
    with torch.no_grad():
        model(**case.batch("left"))
    counts = [len(row) for row in model.vtoken.stats.kept["projector"]]
    records = model.vtoken.stats.records
    vtoken.unwrap(model)
    return counts, records


def test_llava_rows_keep_different_counts_and_stats_report_their_mean():
    counts, records = projector_counts(CASES_BY_NAME["llava"], LLAVA_STAGE)
    assert len(set(counts)) == len(counts), f"the rows should keep different counts to test them; got {counts}"
    (record,) = records
    assert record.tokens_out == pytest.approx(sum(counts) / len(counts), abs=0.01)


def test_each_row_equals_cls_attn_at_its_own_count():
    """Trimming to a count is a plain selection: each image alone gives the logits of cls_attn keeping the
    same number (longtail keeps the head of the same [CLS] ranking)."""
    case = CASES_BY_NAME["llava"]
    counts, _ = projector_counts(case, LLAVA_STAGE)
    model = case.model()
    for single, count in zip(case.singles(), counts):
        with vtoken.wrapped(model, "longtail", keep=1.0):
            with torch.no_grad():
                adaptive = model(**single).logits
        with vtoken.wrapped(model, "cls_attn", keep=count):
            with torch.no_grad():
                fixed = model(**single).logits
        assert adaptive.shape == fixed.shape, f"{adaptive.shape} vs {fixed.shape} at count {count}"
        assert (adaptive - fixed).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attn", ATTENTION)
def test_llava_keep_all(attn):
    keep_all_clause(CASES_BY_NAME["llava"], LLAVA_STAGE, attn)


@pytest.mark.parametrize("side", ["left", "right"])
def test_llava_padded_batch_equals_rows_alone(side):
    batch_clause(CASES_BY_NAME["llava"], LLAVA_STAGE, side)


@pytest.mark.parametrize("mode", list(GENERATION_MODES))
def test_llava_cached_generate_equals_recomputation(mode):
    generate_clause(CASES_BY_NAME["llava"], LLAVA_STAGE, mode)


def test_llava_labels():
    labels_clause(CASES_BY_NAME["llava"], LLAVA_STAGE)


def test_llava_unwrap_threads_deepcopy_pickle():
    case = CASES_BY_NAME["llava"]
    for clause in (unwrap_clause, threads_clause, deepcopy_clause, pickle_clause):
        clause(case, LLAVA_STAGE)


# an adaptive stage at llm(K): the knee of FastV's last-query attention, rows with dead slots
@register_stage("longtail_llm_test")
@dataclass
class LongTailAtLLM(LongTail):
    site_kinds: ClassVar[tuple[str, ...]] = ("llm",)
    default_site: ClassVar[str] = "llm(2)"

    def signals(self) -> dict[str, dict[str, Any]]:
        return {"last_query_attn": {}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        renamed = TokenSet.from_features(tokens.features, signals={"cls_attn": tokens.signals["last_query_attn"]})
        return super().select(renamed, k)


LLM_STAGE = SiteStage("llm(2)", "longtail_llm_test", dict(keep=1.0), dict(keep=1.0, exact=True))


def test_llm_site_rows_keep_different_counts():
    case = CASES_BY_NAME["llava"]
    model = case.model()
    vtoken.wrap(model, LLM_STAGE.method, **LLM_STAGE.prune)
    with torch.no_grad():
        model(**case.batch("left"))
    counts = [len(row) for row in model.vtoken.stats.kept["llm(2)"]]
    vtoken.unwrap(model)
    assert len(set(counts)) > 1 and max(counts) < 36, f"llm(2) should keep different counts; got {counts}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_llm_site_padded_batch_equals_rows_alone(side):
    batch_clause(CASES_BY_NAME["llava"], LLM_STAGE, side)


@pytest.mark.parametrize("mode", ["greedy", "beam2_2_sequences"])
def test_llm_site_cached_generate_equals_recomputation(mode):
    generate_clause(CASES_BY_NAME["llava"], LLM_STAGE, mode)


def test_llm_site_labels():
    labels_clause(CASES_BY_NAME["llava"], LLM_STAGE)


OTHER_CASES = [pytest.param(CASES_BY_NAME[name], stage, id=name) for name, stage in [
    ("llava_next", longtail_stage(1.0)), ("qwen2_vl", longtail_stage(1.0)), ("qwen2_5_vl", longtail_stage(1.0))]]


@pytest.mark.parametrize("case,stage", OTHER_CASES)
def test_other_families_keep_different_counts(case, stage):
    counts, _ = projector_counts(case, stage)
    assert len(set(counts)) > 1, f"{case.name}: the images should keep different counts to test them; got {counts}"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case,stage", OTHER_CASES)
def test_other_families_padded_batch_equals_rows_alone(case, stage, side):
    batch_clause(case, stage, side)


@pytest.mark.parametrize("case,stage", OTHER_CASES)
def test_other_families_keep_all(case, stage):
    keep_all_clause(case, stage, "sdpa")


@pytest.mark.parametrize("case,stage", OTHER_CASES)
def test_other_families_cached_generate_equals_recomputation(case, stage):
    generate_clause(case, stage, "greedy")
