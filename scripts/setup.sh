#!/usr/bin/env bash
# Create a virtual environment and install vtoken into it:
#   scripts/setup.sh          .venv, runtime
#   scripts/setup.sh dev      .venv, everything the tests use
#   scripts/setup.sh lowest   .venv-lowest: the tests' core with the LOWEST transformers vtoken supports
#                             (the lower bound in pyproject.toml), for CI's second environment
# torch 2.14.1 + torchvision 0.29.1 are the pinned pair (torchvision is needed by timm, open_clip and the
# Qwen processors); on a CPU-only machine the same wheels run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv=.venv
[ "$extras" = "lowest" ] && venv=.venv-lowest
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
case "$extras" in
  dev)
    "$venv/bin/python" -m pip install -q -e ".[dev,kernels,timm,clip,eval,demo]"
    if [ -f scripts/install_browser.sh ]; then bash scripts/install_browser.sh; fi
    ;;
  lowest)
    lowest=$(grep -oE '"transformers>=[0-9.]+' pyproject.toml | grep -oE '[0-9.]+$')
    "$venv/bin/python" -m pip install -q -e ".[dev,kernels,timm,clip]" "transformers==${lowest}.*"
    ;;
  *)
    "$venv/bin/python" -m pip install -q -e .
    ;;
esac
