"""DyCoke's dynamic KV-cache pruning while decoding (``dycoke_kv`` on the ``decode`` site), after its
temporal merging (``dycoke`` at the projector), on a tiny Qwen2-VL video.

The reference for a choice is written here from the model's own eager attention map: the wrapped model
with only ``dycoke`` before the LLM is run without a cache over the prompt and the first generated
token, and the top-k visual positions by that token's attention row in decoder layer 2 (mean over
heads; ties to the lower position) are the entries the first choice keeps. Later choices cannot bring
back what the first removed (the site frees it), so with an int budget they keep the same entries.
Cached generation equals generation without a cache, which hides from each generated query the visual
keys the choices before its step removed and makes the choices again from its own rows (greedy, beams,
a fraction budget whose choices compound); a padded batch equals its rows alone.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tiny_models import Q_START, qwen_batch, tiny_qwen
from vtoken.stages import DyCoke, DyCokeKV

ROWS = [[20, ("video", 4, 4, 8), 30, 31], [22, 23, 24, ("video", 4, 4, 8), 33]]  # 32 clip tokens each
TTM, KV, STEPS, LAYER = 16, 6, 6, 2
PER_VIDEO = 4 * 4 * 8  # pixel rows per clip


@pytest.fixture(scope="module")
def model():
    return tiny_qwen("2", "eager", seed=3)


def alone(batch: dict, row: int) -> dict:
    single = qwen_batch([ROWS[row]], seed=0)
    single["pixel_values_videos"] = batch["pixel_values_videos"][row * PER_VIDEO: (row + 1) * PER_VIDEO]
    return single


def wrapped(model, keep=KV, **options):
    return vtoken.wrapped(model, "dycoke+dycoke_kv@decode", keep=keep, dycoke={"keep": TTM}, **options)


def reference_choice(model, single: dict, first_token: int, k: int) -> list[int]:
    """The visual tokens (indices among the clip's kept tokens) the first choice keeps, from the attention
    map the model itself returns for the prompt plus its first generated token."""
    ids = torch.cat([single["input_ids"], torch.tensor([[first_token]])], dim=1)
    grown = dict(single, input_ids=ids,
                 attention_mask=torch.cat([single["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1),
                 mm_token_type_ids=torch.cat([single["mm_token_type_ids"],
                                              torch.zeros(1, 1, dtype=torch.int)], dim=1))
    with vtoken.wrapped(model, "dycoke", keep=TTM), torch.no_grad():
        attentions = model(**grown, output_attentions=True).attentions
    start = int((single["input_ids"][0] == Q_START).nonzero()[0]) + 1  # the kept clip tokens follow it
    row = attentions[LAYER][0, :, -1].double().mean(0)[start: start + TTM]
    assert attentions[LAYER].shape[-1] == ids.shape[1] - 32 + TTM, "the reference must see the merged prompt"
    ranked = sorted(range(TTM), key=lambda i: (-float(row[i]), i))
    return sorted(ranked[:k])


def test_choices_equal_the_reference_and_a_padded_batch_its_rows(model):
    batch = qwen_batch(ROWS, seed=5)
    with vtoken.wrapped(model, DyCoke(keep=TTM)):
        merged_only = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
    with wrapped(model):
        together = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
        kept_together = model.vtoken.stats.kept["decode"]
        records = [(r.site, r.tokens_in, r.tokens_out) for r in model.vtoken.stats.records]
        singles, kept_alone = [], []
        for row in range(len(ROWS)):
            singles.append(model.generate(**alone(batch, row), max_new_tokens=STEPS, do_sample=False))
            kept_alone += model.vtoken.stats.kept["decode"]
    assert ("projector", 32, TTM) in records and ("decode", TTM, KV) in records, records
    for row in range(len(ROWS)):
        assert together[row, -STEPS:].tolist() == singles[row][0, -STEPS:].tolist(), f"row {row}: batch != alone"
        expected = reference_choice(model, alone(batch, row), int(singles[row][0, -STEPS]), KV)
        assert [step for step, _ in kept_together[row]] == list(range(1, STEPS))
        for (_, in_batch), (_, by_itself) in zip(kept_together[row], kept_alone[row]):
            assert in_batch.tolist() == by_itself.tolist() == expected, f"row {row}: choices {in_batch.tolist()}"
    assert not torch.equal(together, merged_only), "the choices changed nothing: this test could not see them"


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=False, num_beams=2),
                                     dict(do_sample=False, num_beams=3, num_return_sequences=2)],
                         ids=["greedy", "beams2", "beams3-return2"])
@pytest.mark.parametrize("keep", [KV, 0.5], ids=["int", "fraction"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_generation_equals_recomputation_with_the_same_choices(model, options, keep, attn):
    """Without a cache each generated query is hidden from what the choices before its step removed; a
    fraction compounds (16, 8, 4, 2, 1 entries), so every choice matters there."""
    model = model if attn == "eager" else tiny_qwen("2", attn, seed=3)
    batch = qwen_batch(ROWS, seed=5)
    runs = {}
    with wrapped(model, keep=keep):
        for use_cache in (True, False):
            out = model.generate(**batch, max_new_tokens=STEPS, use_cache=use_cache, **options)
            runs[use_cache] = (out, model.vtoken.stats.kept["decode"])
    (cached, kept_cached), (recomputed, kept_recomputed) = runs[True], runs[False]
    assert torch.equal(cached, recomputed), f"{cached[:, -STEPS:].tolist()} vs {recomputed[:, -STEPS:].tolist()}"
    for row, (a, b) in enumerate(zip(kept_cached, kept_recomputed)):
        assert [(s, k.tolist()) for s, k in a] == [(s, k.tolist()) for s, k in b], f"row {row}'s choices"
        if keep == 0.5:
            assert [k.numel() for _, k in a] == [8, 4, 2, 1, 1], "a fraction is of the entries present"


def test_options_are_checked():
    with pytest.raises(ValueError, match="dycoke_kv.*accepted sites: 'decode'"):
        DyCokeKV(site="llm(2)")
    with pytest.raises(ValueError, match="dycoke_kv layer="):
        DyCokeKV(layer=1.5)
    assert DyCokeKV().layer == LAYER and str(DyCokeKV().site) == "decode"
    model = tiny_qwen("2", "eager", seed=3)
    with pytest.raises(ValueError, match="layer=9 does not exist"):
        vtoken.wrap(model, "dycoke_kv", keep=4, layer=9)
    assert not hasattr(model, "vtoken") or model.vtoken is None
