"""VisionZip, HiPrune and CDPruner: each selection against a slow reference written here, index for index
(fixed fp32 inputs), and each stage through the wrapped LLaVA-1.5, LLaVA-NeXT and Qwen2/2.5-VL tiny models:
alone and in a padded batch, keep-all against the unwrapped logits, and wrap's refusal where a signal
is missing."""

from __future__ import annotations

import pytest
import torch

import vtoken
from contract_models import ATTENTION, CASES_BY_NAME, SiteStage
from test_contract import test_keep_all_matches_unwrapped_logits as keep_all_clause
from test_contract import test_padded_batch_equals_members_alone as batch_clause
from vtoken.stages import CDPruner, HiPrune, PixelShuffle, VisionZip
from vtoken.tokens import TokenSet


# --- slow references ------------------------------------------------------------------------------
def top_positions(scores: list[float], count: int) -> list[int]:
    """The ``count`` largest scores' positions, ties to the lower position."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count]


def visionzip_reference(x: torch.Tensor, cls: torch.Tensor, k: int, c: int):
    """One row: (kept positions ascending, their features, assign) by VisionZip's procedure, in float64."""
    n = x.shape[0]
    dominant = top_positions(cls.tolist(), k - c)
    rest = [i for i in range(n) if i not in dominant]
    step = max(1, len(rest) // c) if c else 1
    targets = rest[::step][:c] if c else []
    others = [i for i in rest if i not in targets] if c else []  # without targets the rest is dropped
    x64 = x.double()
    groups = {t: [t] for t in targets}
    for o in others:
        sims = [float(x64[o] @ x64[t] / (x64[o].norm() * x64[t].norm())) for t in targets]
        groups[targets[max(range(len(targets)), key=lambda j: (sims[j], -j))]].append(o)
    kept = sorted(dominant + targets)
    features = torch.stack([x64[groups[i]].mean(0) if i in groups else x64[i] for i in kept])
    assign = [-1] * n
    for slot, i in enumerate(kept):
        for member in groups.get(i, [i]):
            assign[member] = slot
    return kept, features, assign


def hiprune_reference(obj: list[float], deep: list[float], grid: tuple[int, int], k: int, alpha: float) -> list[int]:
    h, w = grid
    anchors = top_positions(obj, round(k * alpha / 5))
    buffers = []
    for a in anchors:
        r, c = divmod(a, w)
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            p = rr * w + cc
            if 0 <= rr < h and 0 <= cc < w and p not in anchors and p not in buffers:
                buffers.append(p)
    if len(anchors) + len(buffers) >= k:
        buffers = sorted(buffers, key=lambda p: (-obj[p], p))[: k - len(anchors)]
        return sorted(anchors + buffers)
    rest = [p for p in range(h * w) if p not in anchors and p not in buffers]
    registers = sorted(rest, key=lambda p: (-deep[p], p))[: k - len(anchors) - len(buffers)]
    return sorted(anchors + buffers + registers)


def cdpruner_reference(x: torch.Tensor, text: torch.Tensor, k: int) -> list[int]:
    """Greedy determinant maximisation with the conditional kernel, in float64."""
    x64 = x.double() / x.double().norm(dim=-1, keepdim=True)
    t64 = text.double() / text.double().norm(dim=-1, keepdim=True)
    mean = (x64 @ t64.T).mean(-1)
    r = (mean - mean.min() + 1e-6) / (mean.max() - mean.min())
    kernel = r[:, None] * (x64 @ x64.T) * r[None, :]
    chosen: list[int] = []
    for _ in range(k):
        dets = {j: float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]))
                for j in range(x.shape[0]) if j not in chosen}
        chosen.append(max(dets, key=lambda j: (dets[j], -j)))
    return sorted(chosen)


