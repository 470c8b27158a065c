#!/usr/bin/env bash
# Create .venv and install vtoken into it: `scripts/setup.sh` (runtime), `scripts/setup.sh dev` (tests).
# torch 2.14.1 + torchvision 0.29.1 are the pinned pair (torchvision is needed by timm, open_clip and the
# Qwen processors); on a CPU-only machine the same wheels run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
if [ "$extras" = "dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev,kernels,timm,clip,eval,demo]"
  if [ -f scripts/install_browser.sh ]; then bash scripts/install_browser.sh; fi
else
  .venv/bin/python -m pip install -q -e .
fi
