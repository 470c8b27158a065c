"""Qwen3.5's hybrid decoder at llm(K): layers < K see every token, layers >= K the kept ones, for its
linear-attention (Gated DeltaNet) and full-attention layers and every cache they fill."""

from __future__ import annotations

import inspect

import pytest
import torch

import vtoken
from contract_models import qwen3_inputs
from integrations_helpers import lm_inputs
from tiny_models import Q_IMAGE, Q_VIDEO, qwen3_batch, tiny_qwen3_5

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3_5MoeForConditionalGeneration"):
    pytest.skip("Qwen3.5 needs a transformers with Qwen3_5ForConditionalGeneration", allow_module_level=True)

# tiny_qwen3_5's layers: linear, full, linear, full attention
MOE = [False, True]
ROWS = [[20, ("image", 4, 4), 30, 31], [21, ("image", 8, 4), 22, ("video", 2, 4, 4), 32]]
# (method, site): FastV reads layer 1 (full attention); kcenter at llm(3) follows a linear-attention layer
SITES = [("fastv", 2), ("kcenter", 3), ("dart", 2)]


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]


def _hand_pruned(model, row_batch, site, kept):
    """The reference for one unpadded row: the unwrapped model's own language-model inputs, run layer by layer
    with a fresh cache; at layer ``site`` the sequence becomes the text and the kept visual positions
    (``kept``: indices among the row's visual positions), with their rotary table and positions. Returns the
    logits of the kept positions and the cache every layer filled."""
    lm = model.model.language_model
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**row_batch)
    handle.remove()
    embeds, positions = seen[0]["inputs_embeds"], seen[0]["position_ids"]
    text_positions, positions = (positions[0], positions[1:]) if positions.shape[0] == 4 else (None, positions)
    rotary = lm.rotary_emb(embeds, positions)
    ids = row_batch["input_ids"][0]
    visual = ((ids == Q_IMAGE) | (ids == Q_VIDEO)).nonzero()[:, 0]
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept]] = True
    cache = transformers.DynamicCache(config=lm.config)
    cache_name = "cache" if "cache" in inspect.signature(lm.layers[0].forward).parameters else "past_key_values"
    hidden = embeds
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            if index == site:
                hidden = hidden[:, keep]
                rotary = tuple(table[:, keep] for table in rotary)
                text_positions = None if text_positions is None else text_positions[:, keep]
            mask = _causal(hidden.shape[1]) if lm.config.layer_types[index] == "full_attention" else None
            hidden = layer(hidden, position_embeddings=rotary, attention_mask=mask, position_ids=text_positions,
                           use_cache=True, **{cache_name: cache})
        logits = model.lm_head(lm.norm(hidden))
    return logits, cache


def _cache_tensors(cache, layer_types):
    """Per layer: its keys and values (full attention) or its convolution and recurrent states (linear)."""
    out = []
    for layer, kind in zip(cache.layers, layer_types):
        if kind == "full_attention":
            out.append((layer.keys, layer.values))
        else:
            out.append((layer.conv_states[0], layer.recurrent_states[0]))
    return out


@pytest.mark.parametrize("moe", MOE)
@pytest.mark.parametrize("method,site", SITES)
def test_llm_site_equals_hand_pruned_layers_and_caches(moe, method, site):
    """keep=3 per image or clip at llm(K), each row alone: the logits and every layer's cache (keys and
    values of the full-attention layers, convolution and recurrent states of the linear-attention ones)
    equal a forward in which layers < K ran over every token and layers >= K over the kept ones."""
    model = tiny_qwen3_5(moe)
    types = model.config.text_config.layer_types
    for row in range(len(ROWS)):
        single = qwen3_batch(ROWS[row:row + 1], seed=1)
        with vtoken.wrapped(model, method, keep=3, site=f"llm({site})"), torch.no_grad():
            out = model(**single, use_cache=True)
            kept = model.vtoken.stats.kept[f"llm({site})"][0]
        units = 1 if row == 0 else 2
        assert kept.numel() == 3 * units
        expected, cache = _hand_pruned(model, single, site, kept)
        torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
        lengths = [out.past_key_values.layers[i].keys.shape[-2] for i, kind in enumerate(types)
                   if kind == "full_attention"]
        full = single["input_ids"].shape[1]
        assert lengths == [full if i < site else expected.shape[1]
                           for i, kind in enumerate(types) if kind == "full_attention"]
        pairs = zip(_cache_tensors(out.past_key_values, types), _cache_tensors(cache, types))
        for index, (got, want) in enumerate(pairs):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"layer {index} ({types[index]}) cache")


