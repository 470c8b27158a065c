"""MustDrop's key-token set and the named method ``mustdrop``.

The window merge at the projector pins the ``ceil(0.08 k)`` merged tokens with the most [CLS] attention in
the last encoder layer; the pins ride with the tokens into the decoder (the ``pinned`` signal) and the
dual-attention filter keeps them first. Each check runs the wrapped tiny LLaVA-1.5 against a slow reference
written here: the [CLS] row recomputed per head in float64 from the last CLIP block's input, the merge's
groups by loops (``slow_window_merge``), the decoder run layer by layer by hand with each text query's
softmax row; then the named pipeline alone, in a padded batch and through the contract clauses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import test_contract as contract
import vtoken
from contract_models import CASES_BY_NAME, SiteStage
from test_llm_pyramid import decoder_inputs
from test_mustdrop import PROMPTS, slow_filter, slow_window_merge
from tiny_models import BOS, GRID, IMAGE_TOKEN, llava_batch, tiny_llava
from vtoken.stages import MustDropFilter, MustDropMerge
from vtoken.stages.base import Stage
from vtoken.tokens import Keep, TokenSet

#: the prompts of PROMPTS, as (text before the image, text after it)
PARTS = [([20, 21], [30, 31, 32, 33, 34]), ([22], [35, 36]), ([23, 24, 25], [37, 38, 39, 40])]


@dataclass
class PinProbe(Stage):
    """Keeps every token and records the ``pinned`` signal it is handed (a test stage, not registered)."""

    seen: list = field(default_factory=list)

    name: ClassVar[str] = "pin_probe"
    site_kinds: ClassVar[tuple[str, ...]] = ("projector", "llm", "decode")
    default_site: ClassVar[str] = "llm(1)"

    def signals(self) -> dict:
        return {"pinned": {}}

    def select(self, tokens: TokenSet, k: int) -> Keep:
        self.seen.append(tokens.signals["pinned"].clone())
        return Keep(indices=torch.arange(k).expand(tokens.batch_size, k))


def slow_cls_attention(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[images, patches]``: the [CLS] query's softmax row in the last CLIP block, per head in float64 from
    that block's input, mean over heads, [CLS] column left out."""
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[-2]  # the last block's input
        layer = getattr(tower, "vision_model", tower).encoder.layers[-1]
        attention = layer.self_attn
        x = layer.layer_norm1(hidden)
        images, n, _ = x.shape
        q = attention.q_proj(x).view(images, n, -1, attention.head_dim).double()
        k = attention.k_proj(x).view(images, n, -1, attention.head_dim).double()
    rows = torch.zeros(images, n, dtype=torch.float64)
    for image in range(images):
        for head in range(q.shape[2]):
            scores = (k[image, :, head] @ q[image, 0, head]) * attention.scale
            rows[image] += torch.softmax(scores, dim=0) / q.shape[2]
    return rows[:, 1:]


def projector_features(model, batch: dict) -> torch.Tensor:
    """The projector's output ``[images, patches, D]`` of the unwrapped model (what the merge receives)."""
    seen = {}
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.update(x=out))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["x"]


def slow_key_set(model, batch: dict, image: int, keep: int, share: float = 0.08) -> tuple[list, list[bool]]:
    """The merge's groups (by their last token) and which of them are pinned: the ``ceil(share * keep)``
    groups with the highest mean [CLS] attention of their members (ties: the earlier group)."""
    features = projector_features(model, batch)[image]
    attention = slow_cls_attention(model, batch["pixel_values"])[image]
    groups = slow_window_merge(features, GRID, GRID, 3, keep)
    score = [float(attention[g].mean()) for g in groups]
    chosen = sorted(range(len(groups)), key=lambda s: (-score[s], s))[: math.ceil(share * keep)]
    return groups, [s in chosen for s in range(len(groups))]


