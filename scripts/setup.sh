#!/usr/bin/env bash
# Create a virtual environment and install vtoken into it:
#   scripts/setup.sh          .venv, runtime
#   scripts/setup.sh dev      .venv, everything the tests use
#   scripts/setup.sh lowest   .venv-lowest: the LOWEST transformers vtoken supports (the lower bound in
#                             pyproject.toml) layered over .venv (run `dev` first), for CI's second
#                             environment. Only what that transformers needs differently is installed
#                             there; torch and the rest (about 5 GB) come from .venv, which a second
#                             full copy would not fit beside on CI's disk.
#   scripts/setup.sh vllm     .venv-vllm: vLLM 0.33.0 and its transformers pin (5.20; torch and torchvision
#                             from .venv) layered over .venv the same way, for tests_vllm (the vLLM
#                             plugin). vLLM and its pins go in without their dependencies, with only the
#                             few that importing vLLM's model, processor and plugin code needs; the rest
#                             (flashinfer, CUDA compilers, the HTTP server: several GB) is left out, so
#                             this environment runs tests_vllm, not `vllm serve` (docs/serving.md).
# torch 2.14.1 + torchvision 0.29.1 are the pinned pair (torchvision is needed by timm, open_clip and the
# Qwen processors); on a CPU-only machine the same wheels run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ "$extras" = "vllm" ]; then
  [ -x .venv/bin/python ] || { echo "setup.sh vllm layers over .venv: run scripts/setup.sh dev first" >&2; exit 2; }
  python3 -m venv .venv-vllm
  base=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  own=$(.venv-vllm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import site; site.addsitedir('$base')" > "$own/zz_over_main_venv.pth"  # as for `lowest` below
  # torch and torchvision come from .venv (2.14.1 / 0.29.1, the patch releases after vLLM's pins 2.14.0 /
  # 0.29.0): the tests build vLLM's model classes on the CPU, which the pins' patch level does not change,
  # and a second torch (1.2 GB) is what CI's disk has least room for
  .venv-vllm/bin/python -m pip install -q --no-cache-dir --no-deps \
    transformers==5.20.2 vllm==0.33.0 apache-tvm-ffi==0.1.11 blake3==1.0.11 cachetools==8.0.2 cbor2==6.3.0 \
    llguidance==1.7.6 msgspec==0.23.0 oss-harmony==0.0.11 partial-json-parser==0.2.1.1.post7 \
    prometheus_client==0.26.0 py-cpuinfo==9.0.0 pybase64==1.5.1 pyzmq==27.3.0 uvloop==0.23.0 xgrammar==0.2.8 \
    mistral_common==1.13.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1 pydantic-extra-types==2.11.1 pycountry==26.2.16
  .venv-vllm/bin/python -m pip install -q --no-cache-dir --no-deps -e .
  exit 0
fi
venv=.venv
[ "$extras" = "lowest" ] && venv=.venv-lowest
if [ "$extras" = "lowest" ]; then
  [ -x .venv/bin/python ] || { echo "setup.sh lowest layers over .venv: run scripts/setup.sh dev first" >&2; exit 2; }
  python3 -m venv "$venv"
  base=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  own=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a bare path line) so .venv's own .pth files, vtoken's editable finder among them,
  # work here too; .venv's directory comes after this venv's, so what is installed here wins.
  echo "import site; site.addsitedir('$base')" > "$own/zz_over_main_venv.pth"
  lowest=$(grep -oE '"transformers>=[0-9.]+' pyproject.toml | grep -oE '[0-9.]+$')
  "$venv/bin/python" -m pip install -q --no-cache-dir "transformers==${lowest}.*"
  # vtoken itself again, without dependencies, for a `vtoken` console script that runs this Python.
  "$venv/bin/python" -m pip install -q --no-cache-dir --no-deps -e .
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
case "$extras" in
  dev)
    "$venv/bin/python" -m pip install -q -e ".[dev,kernels,timm,clip,eval,demo]"
    if [ -f scripts/install_browser.sh ]; then bash scripts/install_browser.sh; fi
    ;;
  *)
    "$venv/bin/python" -m pip install -q -e .
    ;;
esac
