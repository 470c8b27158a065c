"""``vtoken bench`` and ``vtoken.flops`` on a tiny random LLaVA: FLOPs against a hand count, the oracle's
inputs and outputs against the wrapped model's, and the files the bench writes. No timing assertions."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import vtoken
from tiny_models import TOKENS_PER_IMAGE, llava_batch, prompt_ids, tiny_llava, tiny_llava_next, tiny_qwen
from vtoken import flops
from vtoken.eval import bench
from vtoken.eval.archs import arch_config
from vtoken.integrations.base import Integration


def one_prompt():
    return llava_batch([prompt_ids([20, 21], 1, [30, 31, 32])])


def arch_dims(name: str, depth_scale: float) -> flops.ModelDims:
    """A bench architecture's dimensions, from its model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(arch_config(name, depth_scale))
    return flops.dims_from_model(model)


# --- FLOPs ----------------------------------------------------------------------------------------
def test_flops_match_a_hand_count_for_the_tiny_config():
    dims = flops.dims_from_model(tiny_llava())
    text, patches = 7, TOKENS_PER_IMAGE  # 144 patches, +1 [CLS] in the tower
    split = flops.prefill_flops(dims, patches=patches, images=1, text_tokens=text,
                                layer_visual_tokens=[patches] * 4)
    # CLIP: patch conv (3*14*14 -> 32); 3 blocks over 145 tokens: q,k,v,o 32x32, attention, MLP 32->64->32
    vision = 2 * 144 * 588 * 32 + 3 * (2 * 145 * 32 * 128 + 4 * 145 * 145 * 32 + 2 * 145 * 32 * 64 * 2)
    projector = 2 * 144 * (32 * 64 + 64 * 64)  # 2-layer MLP 32 -> 64 -> 64
    length = text + patches  # Llama: q,o 64x64, k,v 64x32 (2 of 4 heads), attention, gated MLP 64->128
    layer = 2 * length * 64 * (64 + 64 + 32 + 32) + 4 * length * length * 64 + 3 * 2 * length * 64 * 128
    llm = 4 * layer + 2 * 64 * 128  # + LM head on the last position
    assert split == {"vision": vision, "projector": projector, "llm": llm, "total": vision + projector + llm}


def test_llm_site_pruning_lowers_llm_flops_by_the_shorter_deep_layers():
    model = tiny_llava()
    dims = flops.dims_from_model(model)
    with vtoken.wrapped(model, "dart", keep=64, site="llm(2)"), torch.no_grad():
        model(**one_prompt())
        per_layer = list(model.vtoken.stats.llm_layer_tokens)
    assert per_layer == flops.layer_visual_tokens(4, TOKENS_PER_IMAGE, 64, site_layer=2) == [144, 144, 64, 64]
    text = 7
    full = flops.prefill_flops(dims, patches=144, images=1, text_tokens=text, layer_visual_tokens=[144] * 4)
    pruned = flops.prefill_flops(dims, patches=144, images=1, text_tokens=text, layer_visual_tokens=per_layer)
    saved = 2 * (flops.llm_layer_flops(dims.llm, text + 144) - flops.llm_layer_flops(dims.llm, text + 64))
    assert full["llm"] - pruned["llm"] == saved > 0
    assert (pruned["vision"], pruned["projector"]) == (full["vision"], full["projector"])
    before_llm = flops.prefill_flops(dims, patches=144, images=1, text_tokens=text, layer_visual_tokens=[64] * 4)
    assert before_llm["llm"] < pruned["llm"]


def test_kv_cache_bytes_formula_matches_the_cache():
    model = tiny_llava()
    dims = flops.dims_from_model(model)
    with vtoken.wrapped(model, "dart", keep=40, site="llm(2)"), torch.no_grad():
        out = model(**one_prompt(), use_cache=True, logits_to_keep=1)
        per_layer = model.vtoken.stats.llm_layer_tokens
    assert bench.cache_bytes(out.past_key_values) == flops.kv_cache_bytes(dims.llm, 7, per_layer, 4)


def test_scaled_bench_architecture_keeps_widths_and_the_vision_share():
    config = arch_config("llava-1.5-7b", depth_scale=1 / 8)
    assert (config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers) == (3, 4)
    assert (config.vision_config.hidden_size, config.text_config.hidden_size) == (1024, 4096)
    assert (config.text_config.num_attention_heads, config.vision_config.num_attention_heads) == (32, 16)
    shares = []
    for scale in (1.0, 1 / 8):
        dims = arch_dims("llava-1.5-7b", scale)
        split = flops.prefill_flops(dims, patches=576, images=1, text_tokens=48,
                                    layer_visual_tokens=[576] * dims.llm.layers)
        shares.append(split["vision"] / split["total"])
    assert abs(shares[0] - shares[1]) < 0.01
    qwen = arch_config("qwen2.5-vl-7b", depth_scale=1 / 8)
    assert (qwen.vision_config.depth, qwen.text_config.num_hidden_layers) == (4, 4)
    assert (qwen.text_config.hidden_size, qwen.text_config.num_key_value_heads) == (3584, 4)


