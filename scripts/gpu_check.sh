#!/usr/bin/env bash
# GPU check: one prepared run on one H100/H200 that fills in the GPU tables of docs/benchmarks.md.
#
#   scripts/gpu_check.sh [--dry-run] OUT_DIR
#
# Steps (each writes one file into OUT_DIR; a failed step does not stop the next ones):
#   1. 01_kernel_tests.log        pytest tests/kernels on CUDA (compiled Triton kernels, no interpreter;
#                                 a missing GPU or triton fails the step instead of skipping the tests)
#   2. 02_bench_kernels.log       python -m vtoken.eval.bench_kernels --dtype bf16 --runs 50
#   3. 03_bench_llava-1.5-7b.log  vtoken bench, LLaVA-1.5-7B architecture at full depth, random init,
#                                 bf16, budgets 64,128,192 (results.json/csv and plots in the folder
#                                 03_bench_llava-1.5-7b/)
#   4. 04_bench_qwen2.5-vl-7b.log the same for the Qwen2.5-VL-7B architecture (folder 04_bench_qwen2.5-vl-7b/),
#                                 on the bench's default synthetic image (576 visual tokens).
#   5. 05_qwen2.5-vl-7b_1344.log  Qwen2.5-VL-7B at full depth with one 1,344 x 1,344 image (2,304 visual
#                                 tokens, set through vtoken bench --scaling): kcenter before the LLM, inside
#                                 the vision tower at a third of its depth (vision(11) of 32 blocks) and
#                                 dart@llm(2), keep 0.25, each against its oracle (folder 05_qwen2.5-vl-7b_1344/).
#   summary.txt                   the machine (nvidia-smi, Python, torch, CUDA, transformers, triton, git
#                                 commit), then each step's status and wall time, then the overall result.
# Each step log starts with the exact command it ran ("$ ...").
#
# Expected run time (an estimate until the first run): about 6.5 minutes on one H100/H200: kernel tests
# ~1.5 min (mostly Triton compilation), kernel benchmark < 1 min, each vtoken bench ~1.5 min (of which
# ~1 min builds the random 7B model on the CPU), the 1,344 x 1,344 run ~1.5 min. Each step has a time limit in
# seconds, overridable: LIMIT_KERNEL_TESTS=100, LIMIT_BENCH_KERNELS=60, LIMIT_BENCH_LLAVA=110,
# LIMIT_BENCH_QWEN=110, LIMIT_QWEN_1344=100, so the whole run ends within 8 minutes; a step over its limit is
# stopped and counted as failed.
# Needs: one CUDA GPU with >= 40 GB (a 7B model in bf16), ~40 GB of CPU memory (the model is built in
# fp32 on the CPU before it moves to the GPU), and nothing from the internet (no weights, no data: the
# models are random-weight architectures built from configs in the repository; HF_HUB_OFFLINE=1).
#
# What must travel to the GPU machine: this repository checkout and a virtual environment built by
#   scripts/setup.sh dev
# (torch with CUDA, triton, transformers, pytest, vtoken installed editable from this checkout).
# The venv records absolute paths (its python link, the editable install of this checkout), so either
# build it at the same absolute path on a machine with the same OS and Python and copy checkout + .venv
# together to that same path (e.g. rsync -a /work/main/ gpu:/work/main/), or run scripts/setup.sh dev on
# the GPU machine itself (that one step needs the package index). The check stops before step 1 (exit
# status 1) if the Python it found does not import this checkout's vtoken.
# Python: $PYTHON if set, else .venv/bin/python of this repository.
#
# Exit status: 0 if every step passed, 1 if any failed, 2 for a usage error or no usable Python.
# --dry-run prints each step's command ("+ NAME: COMMAND") and writes OUT_DIR/summary.txt and the step
# files (each holding its command only) without running anything.
set -u -o pipefail