def test_fastv_reads_the_gated_attention_of_layer_k_minus_1():
    """FastV at llm(2) keeps the visual tokens the last prompt token attends to most in layer 1 (a gated
    full-attention layer), averaged over heads, as the unwrapped eager model's own attention weights say."""
    model = tiny_qwen3_5(attn_implementation="eager")
    single = qwen3_batch([[21, ("image", 8, 4), 22, 23]], seed=2)
    weights = []
    handle = model.model.language_model.layers[1].self_attn.register_forward_hook(
        lambda module, args, output: weights.append(output[1]))
    with torch.no_grad():
        model(**single)
    handle.remove()
    ids = single["input_ids"][0]
    visual = ((ids == Q_IMAGE) | (ids == Q_VIDEO)).nonzero()[:, 0]
    received = weights[0][0, :, -1].mean(0)[visual]
    expected = received.topk(3).indices.sort().values
    with vtoken.wrapped(model, "fastv", keep=3, site="llm(2)"), torch.no_grad():
        model(**single)
        kept = model.vtoken.stats.kept["llm(2)"][0]
    assert kept.tolist() == expected.tolist()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method,site", SITES)
def test_padded_batch_with_dead_slots_equals_rows_alone(method, site, side):
    """Rows keep different counts (1 and 2 units), so the shorter row gets dead slots on the padding side;
    the linear-attention layers must see them as padding."""
    model = tiny_qwen3_5()
    rows = [[20, ("image", 4, 4, 1), 30, 31], [21, ("image", 8, 4, 2), 22, ("video", 2, 4, 4, 3), 32]]
    batch = qwen3_inputs(model, rows, side)
    with vtoken.wrapped(model, method, keep=3, site=f"llm({site})"), torch.no_grad():
        together = model(**batch).logits
        for row in rows:
            alone = model(**qwen3_inputs(model, [row], side)).logits
            if side == "left":
                got = together[rows.index(row), -alone.shape[1]:]
            else:
                got = together[rows.index(row), : alone.shape[1]]
            torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,site", SITES)
def test_unpadded_batch_with_dead_slots_equals_rows_alone(method, site):
    """Rows of the same length (no padding, so the model gives the linear-attention layers no mask) that keep
    different counts (1 and 2 images): the shorter row's dead slots still reach those layers as padding."""
    model = tiny_qwen3_5()
    rows = [[20, ("image", 8, 4, 1), 30, 31], [21, ("image", 4, 4, 2), ("image", 4, 4, 3)]]
    batch = qwen3_inputs(model, rows, "left")
    assert bool(batch["attention_mask"].all())
    with vtoken.wrapped(model, method, keep=3, site=f"llm({site})"), torch.no_grad():
        together = model(**batch).logits
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        for r, row in enumerate(rows):
            alone = model(**qwen3_inputs(model, [row], "left")).logits
            torch.testing.assert_close(together[r, -alone.shape[1]:], alone[0], atol=1e-5, rtol=0)
    assert together.shape[1] == alone.shape[1]  # the second row (2 images) is the longest
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method,site", SITES)
def test_cached_generate_equals_recomputation_and_keep_all(method, site):
    model = tiny_qwen3_5()
    batch = qwen3_batch(ROWS, seed=3)
    expected = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with vtoken.wrapped(model, method, keep=1.0, site=f"llm({site})"):
        assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), expected)
    with vtoken.wrapped(model, method, keep=3, site=f"llm({site})"):
        cached = model.generate(**batch, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
        beams = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=2)
        beams_uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=2, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(beams, beams_uncached)


def test_projector_and_llm_sites_together():
    """kcenter keeps 3 per unit before the language model, FastV 2 of those at llm(2)."""
    model = tiny_qwen3_5()
    batch = qwen3_batch(ROWS, seed=4)
    with vtoken.wrapped(model, "kcenter+fastv", keep=2, kcenter={"keep": 3}):
        cached = model.generate(**batch, max_new_tokens=3, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=False)
        assert model.vtoken.stats.llm_layer_tokens == [3, 3, 2, 2]
    assert torch.equal(cached, uncached)


def test_refusals_say_why():
    model = tiny_qwen3_5()
    with pytest.raises(ValueError, match=r"llm\(1\) does not exist.*first full-attention layer \(1\)"):
        vtoken.wrap(model, "kcenter", keep=3, site="llm(1)")
    with pytest.raises(ValueError, match=r"fastv at llm\(3\) read\(s\) the attention of layer 2, a linear-attention "
                       r"layer .* K in \[2\]"):
        vtoken.wrap(model, "fastv", keep=3, site="llm(3)")
    with pytest.raises(ValueError, match="has no vision site for stage cls_attn: its learned position table"):
        vtoken.wrap(model, "cls_attn", keep=3, site="vision(1)")
    with pytest.raises(ValueError, match="has no decode site for stage decode_topk: its linear-attention layers"):
        vtoken.wrap(model, "decode_topk", keep=3)
    assert not hasattr(model, "vtoken")