# --- what the bench asks a family -------------------------------------------------------------------
def test_integrations_give_inputs_counts_grids_and_the_vision_part():
    qwen = Integration.for_model(tiny_qwen("2.5"))
    inputs = qwen.synthetic_inputs(10, 2, 0, "cpu", torch.float32, visual_tokens=12)
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]] * 2 and inputs["input_ids"].shape == (2, 10 + 12)
    assert qwen.visual_counts(inputs) == flops.VisualCounts(images=1, patches=48, tokens=12)
    assert qwen.unit_grids(inputs) == [(3, 4), (3, 4)] and qwen.tokens_per_image() is None
    assert [f.shape[0] for f in qwen.run_vision(inputs)] == [12, 12]
    default = qwen.synthetic_inputs(10, 1, 0, "cpu", torch.float32)
    assert default["image_grid_thw"].tolist() == [[1, 48, 48]]  # 576 tokens, as LLaVA-1.5's image gives

    llava = Integration.for_model(tiny_llava())
    inputs = llava.synthetic_inputs(8, 1, 0, "cpu", torch.float32)
    assert llava.visual_counts(inputs) == flops.VisualCounts(images=1, patches=144, tokens=144)
    assert llava.unit_grids(inputs) == [(12, 12)] and llava.tokens_per_image() == 144
    with pytest.raises(ValueError, match="give 144 visual tokens"):
        llava.synthetic_inputs(8, 1, 0, "cpu", torch.float32, visual_tokens=64)
    assert [tuple(f.shape) for f in llava.run_vision(inputs)] == [(144, 64)]


def test_a_family_without_bench_inputs_is_refused_before_any_timing():
    model = tiny_llava_next()
    family = Integration.for_model(model)
    assert family.model_dims().vision.layers == model.config.vision_config.num_hidden_layers
    assert family.tokens_per_image() is None
    with pytest.raises(NotImplementedError, match="llava_next.*AnyRes"):
        bench.run_bench(model, methods=["kcenter"], budgets=[8], runs=1, warmup=0, decode_tokens=0, out=None,
                        progress=False)


def test_bench_runs_a_qwen_model_through_its_integration():
    result = bench.run_bench(tiny_qwen("2"), methods=["kcenter"], budgets=[64], runs=1, warmup=0, decode_tokens=1,
                             text_tokens=8, out=None, progress=False)
    assert result["model_type"] == "qwen2_vl" and result["visual_tokens_per_image"] == 576
    assert result["text_tokens"] == 8
    base, kcenter = result["rows"]
    assert (base["visual_tokens"], kcenter["visual_tokens"]) == (576, 64)
    assert kcenter["gflops_llm"] < base["gflops_llm"] and kcenter["gflops_vision"] == base["gflops_vision"]


