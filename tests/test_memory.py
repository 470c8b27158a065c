"""No stage's memory grows as N^2: each selection at N = 16,000 tokens on the CPU (torch path) must add
far less than the N x N float32 matrix (1,024 MB) a similarity-matrix implementation would hold.

The selections run in a fresh subprocess. Memory is its resident set: the peak (VmHWM in
/proc/self/status) is reset right before each selection (writing 5 to /proc/self/clear_refs), and the
selection's extra memory is that peak minus the resident set at the reset. Resident memory counts every
allocator (torch's CPU allocator is plain malloc; large blocks are fresh mmaps), so nothing an op
allocates and frees within the call escapes it. Where the peak cannot be reset, the peak since start-up
stands in, which can only overstate the extra memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

N = 16_000
DIM = 64
KEEP = 64
MATRIX_BYTES = N * N * 4  # the float32 N x N similarity matrix: 1,024 MB
BOUND_BYTES = 256 * 10**6  # a quarter of it

SCRIPT = r"""
import json, sys
import torch

torch.set_num_threads(1)
import vtoken
from vtoken import TokenSet

N, DIM, KEEP = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def token_set(n, seed, grid, signal):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, DIM, generator=g)
    signals = {signal: torch.rand(1, n, generator=g)} if signal else {}
    return TokenSet.from_features(x, grid=grid, signals=signals)


# stage, token grid (pool), the per-token signal it scores with
STAGES = {
    "kcenter": (vtoken.KCenter(), None, None),
    "dart": (vtoken.Dart(), None, None),  # at the projector: pivots by feature L1 norm
    "pool": (vtoken.Pool(), (125, 128), None),
    "random": (vtoken.RandomKeep(), None, None),
    "fastv": (vtoken.FastV(), None, "last_query_attn"),
    "cls_attn": (vtoken.ClsAttn(), None, "cls_attn"),
}
out = {}
for name, (stage, grid, signal) in STAGES.items():
    stage.select(token_set(100, 1, grid and (10, 10), signal), 16)  # warm-up: lazy imports, first-call setup
    tokens = token_set(N, 0, grid, signal)
    resettable = reset_peak()
    before = status_kb("VmRSS")
    keep = stage.select(tokens, KEEP)
    peak = status_kb("VmHWM")
    assert tuple(keep.indices.shape) == (1, KEEP), keep.indices.shape
    out[name] = {"extra_bytes": (peak - before) * 1024, "peak_reset": resettable}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def measured() -> dict[str, dict]:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc to read the resident set")
    env = dict(os.environ, VTOKEN_KERNELS="torch")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(N), str(DIM), str(KEEP)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", ["kcenter", "dart", "pool", "random", "fastv", "cls_attn"])
def test_selection_memory_is_far_below_n_squared(measured, stage):
    extra = measured[stage]["extra_bytes"]
    how = "peak reset before the call" if measured[stage]["peak_reset"] else "peak since start-up"
    assert extra < BOUND_BYTES, (
        f"{stage}.select on {N} tokens x {DIM} dims (keep {KEEP}) added {extra / 1e6:.0f} MB of resident "
        f"memory at its peak ({how}); the bound is {BOUND_BYTES / 1e6:.0f} MB, an N x N float32 matrix "
        f"is {MATRIX_BYTES / 1e6:.0f} MB"
    )