def slow_reference(model, prompt: int, pixels: torch.Tensor, merge: int, plan: dict[int, int], share: float = 0.08):
    """One prompt of PARTS with its image: the merged decoder input (the wrapped merge's, whose groups the
    merge tests check), the slow key set, and the slow filter over it. Returns logits, kept, pinned groups."""
    before, after = PARTS[prompt]
    batch = llava_batch([PROMPTS[prompt]])
    batch["pixel_values"] = pixels
    _, pinned_groups = slow_key_set(model, batch, 0, merge, share)
    with vtoken.wrapped(model, MustDropMerge(keep=merge, key_share=share)):
        hidden = decoder_inputs(model, batch)
    shrunk = [BOS] + before + [IMAGE_TOKEN] * merge + [10] + after
    assert hidden.shape[1] == len(shrunk)
    start = 1 + len(before)
    pinned = [False] * start + pinned_groups + [False] * (len(shrunk) - start - merge)
    logits, kept = slow_filter(model, hidden, [t == IMAGE_TOKEN for t in shrunk], pinned, plan)
    return logits, kept, pinned_groups


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager", seed=13)


@pytest.mark.parametrize("merge", [40, 144])
def test_the_key_set_equals_the_slow_reference(model, merge):
    """What an llm(K) stage is handed as ``pinned``: the slow key set, in the merged tokens' order."""
    batch = llava_batch([PROMPTS[0]], seed=4)
    _, expected = slow_key_set(model, batch, 0, merge)
    probe = PinProbe(site="llm(1)", keep=1.0)
    with vtoken.wrapped(model, vtoken.Pipeline([MustDropMerge(keep=merge), probe])), torch.no_grad():
        model(**batch)
    assert sum(expected) == math.ceil(0.08 * merge)
    assert probe.seen[-1][0].tolist() == expected


@pytest.mark.parametrize("share,keep", [(0.08, 10), (0.5, 12)])
def test_the_filter_keeps_the_pinned_first_as_the_slow_reference(model, share, keep):
    """Pins within the budget all stay and the ranking fills the rest; more pins than the budget (20 > 12):
    the pinned tokens the filter ranks highest."""
    batch = llava_batch([PROMPTS[0]], seed=4)
    expected, kept, pinned = slow_reference(model, 0, batch["pixel_values"], 40, {2: keep}, share)
    pipeline = vtoken.Pipeline([MustDropMerge(keep=40, key_share=share), MustDropFilter(site="llm(2)", keep=keep)])
    with vtoken.wrapped(model, pipeline), torch.no_grad():
        got = model(**batch).logits
        assert model.vtoken.stats.kept["llm(2)"][0].tolist() == kept[2]
    pinned_slots = [s for s, p in enumerate(pinned) if p]
    survivors = set(kept[2])
    assert survivors >= set(pinned_slots) if len(pinned_slots) <= keep else survivors <= set(pinned_slots)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def deep_model():
    """16 decoder layers: the named method's sites land at llm(2), llm(4), llm(6), llm(8)."""
    return tiny_llava("eager", seed=3, text_layers=16)


NAMED_PLAN = {2: 24, 4: 20, 6: 18, 8: 16}  # keep=16: the merge keeps 40, the filters 24, 20, 18, 16


def test_the_named_method_equals_the_slow_reference_and_keeps_every_pin(deep_model):
    batch = llava_batch([PROMPTS[2]], seed=4)
    expected, kept, pinned = slow_reference(deep_model, 2, batch["pixel_values"], 40, NAMED_PLAN)
    with vtoken.wrapped(deep_model, "mustdrop", keep=16), torch.no_grad():
        got = deep_model(**batch).logits
        stats = deep_model.vtoken.stats
        assert [str(s.site) for s in deep_model.vtoken.pipeline.stages] == \
            ["projector", "llm(2)", "llm(4)", "llm(6)", "llm(8)", "decode"]
        survivors = list(range(40))
        for site in NAMED_PLAN:
            assert stats.kept[f"llm({site})"][0].tolist() == kept[site], f"llm({site})"
            survivors = [survivors[j] for j in kept[site]]
    assert sum(pinned) == 4 and set(survivors) >= {s for s, p in enumerate(pinned) if p}
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_named_method_in_a_padded_batch_equals_each_row_alone(deep_model):
    batch = llava_batch(PROMPTS, seed=4)
    with vtoken.wrapped(deep_model, "mustdrop", keep=16), torch.no_grad():
        logits = deep_model(**batch).logits
        together = deep_model.vtoken.stats.kept
    for row in range(len(PROMPTS)):
        expected, kept, _ = slow_reference(deep_model, row, batch["pixel_values"][row: row + 1], 40, NAMED_PLAN)
        for site in NAMED_PLAN:
            assert together[f"llm({site})"][row].tolist() == kept[site], f"row {row} at llm({site})"
        torch.testing.assert_close(logits[row, -1], expected[0, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=False, num_beams=2, num_return_sequences=2)])
