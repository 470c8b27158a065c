"""``vtoken bench``'s paired ratios and spread flag on made-up timings, and ``vtoken bench --scaling`` on
tiny random models: its files, columns and command line. No timing assertions."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager

import pytest
import torch

from tiny_models import tiny_llava, tiny_qwen
from vtoken.eval import bench
from vtoken.eval.bench.report import flagged, format_table, spread_footer
from vtoken.eval.bench.timing import time_runs


# --- paired ratios and the spread flag ---------------------------------------------------------------
def test_paired_ratio_is_the_median_of_per_pair_ratios():
    # the machine slows down during the 2nd pair and again during the 3rd method run: each pair still
    # says 2x, the ratio of the two medians would say 0.22x
    baseline, method = [10.0, 100.0, 11.0], [5.0, 50.0, 100.0]
    assert bench.paired_ratio(baseline, method) == 2.0
    assert round(sorted(baseline)[1] / sorted(method)[1], 2) == 0.22
    assert bench.paired_ratio([4.0, 9.0], [2.0, 3.0]) == 2.5  # even count: the mean of the middle two
    assert bench.paired_ratio([], []) is None


def test_spread_is_the_largest_max_over_min_and_flags_past_the_threshold():
    assert bench.spread([100.0, 110.0, 105.0], [50.0, 90.0]) == 1.8
    assert bench.spread([7.0]) == 1.0 and bench.spread() is None
    rows = [{"method": "a", "spread": 1.2}, {"method": "b", "spread": 1.8}, {"method": "none", "spread": None}]
    assert [flagged(r, 1.5) for r in rows] == [False, True, False]
    footer = spread_footer(rows, 1.5)
    assert len(footer) == 2 and footer[0].startswith("! 1 configuration(s)") and "rerun" in footer[1]
    assert spread_footer(rows, 2.0) == ["all timed runs within 2x (max/min) of each other, and every speed-up's "
                                        "~90 % interval within 1.1x"]


def test_median_interval_takes_the_order_statistics_that_cover_the_median():
    from math import comb

    def coverage(n, r):  # P(x(r) <= median <= x(n-r+1)) for n independent pairs
        return 1 - 2 * sum(comb(n, i) for i in range(r)) / 2 ** n

    ratios = [1.0 + i / 100 for i in (5, 0, 9, 3, 7, 1, 10, 2, 8, 4, 6)]  # 11 pairs, ratios 1.00..1.10
    lo, hi = bench.median_interval(ratios, [1.0] * 11)
    # the 3rd and 9th of 11 cover the median with 93.5 %; the 4th and 8th would cover only 77.3 %
    assert (lo, hi) == (1.02, 1.08) and coverage(11, 3) >= 0.9 > coverage(11, 4)
    assert bench.median_interval([2.0, 4.0, 3.0, 5.0, 1.0], [1.0] * 5) == (1.0, 5.0)  # 5 pairs: min, max
    assert bench.median_interval([2.0], [1.0]) is None


def test_a_row_whose_speedup_median_is_uncertain_is_flagged_for_a_rerun():
    tight = {"method": "a", "spread": 1.2, "speedup_lo": 1.50, "speedup_hi": 1.60}
    loose = {"method": "b", "spread": 1.2, "speedup_lo": 1.40, "speedup_hi": 1.70}
    assert [flagged(r, 1.5) for r in (tight, loose)] == [False, True]
    footer = spread_footer([tight, loose], 1.5)
    assert footer[0].startswith("! 1 configuration(s) whose speed-up median is uncertain") and "rerun" in footer[1]


def test_timed_jobs_alternate_and_their_setup_is_not_timed():
    calls = []

    @contextmanager
    def unwrapped():
        calls.append("unwrap")
        yield
        calls.append("wrap")

    jobs = {"method": lambda: calls.append("method"), "baseline": lambda: calls.append("baseline")}
    times = time_runs(jobs, runs=2, warmup=1, device=torch.device("cpu"), warmed=["method"],
                      around={"baseline": unwrapped})
    assert calls == ["unwrap", "baseline", "wrap"] + ["method", "unwrap", "baseline", "wrap"] * 2
    assert [len(t) for t in times.values()] == [2, 2]


def bench_row(method: str, spread: float | None) -> dict:
    row = {column: None for column in bench.CSV_COLUMNS}
    row.update(method=method, keep=64, visual_tokens=64, prefill_ms=10.0, prefill_min_ms=9.0, prefill_max_ms=11.0,
               spread=spread, speedup=2.0, overhead_pct=0.5, kv_cache_bytes=0, gflops_vision=1.0,
               gflops_projector=1.0, gflops_llm=1.0)
    return row


def test_the_table_marks_a_noisy_configuration_and_prints_the_machine():
    machine = {"device": "CPU (Test)", "threads": 2, "torch": "9.9", "transformers": "8.8", "python": "3.x"}
    result = {"model": "m", "device": "CPU (Test)", "dtype": "fp32", "threads": 2, "runs": 5, "warmup": 1,
              "text_tokens": 48, "machine": machine, "max_spread": 1.5,
              "rows": [bench_row("none", 1.1), bench_row("dart", 1.2), bench_row("kcenter", 2.5)]}
    table = format_table(result)
    assert "machine: CPU (Test) | threads 2 | torch 9.9 | transformers 8.8" in table
    lines = table.splitlines()
    assert any(line.startswith("kcenter !") for line in lines)
    assert not any(line.startswith("dart !") for line in lines)
    assert lines[-2].startswith("! 1 configuration(s)") and "rerun" in lines[-1]


# --- --scaling ---------------------------------------------------------------------------------------
PROMISED = ("speedup", "oracle_speedup", "measured_over_oracle", "scoring_ms", "select_ms", "overhead_pct",
            "peak_mem_mb", "kv_cache_bytes", "generate_tok_s", "spread", "baseline_ms")


def test_cli_scaling_on_a_tiny_model_writes_table_json_csv_and_plot(tmp_path, capsys):
    from vtoken.cli import main

    tiny_qwen("2.5").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = main(["bench", "--scaling", "--model", str(tmp_path / "model"), "--methods",
                 "kcenter,kcenter@vision(1),dart@llm(2)",
                 "--scaling-tokens", "12,24", "--scaling-batches", "1,2", "--runs", "1", "--warmup", "0",
                 "--decode-tokens", "1", "--text-tokens", "8", "--device", "cpu", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"scaling.json", "scaling.csv", "scaling.png"}
    assert "machine: CPU" in printed and "gen tok/s" in printed and "sel %" in printed
    assert "vtoken bench --scaling --model" in printed and "--scaling-tokens 12,24" in printed
    with open(out / "scaling.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == bench.SCALING_COLUMNS
        rows = list(reader)
    points = [(r["visual_tokens_per_image"], r["batch"], r["method"]) for r in rows]
    methods = ("none", "kcenter", "kcenter@vision(1)", "dart@llm(2)")
    assert points == [(t, b, m) for b in ("1", "2") for t in ("12", "24") for m in methods]
    saved = json.loads((out / "scaling.json").read_text())
    assert saved["tokens"] == [12, 24] and saved["batches"] == [1, 2] and saved["keep"] == [0.25]
    assert {"cpu", "threads", "torch", "transformers", "device"} <= set(saved["machine"])
    for row in saved["rows"]:
        if row["method"] == "none":
            assert row["peak_mem_mb"] > 0 and row["kv_cache_bytes"] > 0 and row["generate_tok_s"] > 0
            continue
        # kcenter keeps 1/4 before the LLM or inside the tower (which has its oracle too); dart@llm(2) at layer 2
        full = row["visual_tokens_per_image"]
        assert row["visual_tokens"] == (full if row["method"] == "dart@llm(2)" else full // 4)
        for column in PROMISED:
            assert row[column] is not None, (row["method"], column)
    kv = {(r["visual_tokens_per_image"], r["batch"], r["method"]): r["kv_cache_bytes"] for r in saved["rows"]}
    assert kv[(24, 1, "none")] > kv[(12, 1, "none")] and kv[(12, 2, "none")] == 2 * kv[(12, 1, "none")]
    assert kv[(24, 1, "kcenter")] < kv[(24, 1, "none")]
    flops = {(r["visual_tokens_per_image"], r["batch"], r["method"]): r["gflops_total"] for r in saved["rows"]}
    # the same kept count, but the tower's later blocks see only the kept tokens when pruned inside it
    assert flops[(24, 1, "kcenter@vision(1)")] < flops[(24, 1, "kcenter")] < flops[(24, 1, "none")]


def test_scaling_refuses_a_family_that_cannot_set_its_token_count():
    with pytest.raises(ValueError, match="give 144 visual tokens"):
        bench.run_scaling(tiny_llava(), tokens=[64], batches=[1], methods=["kcenter"], runs=1, out=None,
                          progress=False)


def test_scaling_arguments_parse_and_take_the_device_defaults():
    from vtoken.cli import build_parser
    from vtoken.eval.bench.cli import command_line, resolve_defaults

    args = resolve_defaults(build_parser().parse_args(["bench", "--scaling", "--device", "cpu"]))
    assert (args.arch, args.random_init, args.depth_scale) == ("qwen2.5-vl-7b", True, 1 / 28)
    assert (args.methods, args.budgets, args.scaling_tokens, args.scaling_batches) == (
        "kcenter,dart", "0.25", "64,144,576", "1,2")
    assert (args.runs, args.warmup, args.generate_runs, args.decode_tokens, args.max_spread) == (3, 0, 1, 4, 1.5)
    line = command_line(args)
    assert line.startswith("vtoken bench --scaling --arch qwen2.5-vl-7b --random-init --depth-scale 1/28")
    gpu = build_parser().parse_args(["bench", "--scaling", "--scaling-batches", "2", "--max-spread", "2"])
    gpu.device = "cuda"  # as parsed on a machine with CUDA
    resolve_defaults(gpu)
    assert (gpu.scaling_tokens, gpu.scaling_batches, gpu.depth_scale) == ("576,2880,5000,16000", "2", 0.25)
    assert gpu.methods == "kcenter,kcenter@vision(3),dart@llm(2)" and gpu.max_spread == 2.0
    plain = resolve_defaults(build_parser().parse_args(["bench"]))
    assert (plain.runs, plain.generate_runs, plain.depth_scale, plain.scaling) == (11, 3, 1.0, False)


@pytest.mark.parametrize("arguments, named", [
    (["--max-spread", "1"], "bad factor '1'"),
    (["--scaling-tokens", "576,0"], "bad list '576,0'"),
    (["--scaling-batches", "x"], "bad list 'x'"),
    (["--generate-runs", "0"], "--generate-runs: 0"),
])
def test_bad_scaling_arguments_are_refused_in_one_line(arguments, named, capsys):
    from vtoken.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["bench", "--scaling", "--model", "/no/such/model", "--quiet", *arguments])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("vtoken bench: error: argument ") and named in error