# --- the oracle -----------------------------------------------------------------------------------
def test_oracle_inputs_equal_what_the_wrapped_model_fed_its_language_model():
    model = tiny_llava()
    batch = one_prompt()
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    with vtoken.wrapped(model, "kcenter", keep=36), torch.no_grad():
        captured = bench.oracle_inputs(model, batch)
        expected = model(**batch, use_cache=True, logits_to_keep=1).logits
    handle.remove()
    assert captured["inputs_embeds"].shape[1] == batch["input_ids"].shape[1] - TOKENS_PER_IMAGE + 36
    for key in ("inputs_embeds", "attention_mask", "position_ids"):
        a, b = captured.get(key), seen[0].get(key)
        assert (a is None and b is None) or torch.equal(a, b), key
    # the oracle's language model + LM head on those inputs computes the wrapped model's prefill logits
    logits = bench.run_language_model(model, model.model.language_model, captured)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_llm_site_oracle_replays_the_selection_exactly():
    model = tiny_llava()
    batch = one_prompt()
    with vtoken.wrapped(model, "dart", keep=48, site="llm(2)"), torch.no_grad():
        captured = bench.oracle_inputs(model, batch)
        expected = model(**batch, use_cache=True, logits_to_keep=1).logits
        state = model.vtoken
        kept = {site: list(value) for site, value in state.stats.kept.items()}
        family = Integration.for_model(model)
        oracle = bench.llm_oracle(family, batch, captured, state.integration.last_call.parts["decoder"], kept,
                                  [vtoken.Site("llm", 2)])
        try:
            got = oracle["llm"]()
        finally:
            oracle["remove"]()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vision_site_oracle_replays_the_selection_exactly(family):
    """The vision(L) oracle's tower, wrapped with the fixed replay, gives the method's vision features
    (the tokens kept at block L and everything after) without scoring anything."""
    import contextlib

    model = tiny_llava() if family == "llava" else tiny_qwen("2")
    batch = one_prompt() if family == "llava" else Integration.for_model(model).synthetic_inputs(
        8, 1, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    layer = 0 if family == "llava" else 1  # the tiny LLaVA tower reads block 1: vision(0) is its only site
    method = f"cls_attn@vision({layer})" if family == "llava" else f"kcenter@vision({layer})"
    with vtoken.wrapped(model, method, keep=16), torch.no_grad():
        captured = bench.oracle_inputs(model, batch)
        family_ = model.vtoken.integration
        expected = family_.run_vision(batch)
        kept = {site: list(value) for site, value in model.vtoken.stats.kept.items()}
        assert kept and all(len(value) for value in kept.values())
        oracle = bench.vision_oracle(family_, batch, captured, kept, [vtoken.Site("vision", layer)],
                                     contextlib.nullcontext)
        vtoken.unwrap(model)
        with oracle["around_vision"]():
            assert model.vtoken.pipeline.stages[0].name == "fixed"
            got = oracle["vision"]()
        vtoken.wrap(model, method, keep=16)
    expected, got = torch.cat(list(expected)), torch.cat(list(got))
    assert got.shape == expected.shape and got.shape[0] == 16
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_vision_site_flops_count_each_block_at_the_tokens_it_sees():
    from vtoken.stats import StageRecord

    dims = flops.ModelDims(flops.VisionDims(layers=4, hidden=8, intermediate=16, patch_dim=12, prefix=1),
                           flops.ProjectorDims(in_dim=8, hidden=8, out_dim=8), None)
    record = StageRecord(stage="x", site="vision(1)", tokens_in=36, tokens_out=9)
    assert bench.vision_layer_tokens(dims, 36, [record]) == [37, 37, 10, 10]
    later = StageRecord(stage="y", site="vision(-1)", tokens_in=9, tokens_out=4)
    assert bench.vision_layer_tokens(dims, 36, [record, later]) == [37, 37, 10, 10]
    assert bench.vision_layer_tokens(dims, 36, []) is None


def test_bench_gives_vision_sites_an_oracle_and_fewer_vision_flops():
    result = bench.run_bench(tiny_llava(), methods=["cls_attn@vision(0)"], budgets=[16], runs=1, warmup=0,
                             decode_tokens=0, out=None, progress=False)
    base, pruned = result["rows"]
    assert pruned["oracle_kind"] == "fixed selection at vision(0)" and pruned["oracle_ms"] is not None
    assert pruned["measured_over_oracle"] is not None
    assert pruned["gflops_vision"] < base["gflops_vision"]


# --- the bench end to end -------------------------------------------------------------------------
def test_bench_writes_its_files_with_the_expected_columns(tmp_path):
    result = bench.run_bench(tiny_llava(), methods=["kcenter", "dart@llm(2)"], budgets=[16, 36], runs=1,
                             warmup=0, decode_tokens=2, out=tmp_path, progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"results.json", "results.csv", "latency_vs_tokens.png", "memory_vs_tokens.png"} <= names
    with open(tmp_path / "results.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == bench.CSV_COLUMNS
        rows = list(reader)
    assert [(r["method"], r["keep"]) for r in rows] == [
        ("none", "144"), ("kcenter", "16"), ("kcenter", "36"), ("dart@llm(2)", "16"), ("dart@llm(2)", "36")]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["command"].startswith("vtoken bench") and len(saved["rows"]) == 5
    kcenter = result["rows"][1]
    assert kcenter["visual_tokens"] == 16 and kcenter["oracle_kind"] == "shrunk LLM input"
    assert kcenter["oracle_ms"] is not None and kcenter["select_ms"] > 0 and kcenter["kv_cache_bytes"] > 0
    deep = result["rows"][3]
    assert (deep["visual_tokens"], deep["visual_tokens_last"]) == (144, 16)
    assert deep["gflops_vision"] == kcenter["gflops_vision"] and deep["gflops_llm"] > kcenter["gflops_llm"]
    for row in result["rows"]:
        assert row["gflops_total"] == pytest.approx(
            row["gflops_vision"] + row["gflops_projector"] + row["gflops_llm"], abs=2e-3)
        assert row["decode_tok_s"] > 0 and row["peak_mem_mb"] > 0


def test_cli_runs_a_saved_model_folder(tmp_path, capsys):
    from vtoken.cli import main

    tiny_llava().save_pretrained(tmp_path / "model")
    code = main(["bench", "--model", str(tmp_path / "model"), "--methods", "pool,random", "--budgets", "16",
                 "--runs", "1", "--warmup", "0", "--decode-tokens", "1", "--out", str(tmp_path / "out"),
                 "--no-plots", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "rerun with:" in printed and f"--model {tmp_path / 'model'}" in printed
    assert (tmp_path / "out" / "results.csv").exists()


def test_cli_refuses_an_architecture_without_random_init(capsys):
    from vtoken.cli import main

    assert main(["bench", "--arch", "llava-1.5-7b", "--quiet"]) == 2
    assert "--random-init" in capsys.readouterr().err


def test_method_lists_split_outside_parentheses():
    assert bench.split_list("dart@llm(2),pool, cls_attn+kcenter") == ["dart@llm(2)", "pool", "cls_attn+kcenter"]
    spec = bench.MethodSpec.parse("dart@llm(2)")
    assert (spec.method, spec.options) == ("dart@llm(2)", {})
    assert [str(s.site) for s in vtoken.build_pipeline(spec.method, 8, {}).stages] == ["llm(2)"]


@pytest.mark.parametrize("arguments, named, accepted", [
    (["--methods", "foo"], "unknown method 'foo'", "registered methods: "),
    (["--methods", "pool,dart@llm(x)"], "cannot parse site 'llm(x)'", "'llm(K)'"),
    (["--methods", "pixel_shuffle@llm(2)"], "cannot run at llm(2)", "accepted sites"),
    (["--budgets", "0"], "bad budget '0'", "an int >= 1"),
    (["--budgets", "64,abc"], "bad budget 'abc'", "(0, 1]"),
    (["--runs", "0"], "--runs: 0", "int >= 1"),
    (["--text-tokens", "1"], "--text-tokens: 1", "int >= 2"),
    (["--depth-scale", "1/0"], "bad depth scale '1/0'", "(0, 1]"),
    (["--device", "nodevice"], "bad device 'nodevice'", "cpu, cuda"),
])
def test_cli_refuses_bad_arguments_in_one_line_before_loading(arguments, named, accepted, capsys):
    from vtoken.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["bench", "--model", "/no/such/model", "--quiet", *arguments])  # never loaded
    assert stop.value.code == 2
    printed = capsys.readouterr()
    error = printed.err.strip().splitlines()[-1]
    assert error.startswith("vtoken bench: error: argument ") and named in error and accepted in error
    assert "Traceback" not in printed.err and printed.out == ""


def test_cli_keeps_valid_method_and_budget_lists_as_given():
    from vtoken.cli import build_parser

    args = build_parser().parse_args(["bench", "--methods", "dart@llm(2),cls_attn@vision(1)+kcenter",
                                      "--budgets", "64,0.5", "--depth-scale", "1/8"])
    assert args.methods == "dart@llm(2),cls_attn@vision(1)+kcenter" and args.budgets == "64,0.5"
    assert args.depth_scale == 0.125


def test_qwen3_vl_8b_architecture_keeps_widths_and_its_deepstack_taps():
    from vtoken.eval.archs import arch_config

    full = arch_config("qwen3-vl-8b")
    text, vision = full.text_config, full.vision_config
    assert (text.hidden_size, text.num_hidden_layers, vision.depth) == (4096, 36, 27)
    assert full.vision_config.deepstack_visual_indexes == [8, 16, 24]
    for scale in (1 / 2, 1 / 8, 1 / 27):
        config = arch_config("qwen3-vl-8b", scale)
        taps = config.vision_config.deepstack_visual_indexes
        assert taps == sorted(set(taps)) and all(0 <= tap < config.vision_config.depth for tap in taps)
        assert config.text_config.num_hidden_layers >= len(taps)
        assert config.text_config.hidden_size == 4096 and config.vision_config.hidden_size == 1152


def test_bench_reports_a_decode_sites_cache_and_decode_speed_against_the_unpruned_model():
    result = bench.run_bench(tiny_llava(), methods=["decode_topk@decode(2)"], budgets=[8], runs=1, warmup=0,
                             decode_tokens=4, out=None, progress=False)
    base, row = result["rows"]
    assert row["oracle_kind"].startswith("n/a (decode site") and row["visual_tokens"] == base["visual_tokens"]
    # the prefill's cache is the same; after generate() the stage has freed all but 8 visual entries per layer
    assert row["kv_cache_bytes"] == base["kv_cache_bytes"]
    assert row["base_kv_after_decode_bytes"] > row["kv_after_decode_bytes"] > 0
    config = tiny_llava().config.text_config  # K and V per layer and entry, fp32
    per_entry = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size //
                                                                            config.num_attention_heads) * 4
    freed = row["base_kv_after_decode_bytes"] - row["kv_after_decode_bytes"]
    assert freed == (TOKENS_PER_IMAGE - 8) * per_entry
    assert row["decode_tok_s"] > 0 and row["base_decode_tok_s"] > 0 and row["decode_speedup"] > 0
    assert "decode site, decode_topk@decode(2) keep 8" in bench.format_table(result)
