"""attention_rows: the reference against a float64 softmax, the Triton kernel against the reference."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vtoken.kernels as K
from vtoken.kernels import reference

# Kernel vs reference on the same inputs: both upcast the same rounded values to float32, so only fp32
# arithmetic differs (summation order, exp2 vs exp), whatever the input dtype.
SAME_INPUT = {"atol": 1e-6, "rtol": 1e-5}
# Kernel on rounded inputs vs float64 on the original float32 data: the input rounding dominates
# (fp16 keeps 11 significant bits, bf16 8), as in Liger-Kernel's per-dtype tolerance tables.
TOLERANCE = {
    torch.float32: {"atol": 1e-6, "rtol": 1e-5},
    torch.float16: {"atol": 5e-4, "rtol": 1e-2},  # observed worst: 2.1e-4 abs
    torch.bfloat16: {"atol": 5e-3, "rtol": 5e-2},  # observed worst: 3.9e-3 abs
}
DTYPES = list(TOLERANCE)


@dataclass
class Case:
    batch: int
    heads: int
    kv_heads: int
    rows: int
    n: int
    dim: int
    key_mask: bool = False
    causal: bool = False
    scale: float | None = None
    block_n: int | None = None  # small key tiles so that N spans several of them in the interpreter

    def __str__(self) -> str:
        return (f"B{self.batch}-H{self.heads}/{self.kv_heads}-Q{self.rows}-N{self.n}-d{self.dim}"
                f"{'-mask' if self.key_mask else ''}{'-causal' if self.causal else ''}")


CASES = [
    Case(1, 4, 4, 1, 37, 16, block_n=16),  # [CLS]-style row, N not a multiple of the tile
    Case(2, 4, 2, 3, 65, 24, key_mask=True, scale=0.3, block_n=16),  # GQA 2:1, padding mask
    Case(2, 4, 1, 2, 130, 16, key_mask=True, causal=True, block_n=32),  # GQA 4:1, both masks
    Case(1, 2, 1, 40, 37, 16, causal=True, block_n=16),  # 40 rows: two row tiles, the second partial
]


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """Inputs in float32 and in ``dtype``; row 0 of batch 0 has no allowed key when masks are on."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.batch, case.heads, case.rows, case.dim, generator=g) * 2
    k = torch.randn(case.batch, case.kv_heads, case.n, case.dim, generator=g)
    key_mask = causal_limit = None
    if case.key_mask:
        key_mask = torch.rand(case.batch, case.n, generator=g) > 0.3
        key_mask[0, :4] = False
    if case.causal:
        causal_limit = torch.randint(0, case.n, (case.batch, case.rows), generator=g)
        causal_limit[0, 0] = 3 if case.key_mask else -1  # nothing left to attend
    extra = {"scale": case.scale, "key_mask": key_mask, "causal_limit": causal_limit}
    moved = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in extra.items()}
    return q, k, q.to(device, dtype), k.to(device, dtype), moved


def naive_float64(q, k, *, scale=None, key_mask=None, causal_limit=None) -> torch.Tensor:
    """Full softmax(q k^T) per head in float64, disallowed keys removed, then the head mean."""
    batch, heads, rows, dim = q.shape
    n = k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, rows, n, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            keys = k[b, h // (heads // k.shape[1])].double()
            for r in range(rows):
                allowed = torch.ones(n, dtype=torch.bool)
                if key_mask is not None:
                    allowed &= key_mask[b].cpu()
                if causal_limit is not None:
                    allowed &= torch.arange(n) <= int(causal_limit[b, r])
                if allowed.any():
                    scores = keys[allowed] @ q[b, h, r].double() * scale
                    out[b, r, allowed] += torch.softmax(scores, dim=0) / heads
    return out


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_float64_softmax(case, dtype):
    _, _, q, k, extra = make_inputs(case, dtype)
    expected = naive_float64(q, k, **extra)
    got = reference.attention_rows(q, k, **extra)
    assert got.dtype == torch.float32 and got.shape == (case.batch, case.rows, case.n)
    torch.testing.assert_close(got.double(), expected, **SAME_INPUT)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference(triton_backend, device, case, dtype):
    from vtoken.kernels.attention import attention_rows_triton

    q32, k32, q, k, extra = make_inputs(case, dtype, device)
    got = attention_rows_triton(q, k, block_n=case.block_n, **extra)
    assert got.dtype == torch.float32 and got.shape == (case.batch, case.rows, case.n)
    torch.testing.assert_close(got, reference.attention_rows(q, k, **extra), **SAME_INPUT)
    # End to end against float64 on the unrounded data: the per-dtype tolerance.
    expected = naive_float64(q32, k32, **{n: t.cpu() if isinstance(t, torch.Tensor) else t
                                          for n, t in extra.items()})
    torch.testing.assert_close(got.cpu().double(), expected, **TOLERANCE[dtype])
    if case.key_mask:
        allowed = extra["key_mask"][:, None, :].expand_as(got)
        assert (got[~allowed] == 0).all()  # disallowed keys are exactly 0
    if case.causal:
        assert (got[0, 0] == 0).all()  # the row with nothing to attend: zeros, not NaN
        live = got.sum(-1)[got.sum(-1) > 0]
        torch.testing.assert_close(live, torch.ones_like(live))


def test_dispatch_runs_the_kernel_with_default_tiles(triton_backend, device):
    case = Case(1, 2, 1, 2, 130, 80)  # Qwen-VL-like head dim 80: padded to a 128-wide tile
    _, _, q, k, _ = make_inputs(case, torch.float16, device)
    torch.testing.assert_close(K.attention_rows(q, k), reference.attention_rows(q, k), **SAME_INPUT)


def test_kernel_reads_strided_views(triton_backend, device):
    """Integrations hand over [B, N, H, d] activations transposed to [B, H, N, d], without copies."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, 16, generator=g).to(device).transpose(1, 2)  # [B, H=4, Q=3, d]
    k = torch.randn(2, 37, 2, 16, generator=g).to(device).transpose(1, 2)  # [B, Hk=2, N=37, d]
    assert not q.is_contiguous() and not k.is_contiguous()
    torch.testing.assert_close(K.attention_rows(q, k), reference.attention_rows(q, k), **SAME_INPUT)


def test_every_key_masked_gives_zeros(triton_backend, device):
    q = torch.randn(1, 2, 2, 16, device=device)
    k = torch.randn(1, 2, 20, 16, device=device)
    out = K.attention_rows(q, k, key_mask=torch.zeros(1, 20, dtype=torch.bool, device=device))
    assert torch.equal(out, torch.zeros(1, 2, 20, device=device))


@pytest.mark.parametrize("bad", ["heads", "mask", "limit"])
def test_bad_shapes_raise(bad):
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 10, 8)
    kwargs = {}
    if bad == "heads":
        k = torch.randn(1, 3, 10, 8)
    elif bad == "mask":
        kwargs["key_mask"] = torch.ones(1, 9, dtype=torch.bool)
    else:
        kwargs["causal_limit"] = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError):
        K.attention_rows(q, k, **kwargs)