usage="usage: scripts/gpu_check.sh [--dry-run] OUT_DIR"
dry_run=0
out_dir=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "$usage" >&2; echo "unknown option: $arg" >&2; exit 2 ;;
    *)
      if [ -n "$out_dir" ]; then echo "$usage" >&2; echo "one OUT_DIR only" >&2; exit 2; fi
      out_dir="$arg" ;;
  esac
done
if [ -z "$out_dir" ]; then
  echo "$usage" >&2
  echo "OUT_DIR: folder for the step logs, bench results and summary.txt (created if missing)" >&2
  exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out_dir" || { echo "cannot create $out_dir" >&2; exit 2; }
out_dir="$(cd "$out_dir" && pwd)"
cd "$repo" || exit 2

if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then
  py="$repo/.venv/bin/python"
else
  echo "no $repo/.venv and PYTHON is not set: build the venv with scripts/setup.sh dev, or set PYTHON" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1

METHODS='cls_attn,kcenter,dart,pool,random,fastv,dart@llm(2)'
BUDGETS='64,128,192'
METHODS_1344='kcenter,kcenter@vision(11),dart@llm(2)'
summary="$out_dir/summary.txt"
failed=0
started_all=$(date +%s)

note() { printf '%s\n' "$*" >> "$summary"; }

machine() {
  note "GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC') on ${HOSTNAME:-$(uname -n)}"
  note "repository: $repo"
  if command -v git > /dev/null && git -C "$repo" rev-parse HEAD > /dev/null 2>&1; then
    note "commit: $(git -C "$repo" rev-parse HEAD) ($(git -C "$repo" status --porcelain | wc -l | tr -d ' ') changed files)"
  fi
  note "python: $py"
  if [ "$dry_run" = 1 ]; then
    note "dry run: nothing was run; the commands below are what a real run runs"
    return
  fi
  note ""
  "$py" - >> "$summary" 2>&1 <<'EOF'
import importlib, platform, sys
print("Python", platform.python_version(), "|", platform.platform())
try:
    import torch
    print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
except Exception as error:
    print("torch: not importable:", error)
for name in ("transformers", "triton", "vtoken"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), "|", getattr(module, "__file__", ""))
    except Exception as error:
        print(name + ": not importable:", error)
EOF
  note ""
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi >> "$summary" 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
      >> "$summary" 2>&1
  else
    note "nvidia-smi: not found"
  fi
  note ""
}

# quote ARGS...: the arguments as one shell line, quoted only where needed (copy-pasteable).
quote() {
  local arg line=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./@%+=:,-]+$ ]]; then
      line+="$arg "
    else
      line+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${line% }"
}

step_line() {  # NAME STATUS WALL FILE: one row of the summary's step table
  note "$(printf '%-22s %-12s %8s  %s' "$1" "$2" "$3" "$(basename "$4")")"
}

# run_step NAME LIMIT_S LOG COMMAND...: run COMMAND (stdout and stderr into LOG, after the command line),
# stopped after LIMIT_S seconds; record its status and wall time in the summary.
run_step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local line
  line="$(quote "$@")"
  echo "+ $name: $line"
  printf '$ %s\n' "$line" > "$log"
  if [ "$dry_run" = 1 ]; then
    step_line "$name" "dry run" "-" "$log"
    return 0
  fi
  local t0 ms rc status
  t0=$(date +%s%N)
  timeout -k 15 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  case "$rc" in
    0) status="ok" ;;
    124|137) status="TIMEOUT"; failed=1; printf '\n[stopped after the %s s limit]\n' "$limit" >> "$log" ;;
    *) status="FAILED($rc)"; failed=1 ;;
  esac
  step_line "$name" "$status" "$(printf '%d.%ds' $((ms / 1000)) $((ms % 1000 / 100)))" "$log"
  echo "  -> $status ($log)"
}