# --- selections against the references ---------------------------------------------------------
@pytest.mark.parametrize("k,contextual", [(12, 3), (12, 0.25), (9, 1), (20, 5), (24, 6), (7, 0)])
def test_visionzip_selection_matches_reference(k, contextual):
    torch.manual_seed(k)
    x, cls = torch.randn(3, 24, 16), torch.rand(3, 24)
    stage = VisionZip(contextual=contextual)
    keep = stage.select(TokenSet.from_features(x, grid=(4, 6), signals={"cls_attn": cls}), k)
    for row in range(3):
        kept, features, assign = visionzip_reference(x[row], cls[row], k, stage.contextual_count(k))
        assert keep.indices[row].tolist() == kept, f"row {row}: kept {keep.indices[row].tolist()} != {kept}"
        merged = keep.features if keep.features is not None else x[row][keep.indices[row]][None].expand(3, -1, -1)
        torch.testing.assert_close(merged[row].double(), features, rtol=1e-5, atol=1e-6)
        if keep.assign is not None:
            assert keep.assign[row].tolist() == assign


def test_visionzip_keep_all_returns_the_features_unchanged():
    x = torch.randn(2, 10, 8)
    keep = VisionZip().select(TokenSet.from_features(x, signals={"cls_attn": torch.rand(2, 10)}), 10)
    assert keep.indices.tolist() == [list(range(10))] * 2
    assert torch.equal(keep.features, x)


@pytest.mark.parametrize("k,alpha", [(20, 0.5), (30, 0.1 * 5 / 3), (12, 1.0), (6, 1.0), (40, 0.1), (9, 0.0)])
def test_hiprune_selection_matches_reference(k, alpha):
    torch.manual_seed(k)
    grid = (6, 8)
    attn = torch.rand(3, 48, 2)
    keep = HiPrune(alpha=alpha).select(TokenSet.from_features(torch.randn(3, 48, 4), grid=grid,
                                                              signals={"encoder_attn": attn}), k)
    for row in range(3):
        expected = hiprune_reference(attn[row, :, 0].tolist(), attn[row, :, 1].tolist(), grid, k, alpha)
        assert keep.indices[row].tolist() == expected, f"row {row}"


def test_hiprune_buffers_do_not_wrap_across_rows():
    obj = torch.zeros(1, 12)
    obj[0, 3] = 1.0  # the last patch of the first row of a 3 x 4 grid
    attn = torch.stack([obj, torch.zeros(1, 12)], dim=-1)
    keep = HiPrune(alpha=1.0).select(TokenSet.from_features(torch.randn(1, 12, 4), grid=(3, 4),
                                                            signals={"encoder_attn": attn}), 5)
    # anchor 3; neighbours 2 (left) and 7 (below); not 4 (the next row's first patch)
    assert 3 in keep.indices[0].tolist() and 2 in keep.indices[0].tolist() and 7 in keep.indices[0].tolist()
    assert 4 not in keep.indices[0].tolist()


def test_hiprune_without_a_grid_says_why():
    tokens = TokenSet.from_features(torch.randn(1, 6, 4), signals={"encoder_attn": torch.rand(1, 6, 2)})
    with pytest.raises(ValueError, match="hiprune needs the tokens on one full"):
        HiPrune().select(tokens, 3)


@pytest.mark.parametrize("k", [1, 4, 9, 15])
def test_cdpruner_selection_matches_reference(k):
    torch.manual_seed(k)
    x, text = torch.randn(2, 18, 32), torch.randn(2, 5, 32)
    keep = CDPruner().select(TokenSet.from_features(x, context={"prompt_text": text}), k)
    for row in range(2):
        assert keep.indices[row].tolist() == cdpruner_reference(x[row], text[row], k), f"row {row}"


def test_cdpruner_relevance_weighting_and_exhausted_kernel():
    torch.manual_seed(0)
    x, text = torch.randn(1, 12, 4), torch.randn(1, 3, 4)  # rank 4: the kernel is exhausted after 4 picks
    tokens = TokenSet.from_features(x, context={"prompt_text": text})
    keep = CDPruner().select(tokens, 12)
    assert keep.indices[0].tolist() == list(range(12))  # every token once, no NaN pivot
    weighted = CDPruner(theta=0.5).relevance(tokens)
    plain = CDPruner().relevance(tokens)
    torch.testing.assert_close(weighted, torch.exp(0.5 * plain))
    first = CDPruner().select(tokens, 3).indices[0].tolist()
    assert first == cdpruner_reference(x[0], text[0], 3)