def test_the_named_method_generates_as_recomputed(deep_model, options):
    batch = llava_batch(PROMPTS[:2], seed=4)
    with vtoken.wrapped(deep_model, "mustdrop", keep=16):
        cached = deep_model.generate(**batch, max_new_tokens=4, **options)
        recomputed = deep_model.generate(**batch, max_new_tokens=4, use_cache=False, **options)
    assert torch.equal(cached, recomputed)


def test_the_named_method_passes_the_contract_clauses():
    """Keep-all (merge and filters at 1.0) equals the unwrapped logits, unwrap restores, cached generation
    (greedy, beams, several sequences) equals recomputation, padded batches, threads, deepcopy, pickle. On
    the contract's 4-layer decoder the four filter sites collapse to llm(1) and llm(2)."""
    contract.run_clauses_without_labels(CASES_BY_NAME["llava"],
                                        SiteStage("mustdrop", "mustdrop", dict(keep=8), dict(keep=1.0)))


@pytest.mark.parametrize("site", ["projector", "decode"])
def test_wrap_refuses_the_pinned_signal_where_no_pins_arrive(model, site):
    with pytest.raises(ValueError, match=rf"pin_probe at {site} need\(s\) the signal\(s\) 'pinned'"):
        vtoken.wrap(model, vtoken.Pipeline([PinProbe(site=site, keep=1.0 if site == "decode" else 100)]))
    assert not hasattr(model, "vtoken")


def test_pins_follow_take_apply_and_a_merge():
    """take gathers the pins; a merge pins a merged token when any member was; a stage's own pins add up;
    two stages sharing a site each bring their own pins to the site's Keep."""
    pins = torch.tensor([[False, True, False, False, True, False]])
    tokens = TokenSet.from_features(torch.randn(1, 6, 4), pinned=pins)
    assert tokens.take(torch.tensor([[1, 2, 4]])).pinned.tolist() == [[True, False, True]]
    merge = Keep(indices=torch.tensor([[0, 3, 5]]), features=torch.randn(1, 3, 4),
                 assign=torch.tensor([[0, 0, 1, 1, 2, -1]]), pinned=torch.tensor([[False, False, True]]))
    assert tokens.apply(merge).pinned.tolist() == [[True, False, True]]

    @dataclass
    class PinFirst(Stage):
        name: ClassVar[str] = "pin_first"

        def select(self, tokens: TokenSet, k: int) -> Keep:
            every = torch.arange(k).expand(tokens.batch_size, k)
            return Keep(indices=every, pinned=torch.ones(1, k, dtype=torch.bool))

    pipeline = vtoken.Pipeline([PinFirst(keep=2), vtoken.stages.ClsAttn(keep=2)])
    fresh = TokenSet.from_features(torch.randn(1, 6, 4), signals={"cls_attn": torch.arange(6.0)[None]})
    after, keep = pipeline.run(pipeline.sites[0], fresh)
    assert keep.indices.tolist() == [[0, 1, 4, 5]] and keep.pinned.tolist() == [[True, True, False, False]]
    assert after.pinned.tolist() == [[True, True, False, False]]


def test_a_key_share_outside_0_1_is_refused(model):
    with pytest.raises(ValueError, match=r"key_share=1.5; accepted: a float in \[0, 1\]"):
        vtoken.wrap(model, "mustdrop_merge", keep=40, key_share=1.5)
    assert not hasattr(model, "vtoken")