# bench_step NAME LIMIT_S LOG COMMAND...: a vtoken bench step; without a CUDA device it is failed unrun
# (the bench builds the 7B model in fp32 on the CPU before it would find out: ~30 GB of memory for nothing).
bench_step() {
  if [ "$dry_run" = 0 ] && [ "$have_cuda" != 1 ]; then
    printf '$ %s\n[not run: no CUDA device]\n' "$(quote "${@:4}")" > "$3"
    step_line "$1" "NOT RUN" "-" "$3"
    echo "+ $1: not run: no CUDA device"
    failed=1
    return 0
  fi
  run_step "$@"
}

: > "$summary"
machine
have_cuda=0
if [ "$dry_run" = 0 ]; then
  # The tests and benches import the installed vtoken: it must be this checkout's (an editable install).
  where="$("$py" -c 'import os, vtoken; print(os.path.dirname(os.path.realpath(vtoken.__file__)))' 2>/dev/null)"
  if [ "$where" != "$(realpath "$repo/vtoken")" ]; then
    note "stopped: $py imports vtoken from '${where:-nowhere: import failed}', not from $repo/vtoken;"
    note "  see the header of scripts/gpu_check.sh for what must travel"
    echo "$py does not import this checkout's vtoken: build the venv with scripts/setup.sh dev" >&2
    exit 1
  fi
  have_cuda="$("$py" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)"
fi
note "$(printf '%-22s %-12s %8s  %s' "step" "status" "wall" "file")"

run_step kernel_tests "${LIMIT_KERNEL_TESTS:-100}" "$out_dir/01_kernel_tests.log" \
  env TRITON_INTERPRET=0 VTOKEN_TEST_REQUIRE_CUDA=1 "$py" -m pytest tests/kernels -q -p no:cacheprovider

run_step bench_kernels "${LIMIT_BENCH_KERNELS:-60}" "$out_dir/02_bench_kernels.log" \
  "$py" -m vtoken.eval.bench_kernels --dtype bf16 --runs 50 --require-gpu

bench_step bench_llava-1.5-7b "${LIMIT_BENCH_LLAVA:-110}" "$out_dir/03_bench_llava-1.5-7b.log" \
  "$py" -m vtoken bench --arch llava-1.5-7b --random-init --depth-scale 1 --device cuda --dtype bf16 \
  --methods "$METHODS" --budgets "$BUDGETS" --runs 10 --warmup 2 --decode-tokens 32 --quiet \
  --out "$out_dir/03_bench_llava-1.5-7b"

bench_step bench_qwen2.5-vl-7b "${LIMIT_BENCH_QWEN:-110}" "$out_dir/04_bench_qwen2.5-vl-7b.log" \
  "$py" -m vtoken bench --arch qwen2.5-vl-7b --random-init --depth-scale 1 --device cuda --dtype bf16 \
  --methods "$METHODS" --budgets "$BUDGETS" --runs 10 --warmup 2 --decode-tokens 32 --quiet \
  --out "$out_dir/04_bench_qwen2.5-vl-7b"

bench_step qwen2.5-vl-7b_1344 "${LIMIT_QWEN_1344:-100}" "$out_dir/05_qwen2.5-vl-7b_1344.log" \
  "$py" -m vtoken bench --arch qwen2.5-vl-7b --random-init --depth-scale 1 --device cuda --dtype bf16 \
  --scaling --scaling-tokens 2304 --scaling-batches 1 --methods "$METHODS_1344" --budgets 0.25 \
  --runs 10 --warmup 2 --generate-runs 3 --decode-tokens 32 --quiet --out "$out_dir/05_qwen2.5-vl-7b_1344"

if [ "$dry_run" = 1 ]; then
  exit 0
fi
note ""
note "total wall time: $(( $(date +%s) - started_all )) s"
if [ "$failed" = 0 ]; then
  note "result: every step passed"
else
  note "result: FAILED (see the steps above and their logs)"
fi
echo "summary: $summary"
exit "$failed"
