"""scripts/gpu_check.sh, the parts a CPU can check: the usage error, the dry run (every step's command,
its flags and the output layout), that every command it would run is accepted by the parser of the
program it calls, and the step bookkeeping of a real run (a stand-in Python fakes the GPU programs)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = {  # step name -> its file in OUT_DIR
    "kernel_tests": "01_kernel_tests.log",
    "bench_kernels": "02_bench_kernels.log",
    "bench_llava-1.5-7b": "03_bench_llava-1.5-7b.log",
    "bench_qwen2.5-vl-7b": "04_bench_qwen2.5-vl-7b.log",
    "qwen2.5-vl-7b_1344": "05_qwen2.5-vl-7b_1344.log",
}
METHODS = "cls_attn,kcenter,dart,pool,random,fastv,dart@llm(2)"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_script(*args: str, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    # a guard against a hang, not a time check: on a busy 2-core machine the CPU-only run takes ~2 minutes
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHON=python, **env))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, dict[str, list[str]], str]:
    out = tmp_path_factory.mktemp("gpu_check") / "out dir"  # not there yet; a blank in the path
    proc = run_script("--dry-run", str(out))
    assert proc.returncode == 0, proc.stderr
    commands = {}
    for line in proc.stdout.splitlines():
        if line.startswith("+ "):
            name, command = line[2:].split(": ", 1)
            commands[name] = shlex.split(command)
    return out, commands, proc.stdout


@pytest.mark.parametrize("args", [(), ("--dry-run",), ("--bogus", "out"), ("one", "two")])
def test_usage_error(args):
    proc = run_script(*args)
    assert proc.returncode == 2
    assert "usage: scripts/gpu_check.sh [--dry-run] OUT_DIR" in proc.stderr
    assert proc.stdout == ""


def test_header_states_run_time_and_what_travels():
    text = SCRIPT.read_text()
    header = text[: text.index("set -u")]
    assert "Expected run time" in header and "8 minutes" in header
    assert "scripts/setup.sh dev" in header and "What must travel" in header
    assert "1,344 x 1,344 image" in header  # the high-resolution step says what it runs
    assert "\nset -u -o pipefail\n" in text


def test_dry_run_prints_every_step_and_runs_nothing(dry_run):
    out, commands, stdout = dry_run
    assert list(commands) == list(STEPS)
    for name, argv in commands.items():
        assert sys.executable in argv, f"{name} does not run the chosen Python: {argv}"
    assert not (out / "03_bench_llava-1.5-7b").exists()  # no bench ran
    assert "usage" not in stdout


def test_dry_run_writes_the_promised_layout(dry_run):
    out, commands, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == sorted([*STEPS.values(), "summary.txt"])
    summary = (out / "summary.txt").read_text()
    assert "dry run" in summary
    for name, file in STEPS.items():
        assert name in summary and file in summary
        first = (out / file).read_text().splitlines()[0]
        assert first.startswith("$ ") and shlex.split(first[2:]) == commands[name]


def test_kernel_tests_run_on_cuda_and_collect(dry_run):
    _, commands, _ = dry_run
    argv = commands["kernel_tests"]
    assert argv[:3] == ["env", "TRITON_INTERPRET=0", "VTOKEN_TEST_REQUIRE_CUDA=1"]
    assert argv[3:7] == [sys.executable, "-m", "pytest", "tests/kernels"]
    # The same command, collecting only: pytest accepts its arguments and finds the kernel tests.
    env = dict(os.environ, TRITON_INTERPRET="0", VTOKEN_TEST_REQUIRE_CUDA="1")
    proc = subprocess.run([*argv[3:], "--collect-only"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "test_kernel_matches_reference_exactly" in proc.stdout


def test_kernel_benchmark_arguments_parse(dry_run):
    from vtoken.eval import bench_kernels

    argv = dry_run[1]["bench_kernels"]
    assert argv[:3] == [sys.executable, "-m", "vtoken.eval.bench_kernels"]
    args = bench_kernels.build_parser().parse_args(argv[3:])
    assert (args.dtype, args.runs, args.require_gpu) == ("bf16", 50, True)


@pytest.mark.parametrize("arch", ["llava-1.5-7b", "qwen2.5-vl-7b"])
def test_bench_arguments_parse(dry_run, monkeypatch, arch):
    from vtoken.cli import build_parser

    out, commands, _ = dry_run
    name = f"bench_{arch}"
    argv = commands[name]
    assert argv[:4] == [sys.executable, "-m", "vtoken", "bench"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda is checked against the machine
    args = build_parser().parse_args(argv[3:])
    assert args.arch == arch and args.random_init
    assert float(args.depth_scale) == 1.0  # full depth
    assert (args.device, args.dtype) == ("cuda", "bf16")
    assert str(args.budgets) == "64,128,192" and str(args.methods) == METHODS
    assert args.out == str(out / STEPS[name].removesuffix(".log"))


def test_the_1344_step_sweeps_one_high_resolution_image(dry_run, monkeypatch):
    from vtoken.cli import build_parser
    from vtoken.eval.bench.cli import resolve_defaults

    out, commands, _ = dry_run
    argv = commands["qwen2.5-vl-7b_1344"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = resolve_defaults(build_parser().parse_args(argv[3:]))
    assert args.arch == "qwen2.5-vl-7b" and args.random_init and float(args.depth_scale) == 1.0 and args.scaling
    assert args.scaling_tokens == "2304" and args.scaling_batches == "1"  # one 1,344 x 1,344 image: 48 x 48 tokens
    # the same budget before the LLM and inside the tower at a third of its 32 blocks, each with its oracle
    assert args.methods == "kcenter,kcenter@vision(11),dart@llm(2)" and args.budgets == "0.25"
    assert args.out == str(out / STEPS["qwen2.5-vl-7b_1344"].removesuffix(".log"))


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for Python: answers the CUDA probe yes and fakes the GPU programs (the kernel benchmark fails,
# the LLaVA bench hangs); anything else goes to the real Python.
case "$1" in
  -m) echo "fake: $*"
      case "$2" in
        vtoken.eval.bench_kernels) exit 3 ;;
        vtoken) [[ " $* " == *" llava-1.5-7b "* ]] && sleep 30; exit 0 ;;
        *) exit 0 ;;
      esac ;;
  -c) if [[ "$2" == *cuda.is_available* ]]; then echo 1; exit 0; fi ;;
esac
exec REAL_PYTHON "$@"
"""