def test_cdpruner_without_text_keeps_the_most_diverse():
    torch.manual_seed(1)
    x = torch.randn(1, 10, 16)
    keep = CDPruner().select(TokenSet.from_features(x, context={"prompt_text": torch.zeros(1, 0, 16)}), 4)
    x64 = x[0].double() / x[0].double().norm(dim=-1, keepdim=True)
    kernel = x64 @ x64.T
    greedy: list[int] = []
    for _ in range(4):
        greedy.append(max((j for j in range(10) if j not in greedy),
                          key=lambda j: float(torch.linalg.det(kernel[greedy + [j]][:, greedy + [j]]))))
    assert keep.indices[0].tolist() == sorted(greedy)


@pytest.mark.parametrize("bad", [dict(contextual=1.5), dict(contextual=-1), dict(contextual=True)])
def test_visionzip_refuses_bad_contextual(bad):
    with pytest.raises(ValueError, match="visionzip contextual"):
        VisionZip(**bad)


def test_hiprune_and_cdpruner_refuse_bad_options():
    with pytest.raises(ValueError, match="hiprune alpha"):
        HiPrune(alpha=2.0)
    with pytest.raises(ValueError, match="hiprune object_layer"):
        HiPrune(object_layer=0)
    with pytest.raises(ValueError, match="cdpruner theta"):
        CDPruner(theta=1.0)
    with pytest.raises(ValueError, match="cannot run at"):
        CDPruner(site="llm(2)")


# --- through the wrapped models ---------------------------------------------------------------------
def front(method: str, keep: int, site: str = "projector", **options) -> SiteStage:
    at = {} if site == "projector" else {"site": site}
    return SiteStage(site, method, dict(keep=keep, **at, **options), dict(keep=1.0, **at, **options))


# each stage at the sites it declares; budgets and options that exercise every part of the selection
# on the tiny grids (LLaVA 6 x 6, LLaVA-NeXT 4 x 4 views, Qwen 2 x 2 to 4 x 2 merged tokens)
FRONT = {
    "llava": [front("visionzip", 8), front("visionzip", 8, "vision(1)"), front("hiprune", 8, alpha=0.5),
              front("cdpruner", 8)],
    "llava_next": [front("visionzip", 10), front("hiprune", 10, alpha=0.5, anyres_budget="view"),
                   front("cdpruner", 10)],
    "qwen2_vl": [front("visionzip", 3, contextual=1), front("visionzip", 3, "vision(1)", contextual=1),
                 front("hiprune", 3, alpha=1.0), front("cdpruner", 3)],
    "qwen2_5_vl": [front("visionzip", 3, contextual=1), front("hiprune", 3, alpha=1.0), front("cdpruner", 3)],
    # Qwen3-VL and Qwen3.5 share Qwen2-VL's vision side and projector signals
    "qwen3_vl": [front("visionzip", 3, contextual=1), front("hiprune", 3, alpha=1.0), front("cdpruner", 3)],
    "qwen3_5": [front("hiprune", 3, alpha=1.0), front("cdpruner", 3)],
}
MODEL_CASES = [pytest.param(CASES_BY_NAME[name], stage, id=f"{name}-{stage.id}")
               for name, stages in FRONT.items() for stage in stages]


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("case,stage", MODEL_CASES)
def test_keep_all_equals_unwrapped_logits(case, stage, attn):
    keep_all_clause(case, stage, attn)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case,stage", MODEL_CASES)
def test_padded_batch_equals_rows_alone(case, stage, side):
    batch_clause(case, stage, side)


def kept_at_projector(model, inputs: dict) -> list[list[int]]:
    with torch.no_grad():
        model(**inputs)
    return [row.tolist() for row in model.vtoken.stats.kept["projector"]]


