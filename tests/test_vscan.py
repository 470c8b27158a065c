"""VScan: the scan stage against a slow reference, the named pipeline's budgets, and the stage and the
pipeline through wrapped tiny LLaVA-1.5, LLaVA-NeXT and Qwen2/2.5-VL models."""

from __future__ import annotations

import math

import pytest
import torch

import vtoken
from contract_models import ATTENTION, CASES_BY_NAME, SiteStage
from test_contract import test_cached_generate_equals_recomputation as generate_clause
from test_contract import test_keep_all_matches_unwrapped_logits as keep_all_clause
from test_contract import test_padded_batch_equals_members_alone as batch_clause
from vtoken.budget import scaled_budgets
from vtoken.registry import PIPELINES, register_pipeline
from vtoken.stages import VScanScan
from vtoken.tokens import TokenSet


# --- the selection and merge against a slow reference ---------------------------------------------
def scan_reference(features: torch.Tensor, shallow: list[float], deep: list[float], grid: tuple[int, int], k: int,
                   share: float, window: int) -> tuple[list[int], torch.Tensor]:
    """VScan's scans and merge written out with Python loops: the kept positions and their features."""
    h, w = grid
    n = h * w
    chosen = round(k * share)
    kept = set(sorted(range(n), key=lambda i: (-deep[i], i))[:chosen])
    windows: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        if i not in kept:
            windows.setdefault(((i // w) // window, (i % w) // window), []).append(i)
    offers = []
    for members in windows.values():
        for rank, i in enumerate(sorted(members, key=lambda i: (-shallow[i], i))):
            offers.append((rank, -shallow[i], i))
    kept |= {i for _, _, i in sorted(offers)[: k - chosen]}
    kept_list = sorted(kept)
    groups = {i: [i] for i in kept_list}
    for j in range(n):
        if j in kept:
            continue
        sims = [torch.nn.functional.cosine_similarity(features[j], features[i], dim=0).item() for i in kept_list]
        groups[kept_list[sims.index(max(sims))]].append(j)
    merged = torch.stack([features[groups[i]].mean(0) for i in kept_list])
    return kept_list, merged


def scan_tokens(batch: int, grid: tuple[int, int], dim: int = 8, seed: int = 0) -> TokenSet:
    torch.manual_seed(seed)
    n = grid[0] * grid[1]
    return TokenSet(features=torch.randn(batch, n, dim), index=torch.arange(n).expand(batch, n), grid=grid,
                    signals={"encoder_attn": torch.rand(batch, n, 2)})


@pytest.mark.parametrize("grid,k,share,window", [((6, 6), 8, 0.5, 4), ((6, 6), 9, 0.5, 2), ((5, 7), 12, 0.25, 3),
                                                 ((5, 7), 10, 0.0, 2), ((4, 4), 5, 1.0, 4), ((4, 4), 15, 0.5, 1)])
def test_scan_selection_and_merge_match_reference(grid, k, share, window):
    tokens = scan_tokens(3, grid)
    keep = VScanScan(global_share=share, window=window).select(tokens, k)
    attention = tokens.signals["encoder_attn"]
    for row in range(3):
        indices, merged = scan_reference(tokens.features[row], attention[row, :, 0].tolist(),
                                         attention[row, :, 1].tolist(), grid, k, share, window)
        got = keep.indices[row].tolist()
        assert got == indices, f"row {row}: kept {got}, expected {indices}"
        diff = (keep.features[row] - merged).abs().max().item()
        assert diff <= 1e-6, f"row {row}: merged features differ from the reference by {diff:.3g}"


def test_local_scan_spreads_over_the_windows():
    """With no global tokens and one token per window, the local scan keeps each window's best patch."""
    tokens = scan_tokens(2, (4, 4))
    keep = VScanScan(global_share=0.0, window=2).select(tokens, 4)
    shallow = tokens.signals["encoder_attn"][..., 0]
    for row in range(2):
        best = []
        for top in (0, 2):
            for left in (0, 2):
                cells = [(top + r) * 4 + left + c for r in range(2) for c in range(2)]
                best.append(max(cells, key=lambda i: (shallow[row, i].item(), -i)))
        assert keep.indices[row].tolist() == sorted(best)


def test_keep_all_returns_the_tokens_unchanged():
    tokens = scan_tokens(2, (4, 4))
    keep = VScanScan().select(tokens, 16)
    assert keep.indices.tolist() == [list(range(16))] * 2 and keep.features is None


@pytest.mark.parametrize("options,message", [(dict(global_share=1.5), "global_share"), (dict(window=0), "window"),
                                             (dict(local_layer=0), "local_layer"), (dict(global_layer=1.5),
                                                                                    "global_layer")])
def test_scan_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=f"vscan_scan {message}"):
        VScanScan(**options)


def test_scan_without_a_grid_says_why():
    tokens = scan_tokens(1, (4, 4))
    tokens.grid = None
    with pytest.raises(ValueError, match="vscan_scan needs the tokens on one full"):
        VScanScan().select(tokens, 4)


# --- the named pipeline's budgets ---------------------------------------------------------------------
def test_scaled_budgets():
    assert scaled_budgets(64, (3.0, 1.0)) == [192, 64]
    first, second = scaled_budgets(0.1, (3.0, 1.0))
    assert math.isclose(first, 0.3) and math.isclose(second, 1 / 3)
    assert scaled_budgets(0.5, (3.0, 1.0)) == [1.0, 0.5]  # the first stage keeps every token
    assert scaled_budgets(1.0, (3.0, 1.0)) == [1.0, 1.0]


def test_named_pipeline_is_listed_and_built_with_the_documented_budgets():
    assert "vscan" in vtoken.list_methods() and "vscan_scan" in vtoken.list_methods()
    pipeline = vtoken.build_pipeline("vscan", 64, {})
    scan, fastv = pipeline.stages
    assert (scan.name, str(scan.site), scan.keep) == ("vscan_scan", "projector", 192)
    assert (fastv.name, str(fastv.site), fastv.keep, pipeline.keep) == ("fastv", "llm(16)", None, 64)
    moved = vtoken.build_pipeline("vscan", 4, {"fastv": {"site": "llm(2)"}, "window": 2, "vscan_scan": {"keep": 10}})
    assert [str(s.site) for s in moved.stages] == ["projector", "llm(2)"]
    assert (moved.stages[0].keep, moved.stages[0].window, moved.keep) == (10, 2, 4)


def test_named_pipelines_refuse_bad_registrations_and_joins():
    with pytest.raises(ValueError, match="already registered"):
        register_pipeline("fastv", "fastv", (1,))
    with pytest.raises(ValueError, match="must not increase"):
        register_pipeline("grow", "kcenter@projector+fastv@llm(2)", (1, 2))
    with pytest.raises(ValueError, match="one per stage"):
        register_pipeline("short", "kcenter@projector+fastv@llm(2)", (1,))
    with pytest.raises(ValueError, match="named pipeline"):
        vtoken.build_pipeline("vscan+kcenter", 8, {})
    assert "grow" not in PIPELINES and "short" not in PIPELINES


def test_named_pipeline_gives_the_documented_counts_through_llava():
    case = CASES_BY_NAME["llava"]
    model = case.model()
    batch = case.batch("left")
    with vtoken.wrapped(model, "vscan", keep=3, fastv={"site": "llm(2)"}):
        with torch.no_grad():
            model(**batch)
        stats = model.vtoken.stats
        counts = {(r.stage, r.site): r.tokens_out for r in stats.records}
    assert counts == {("vscan_scan", "projector"): 9, ("fastv", "llm(2)"): 3}, counts
    assert stats.llm_layer_tokens[:2] == [9, 9] and set(stats.llm_layer_tokens[2:]) == {3}


# --- through the wrapped models -------------------------------------------------------------------
def scan(keep: int, **options) -> SiteStage:
    return SiteStage("projector", "vscan_scan", dict(keep=keep, **options), dict(keep=1.0, **options))


def named(keep: int, **options) -> SiteStage:
    at = {"fastv": {"site": "llm(2)"}}
    return SiteStage("vscan", "vscan", dict(keep=keep, **at, **options), dict(keep=1.0, **at, **options))


# budgets that exercise both scans and the merge on the tiny grids (LLaVA 6 x 6, LLaVA-NeXT 4 x 4 views,
# Qwen 2 x 2 to 4 x 2 merged tokens)
STAGES = {
    "llava": [scan(8, window=2), named(3, window=2)],
    "llava_next": [scan(10, window=2, anyres_budget="view"), named(3, window=2, anyres_budget="view")],
    "qwen2_vl": [scan(3, window=1), named(1, window=1)],
    "qwen2_5_vl": [scan(3, window=1), named(1, window=1)],
}
MODEL_CASES = [pytest.param(CASES_BY_NAME[name], stage, id=f"{name}-{stage.id}")
               for name, stages in STAGES.items() for stage in stages]


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case,stage", MODEL_CASES)
def test_keep_all_equals_unwrapped_logits(case, stage, attn):
    keep_all_clause(case, stage, attn)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case,stage", MODEL_CASES)
def test_padded_batch_equals_rows_alone(case, stage, side):
    batch_clause(case, stage, side)


@pytest.mark.parametrize("case,stage", MODEL_CASES)
def test_cached_generate_equals_recomputation(case, stage):
    generate_clause(case, stage, "greedy")


def test_llava_selection_equals_the_reference_on_the_models_own_tensors():
    """The received attention and projector features taken from the unwrapped model (eager attention
    maps) give, through the reference, the positions and features the wrapped model keeps."""
    case = CASES_BY_NAME["llava"]
    model = case.model("eager")
    batch = case.batch("right")
    with torch.no_grad():
        tower = model.model.vision_tower(batch["pixel_values"], output_attentions=True)
        features = model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
    features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
    received = [a.mean(1).mean(1)[:, 1:] for a in tower.attentions]  # per block, mean over heads and queries
    depth = len(received)
    shallow, deep = received[round(depth * 9 / 24) - 1], received[depth - 2]
    with vtoken.wrapped(model, "vscan_scan", keep=8, window=2):
        with torch.no_grad():
            model(**batch)
        kept = [row.tolist() for row in model.vtoken.stats.kept["projector"]]
    for row in range(features.shape[0]):
        expected, _ = scan_reference(features[row], shallow[row].tolist(), deep[row].tolist(), (6, 6), 8, 0.5, 2)
        assert kept[row] == expected, f"row {row}: kept {kept[row]}, the reference {expected}"


def test_wrap_refuses_a_scan_budget_above_the_tokens():
    """3 x keep above the tokens per image is refused at wrap (the message names the scan's count)."""
    model = CASES_BY_NAME["llava"].model()
    with pytest.raises(ValueError, match="keep=39 tokens per image exceeds the 36"):
        vtoken.wrap(model, "vscan", keep=13)
    assert not hasattr(model, "vtoken")


@pytest.mark.parametrize("name,layers", [("llava", 4), ("qwen2_5_vl", 4)])
def test_named_pipeline_prunes_at_the_middle_of_the_models_decoder(name, layers):
    """Without a site of the user's, FastV runs at half the wrapped model's depth (the spec's llm(16) is
    LLaVA-7B's 16 of 32); an explicit site stays as given."""
    case = CASES_BY_NAME[name]
    model = case.model()
    assert len(model.model.language_model.layers) == layers
    with vtoken.wrapped(model, "vscan", keep=1):
        assert [str(s.site) for s in model.vtoken.pipeline.stages] == ["projector", f"llm({layers // 2})"]
    with vtoken.wrapped(model, "vscan", keep=1, fastv={"site": "llm(3)"}):
        assert [str(s.site) for s in model.vtoken.pipeline.stages] == ["projector", "llm(3)"]