def test_a_run_continues_past_failed_steps_and_fails_at_the_end(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace("REAL_PYTHON", shlex.quote(sys.executable)))
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = run_script(str(out), python=str(fake), LIMIT_BENCH_LLAVA="2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    status = {line.split()[0]: line.split()[1] for line in summary.splitlines() if line.split()[:1]
              and line.split()[0] in STEPS}
    assert status == {"kernel_tests": "ok", "bench_kernels": "FAILED(3)", "bench_llava-1.5-7b": "TIMEOUT",
                      "bench_qwen2.5-vl-7b": "ok", "qwen2.5-vl-7b_1344": "ok"}
    assert "torch " + torch.__version__ in summary  # the machine section
    assert "nvidia-smi" in summary and "total wall time" in summary and "result: FAILED" in summary
    qwen_log = (out / STEPS["bench_qwen2.5-vl-7b"]).read_text()
    assert "fake: -m vtoken bench --arch qwen2.5-vl-7b" in qwen_log  # ran after the failures
    assert "stopped after the 2 s limit" in (out / STEPS["bench_llava-1.5-7b"]).read_text()


def test_without_a_gpu_every_step_fails_and_no_7b_model_is_built(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    proc = run_script(str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    status = {line.split()[0]: line.split()[1] for line in summary.splitlines() if line.split()[:1]
              and line.split()[0] in STEPS}
    # the kernel tests fail rather than skip; the benches are not started (they would build 7B on the CPU)
    assert status == {"kernel_tests": "FAILED(1)", "bench_kernels": "FAILED(1)", "bench_llava-1.5-7b": "NOT",
                      "bench_qwen2.5-vl-7b": "NOT", "qwen2.5-vl-7b_1344": "NOT"}
    assert "VTOKEN_TEST_REQUIRE_CUDA is set" in (out / STEPS["kernel_tests"]).read_text()
    assert "cuda available: False" in summary


def test_stops_when_python_imports_another_vtoken(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\n[[ \"$2\" == *vtoken.__file__* ]] && {{ echo /elsewhere/vtoken; exit 0; }}\n"
                    f"exec {shlex.quote(sys.executable)} \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = run_script(str(out), python=str(fake))
    assert proc.returncode == 1
    assert "does not import this checkout's vtoken" in proc.stderr
    assert "/elsewhere/vtoken" in (out / "summary.txt").read_text()
    assert not (out / STEPS["kernel_tests"]).exists()