def llava_text_after_image(model, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for row in range(ids.shape[0]):
        last = int((ids[row] == model.config.image_token_id).nonzero().max())
        keep = [p for p in range(last + 1, ids.shape[1]) if mask[row, p]]
        out.append(model.get_input_embeddings()(ids[row, keep]))
    return out


def test_llava_selections_equal_the_references_on_the_models_own_tensors():
    """The signals each stage reads, taken here from the unwrapped model (eager attention maps, the
    projector's output, the prompt's embeddings), give the reference selections the wrapped model makes."""
    case = CASES_BY_NAME["llava"]
    model = case.model("eager")
    batch = case.batch("right")
    with torch.no_grad():
        tower = model.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
        features = model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
        texts = llava_text_after_image(model, batch["input_ids"], batch["attention_mask"])
    features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
    maps = [a.mean(1) for a in tower.attentions]  # per block [B, T, T], mean over heads
    depth, grid = len(maps), (6, 6)
    cls = maps[depth - 2][:, 0, 1:]  # the block producing hidden state -2
    received = [m.mean(1)[:, 1:] for m in maps]  # mean over every query, [CLS] included
    object_block = round(depth * 9 / 24) - 1

    with vtoken.wrapped(model, "visionzip", keep=8):
        got = kept_at_projector(model, batch)
    for row in range(3):
        assert got[row] == visionzip_reference(features[row], cls[row], 8, 1)[0], f"visionzip row {row}"
    with vtoken.wrapped(model, "hiprune", keep=8, alpha=0.5):
        got = kept_at_projector(model, batch)
    for row in range(3):
        expected = hiprune_reference(received[object_block][row].tolist(), received[depth - 2][row].tolist(),
                                     grid, 8, 0.5)
        assert got[row] == expected, f"hiprune row {row}"
    with vtoken.wrapped(model, "cdpruner", keep=8):
        got = kept_at_projector(model, batch)
    for row in range(3):
        assert got[row] == cdpruner_reference(features[row], texts[row], 8), f"cdpruner row {row}"


def test_hiprune_layers_are_chosen_and_checked():
    case = CASES_BY_NAME["llava"]
    model = case.model("eager")
    batch = case.batch("left")
    with torch.no_grad():
        tower = model.model.vision_tower(batch["pixel_values"], output_attentions=True)
    received = [a.mean(1).mean(1)[:, 1:] for a in tower.attentions]
    with vtoken.wrapped(model, "hiprune", keep=8, alpha=1.0, object_layer=1, deep_layer=-1):
        got = kept_at_projector(model, batch)
    for row in range(3):
        assert got[row] == hiprune_reference(received[0][row].tolist(), received[-1][row].tolist(), (6, 6), 8, 1.0)
    with pytest.raises(ValueError, match="encoder layer 9 does not exist .* accepted: 1..4"):
        with vtoken.wrapped(model, "hiprune", keep=8, object_layer=9):
            kept_at_projector(model, batch)


def test_wrap_refuses_where_a_signal_is_not_offered():
    model = CASES_BY_NAME["llava"].model()
    pipeline = vtoken.Pipeline([PixelShuffle(layer=1), HiPrune(keep=8)])  # after vision(L) pruning
    with pytest.raises(ValueError, match="hiprune at projector need.*'encoder_attn'.*projector provides: 'cls_attn'"):
        vtoken.wrap(model, pipeline)
    assert not hasattr(model, "vtoken")
    with pytest.raises(ValueError, match=r"'cdpruner' cannot run at vision\(1\); accepted sites: projector"):
        vtoken.wrap(model, "cdpruner", keep=8, site="vision(1)")
    with pytest.raises(ValueError, match="hiprune at the projector need.*anyres_budget='view' or 'guided'"):
        vtoken.wrap(CASES_BY_NAME["llava_next"].model(), "hiprune", keep=10)


def test_cdpruner_follows_the_instruction():
    """Two prompts that differ only in the question after the image keep different tokens (the text
    reaches the stage), and a prompt with no text after the image keeps the most diverse ones."""
    case = CASES_BY_NAME["llava"]
    model = case.model()
    rows = [([20], [30, 31, 32, 33], 11), ([20], [60, 61, 62, 63], 11)]
    inputs = case.build_inputs(model, rows, "left")
    vtoken.wrap(model, "cdpruner", keep=8)
    got = kept_at_projector(model, inputs)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
        texts = llava_text_after_image(model, inputs["input_ids"], inputs["attention_mask"])
    features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
    for row in range(2):
        assert got[row] == cdpruner_reference(features[row], texts[row], 8), f"row {row}"
    assert got[0] != got[1], "the question after the image did not change the selection"


def test_hiprune_then_cdpruner_share_the_projector_budget():
    """``hiprune+cdpruner``: HiPrune commits its share of the budget on the full grid, CDPruner fills the
    rest among the tokens HiPrune left (the pipeline's commit-and-fill), each as its reference says."""
    case = CASES_BY_NAME["llava"]
    model = case.model("eager")
    batch = case.batch("left")
    with torch.no_grad():
        tower = model.model.vision_tower(batch["pixel_values"], output_attentions=True)
        features = model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
        texts = llava_text_after_image(model, batch["input_ids"], batch["attention_mask"])
    features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
    received = [a.mean(1).mean(1)[:, 1:] for a in tower.attentions]
    with vtoken.wrapped(model, "hiprune+cdpruner", keep=10, hiprune={"keep": 6, "alpha": 1.0}):
        got = kept_at_projector(model, batch)
    for row in range(3):
        first = hiprune_reference(received[1][row].tolist(), received[2][row].tolist(), (6, 6), 6, 1.0)
        rest = [p for p in range(36) if p not in first]
        second = [rest[i] for i in cdpruner_reference(features[row][rest], texts[row], 4)]
        assert got[row] == sorted(first + second), f"row {row}"


def test_scoring_never_falls_back_to_eager_attention(monkeypatch):
    """encoder_attn and cls_attn are recomputed from the layers' own projections: no attention map is
    ever asked for, and the model keeps running on SDPA."""
    import transformers.models.clip.modeling_clip as clip
    import transformers.models.llama.modeling_llama as llama

    def refuse(*args, **kwargs):
        raise AssertionError("eager attention (a full attention map) was used")

    case = CASES_BY_NAME["llava"]
    model = case.model("sdpa")
    batch = case.batch("left")
    monkeypatch.setattr(llama, "eager_attention_forward", refuse)
    monkeypatch.setattr(clip, "eager_attention_forward", refuse)
    for method in ("visionzip", "hiprune", "cdpruner"):
        with vtoken.wrapped(model, method, keep=8):
            model.generate(**batch, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_received_attention_from_the_forward_projections_equals_the_recomputed_one(family):
    """HiPrune's encoder_attn and OneVision's received attention read the q/k projections the tower computed
    in its forward; recomputing them from the layer's captured input must give the same scores, bit for bit."""
    from tiny_models import llava_batch, prompt_ids, tiny_llava, tiny_llava_onevision
    from vtoken.integrations.base import Integration, captured_inputs
    from vtoken.integrations.projector_signals import clip_received_attention, projection_hooks

    model = tiny_llava() if family == "llava" else tiny_llava_onevision()
    integration = Integration.for_model(model)
    layers = integration.vision_layers()
    wanted = [0, len(layers) - 1]
    projected, hooks = projection_hooks(layers, wanted)
    if family == "llava":
        batch = llava_batch([prompt_ids([20], 1, [30]), prompt_ids([21, 22], 1, [31])])
    else:
        batch = {"pixel_values": torch.randn(2, 3, model.config.vision_config.image_size,
                                             model.config.vision_config.image_size)}
    with captured_inputs(layers, wanted, *hooks) as captured, torch.no_grad():
        tower = model.model.vision_tower
        tower(batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[-3:]))
    assert set(projected) == set(wanted) and all(set(p) == {"q_proj", "k_proj"} for p in projected.values())
    for i in wanted:
        from_forward = clip_received_attention(layers[i], captured[i], projected[i])
        recomputed = clip_received_attention(layers[i], captured[i])
        assert from_forward.shape == captured[i].shape[:2]
        assert torch.equal(from_forward, recomputed)
    assert not any(getattr(layers[i].self_attn, name)._forward_hooks for i in wanted for name in ("q_proj", "k_proj"))
