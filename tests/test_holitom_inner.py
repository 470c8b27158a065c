"""HoliTom's inner-LLM merging (``holitom_llm``) and the outer + inner pipeline (``holitom_full``) on video.

The wrapped model's selection, merged hidden states and logits equal a slow reference written here: the
decoder of a tiny Qwen2.5-VL / Qwen2-VL run by hand on a video clip, layer K-1's attention taken from the
model's own eager attention weights (mean over heads, the last prompt token's row, as the authors read
it), the kept tokens, similarities and merges computed with loops from their definitions, then the layers
from K on run by hand on the kept positions. Then the contract clauses on clips (keep-all, unwrap, cached
generation with beams and several returned sequences, padded batches, threads, deepcopy, pickle) on
Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision."""

from __future__ import annotations

import math

import pytest
import torch

import test_contract as contract
import vtoken
from contract_models import CASES_BY_NAME, ONEVISION_VIDEO_CASES, QWEN2_VIDEO_CASES, Case, SiteStage, qwen3_inputs
from tiny_models import Q_VIDEO, qwen3_batch, qwen_batch, tiny_qwen, tiny_qwen3_vl
from vtoken.stages import HoliTomLLM
from vtoken.tokens import TokenSet

CLIP = [20, 21, ("video", 4, 4, 8), 30, 31, 32]  # 4 frames of 2 x 4 tokens: 32 tokens


def reference_selection(score: list[float], hidden: torch.Tensor, k: int) -> tuple[list[int], dict[int, list[int]]]:
    """The authors' rule for one row: keep the k most attended (ties: lower position); each other token
    joins the kept token of highest cosine similarity (ties: the more attended). Returns the kept
    positions (ascending) and, per kept position, the positions merged into it (itself first)."""
    n = len(score)
    by_attention = sorted(range(n), key=lambda i: (-score[i], i))[:k]
    groups = {i: [i] for i in sorted(by_attention)}
    for i in range(n):
        if i in groups:
            continue
        best, target = -math.inf, None
        for j in by_attention:
            a, b = hidden[i].double(), hidden[j].double()
            similarity = float((a @ b) / (a.norm() * b.norm()))
            if similarity > best:
                best, target = similarity, j
        groups[target].append(i)
    return sorted(groups), groups


def test_select_equals_the_reference_on_fixed_inputs():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 8, generator=generator)
    score = torch.rand(3, 20, generator=generator)
    score[1, 3] = score[1, 9]  # a tie in attention: the lower position goes first
    tokens = TokenSet.from_features(torch.randn(3, 20, 8), signals={"last_query_attn": score})
    tokens.context["hidden"] = hidden
    for k in (1, 5, 12, 20):
        keep = HoliTomLLM(site="llm(2)").select(tokens, k)
        for row in range(3):
            kept, groups = reference_selection(score[row].tolist(), hidden[row], k)
            assert keep.indices[row].tolist() == kept
            for slot, position in enumerate(kept):
                members = [i for i in range(20) if keep.assign[row, i] == slot]
                assert sorted(members) == sorted(groups[position])
                mean = hidden[row, groups[position]].mean(0)
                torch.testing.assert_close(keep.features[row, slot], mean, atol=1e-6, rtol=0)


def causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def capture_layers(model, indices):
    """The arguments each decoder layer of ``indices`` receives in the next forward."""
    seen, handles = {}, []
    for index in indices:
        def hook(module, args, kwargs, index=index):
            seen[index] = ((args[0] if args else kwargs["hidden_states"]).detach().clone(), dict(kwargs))
        handles.append(model.model.language_model.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def on_positions(table: torch.Tensor, keep: torch.Tensor, length: int) -> torch.Tensor:
    """A rotary table gathered at ``keep`` along its sequence dimension (the one of size ``length``)."""
    dim = [d for d, size in enumerate(table.shape) if size == length][-1]
    return table.index_select(dim, keep)


def slow_holitom_llm(model, batch: dict, site: int, k: int, outer: tuple | None = None):
    """The decoder by hand for one row (eager attention). ``outer``: (method, keep) run at the projector
    first (the model wrapped with it alone gives layer K-1 its input). Returns the last logits, the kept
    visual positions (indices into the visual tokens) and the merged hidden states by sequence position."""
    lm = model.model.language_model
    layers = list(range(site - 1, len(lm.layers)))
    with torch.no_grad():
        if outer is not None:
            vtoken.wrap(model, outer[0], keep=outer[1])
        seen, handles = capture_layers(model, layers)
        try:
            model(**batch)
        finally:
            for handle in handles:
                handle.remove()
            if outer is not None:
                vtoken.unwrap(model)
        before, kwargs_before = seen[site - 1]
        layer = lm.layers[site - 1]
        normed = layer.input_layernorm(before)
        length = before.shape[1]
        _, weights = layer.self_attn(hidden_states=normed, attention_mask=causal_mask(length, before.dtype),
                                     position_embeddings=kwargs_before["position_embeddings"])
        row = weights[0].mean(0)[-1]  # mean over heads, the last prompt token's row
        hidden, kwargs = seen[site]
        if outer is None:
            visual = (batch["input_ids"][0] == Q_VIDEO).nonzero()[:, 0].tolist()
        else:
            visual = [i for i, flag in enumerate(visual_positions(batch, length)) if flag]
        kept, groups = reference_selection([float(row[p]) for p in visual], hidden[0, visual], k)
        merged, new = {}, hidden.clone()
        for slot in kept:
            position = visual[slot]
            new[0, position] = hidden[0, [visual[i] for i in groups[slot]]].mean(0)
            merged[position] = new[0, position]
        stay = torch.tensor([i for i in range(length) if i not in visual or visual.index(i) in kept])
        x = new[:, stay]
        cos, sin = kwargs["position_embeddings"]
        table = (on_positions(cos, stay, length), on_positions(sin, stay, length))
        for index in range(site, len(lm.layers)):
            x = lm.layers[index](x, attention_mask=causal_mask(x.shape[1], x.dtype), position_embeddings=table)
        logits = model.lm_head(lm.norm(x))[:, -1]
    return logits, kept, merged, stay


def visual_positions(batch: dict, length: int) -> list[bool]:
    """Which of the language model's ``length`` positions hold clip tokens after a projector stage (it only
    thins the clip's one run of placeholders, so the text before and after it is unchanged)."""
    ids = batch["input_ids"][0].tolist()
    text = [token != Q_VIDEO for token in ids]
    before = text.index(False)
    after = len(ids) - 1 - text[::-1].index(False)
    visual_count = length - (before + len(ids) - 1 - after)
    return [False] * before + [True] * visual_count + [False] * (len(ids) - 1 - after)


@pytest.mark.parametrize("version,pipeline", [("2", "holitom_llm"), ("2", "holitom_full"), ("2.5", "holitom_llm"),
                                              ("2.5", "holitom_full"), ("3", "holitom_llm")])
def test_selection_merges_and_logits_equal_the_slow_reference(version, pipeline):
    """Qwen3-VL writes each frame as its own run after a timestamp; its DeepStack levels are added after
    layers 0 and 1, before the site, so the layers run by hand from K on add none."""
    model = tiny_qwen3_vl(False, "eager", seed=3) if version == "3" else tiny_qwen(version, "eager", seed=3)
    batch = (qwen3_batch if version == "3" else qwen_batch)([CLIP], seed=5)
    if pipeline == "holitom_llm":
        site, k, options, outer = 2, 12, dict(keep=12, site="llm(2)"), None
    else:  # the outer merge keeps 2 x 8 of the clip's 32, this stage at round(4 x 18 / 28) = llm(3) keeps 8
        site, k, options, outer = 3, 8, dict(keep=8), ("holitom", 16)
    expected, kept, merged, stay = slow_holitom_llm(model, batch, site, k, outer)
    assert len(merged) == k
    with vtoken.wrapped(model, pipeline, **options), torch.no_grad():
        seen, handles = capture_layers(model, [site])
        got = model(**batch).logits[:, -1]
        for handle in handles:
            handle.remove()
        stats = model.vtoken.stats
    assert stats.kept[f"llm({site})"][0].tolist() == kept
    for position, vector in merged.items():
        torch.testing.assert_close(seen[site][0][0, stay.tolist().index(position)], vector, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_named_pipeline_places_its_stages_and_shares_the_budget():
    """keep=0.25 of a 32-token clip: the outer merge keeps 2 x 0.25 (16), the inner half of that (8), at
    18/28 of the 4-layer decoder's depth (llm(3))."""
    model = tiny_qwen("2.5")
    with vtoken.wrapped(model, "holitom_full", keep=0.25), torch.no_grad():
        model(**qwen_batch([CLIP], seed=5))
        stats = model.vtoken.stats
        sites = [str(site) for site in model.vtoken.pipeline.sites]
    assert sites == ["projector", "llm(3)"]
    assert [len(stats.kept[site][0]) for site in sites] == [16, 8]
    assert stats.llm_layer_tokens == [16, 16, 16, 8]


# --- the contract clauses on clips -------------------------------------------------------------------------
INNER = [SiteStage("llm(2)", "holitom_llm", dict(keep=12, site="llm(2)"), dict(keep=1.0, site="llm(2)")),
         SiteStage("projector+llm", "holitom_full", dict(keep=8), dict(keep=1.0))]
_QWEN3 = CASES_BY_NAME["qwen3_vl"]
#: Qwen3-VL on clips (each frame its own run after a timestamp): 4, 6 and 4 frames of 2 x 4 tokens
QWEN3_VIDEO_CASE = Case("qwen3_vl_video", "qwen3_vl", "qwen3_vl", True, _QWEN3.build_model,
                        [[20, ("video", 4, 4, 8, 61), 30, 31], [21, 22, ("video", 6, 4, 8, 62), 32],
                         [23, ("video", 4, 4, 8, 63), 33, 34, 35]], qwen3_inputs, INNER, _QWEN3.weight,
                        run=_QWEN3.run, notes="video clips, frame by frame")
CASES_BY_NAME[QWEN3_VIDEO_CASE.name] = QWEN3_VIDEO_CASE  # Case.model builds (and caches) its models by name
CASES = [pytest.param(case, stage, id=f"{case.name}-{stage.method}")
         for case in QWEN2_VIDEO_CASES + [QWEN3_VIDEO_CASE] + ONEVISION_VIDEO_CASES for stage in INNER]


@pytest.mark.parametrize("case,stage", CASES)
def test_video_contract(case, stage):
    """Keep-all equals the unwrapped logits (eager and sdpa), unwrap restores, cached generation (greedy,
    beams, several returned sequences) equals recomputation, a padded batch of clips equals each alone."""
    if case.integration == "llava_onevision" and not hasattr(__import__("transformers"),
                                                            "LlavaOnevisionForConditionalGeneration"):
        pytest.skip("LLaVA-OneVision needs a transformers with LlavaOnevisionForConditionalGeneration")
    contract.run_clauses_without_labels(case, stage)
