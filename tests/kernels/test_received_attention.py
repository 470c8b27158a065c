"""attention_received (the attention each token receives, mean over heads and queries): the torch
reference and the Triton kernel against the column means of the eager attention map, which the test
builds in full (the thing both of them avoid).

N in {1, 7, 729, 3000}: a lone token, a few, a SigLIP-384 image (27 x 27) and a long sequence. The
reference runs every N in both dtypes. Under Triton's interpreter (CPU) the kernel runs N in {1, 7, 729}
in both dtypes (729 with fewer heads and larger tiles) and N = 3000 in fp32 with one image, one head and
256-key tiles (about 20 s on one core; bf16 adds nothing there that 729 does not test); compiled on a
GPU it runs every case with 4 query heads on 2 key heads.
"""

from __future__ import annotations

import os

import pytest
import torch

import vtoken.kernels as K
from vtoken.kernels import reference

# conftest.py sets TRITON_INTERPRET (default on) before this module is imported
INTERPRET = os.environ.get("TRITON_INTERPRET", "1").strip().lower() in ("1", "true", "yes", "on")

SIZES = [1, 7, 729, 3000]
# Column means are about 1/N: absolute tolerances scale with it so that they never hide a wrong value.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Kernel vs reference on the same rounded inputs: only fp32 summation order differs.
SAME_INPUT = {"atol": 1e-9, "rtol": 1e-5}


def make_inputs(n: int, dtype: torch.dtype, device: str, heads: int = 4, kv_heads: int = 2, dim: int = 16,
                seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=g) * 2  # peaked rows: received mass far from uniform
    k = torch.randn(batch, kv_heads, n, dim, generator=g)
    return q.to(device, dtype), k.to(device, dtype)


def eager_column_means(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The eager attention map, as transformers' eager attention builds it (scores in the inputs' dtype,
    softmax in float32, probabilities cast back), then the mean over heads and query rows: ``[B, N]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [B, H, N, N]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs.float().mean(dim=(1, 2))


def tolerance(dtype: torch.dtype, n: int) -> dict[str, float]:
    rel = TOLERANCE[dtype]
    return {"rtol": rel, "atol": rel / (100 * n)}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_reference_matches_eager_column_means(n, dtype):
    q, k = make_inputs(n, dtype, "cpu", **({"heads": 2, "kv_heads": 1} if n >= 3000 else {}))
    got = reference.attention_received(q, k, scale=0.2)
    assert got.dtype == torch.float32 and got.shape == (2, n)
    torch.testing.assert_close(got, eager_column_means(q, k, scale=0.2), **tolerance(dtype, n))
    torch.testing.assert_close(got.sum(-1), torch.ones(2))  # every query row hands out a total of 1


def test_reference_never_holds_the_map(monkeypatch):
    """Blockwise: the largest intermediate has RECEIVED_QUERY_BLOCK rows, whatever N."""
    shapes = []
    original = reference.attention_rows

    def recording(q, k, **kwargs):
        shapes.append(tuple(q.shape))
        return original(q, k, **kwargs)

    monkeypatch.setattr(reference, "attention_rows", recording)
    q, k = make_inputs(600, torch.float32, "cpu")
    reference.attention_received(q, k)
    assert max(shape[2] for shape in shapes) == reference.RECEIVED_QUERY_BLOCK
    assert sum(shape[2] for shape in shapes) == 600


def _kernel_case(n: int, dtype: torch.dtype) -> dict:
    """Compiled: 4 query heads on 2 key heads, default tiles. Interpreted: small N as compiled (16-key
    tiles), 729 with 2 heads on 1 and 128-key tiles, 3000 with one image, one head, 256-key tiles."""
    if not INTERPRET:
        return {"heads": 4, "kv_heads": 2, "batch": 2, "block_n": None}
    if n < 100:
        return {"heads": 4, "kv_heads": 2, "batch": 2, "block_n": 16}
    if n < 3000:
        return {"heads": 2, "kv_heads": 1, "batch": 2, "block_n": 128}
    return {"heads": 1, "kv_heads": 1, "batch": 1, "block_n": 256}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_kernel_matches_reference_and_eager(triton_backend, device, n, dtype):
    from vtoken.kernels.received_attention import attention_received_triton

    case = _kernel_case(n, dtype)
    block_n = case.pop("block_n")
    q, k = make_inputs(n, dtype, device, **case)
    got = attention_received_triton(q, k, scale=0.2, block_n=block_n)
    assert got.dtype == torch.float32 and got.shape == (case["batch"], n)
    torch.testing.assert_close(got, reference.attention_received(q, k, scale=0.2), **SAME_INPUT)
    torch.testing.assert_close(got, eager_column_means(q, k, scale=0.2), **tolerance(dtype, n))


def test_key_mask_gives_masked_keys_nothing(triton_backend, device):
    q, k = make_inputs(37, torch.float32, device)
    key_mask = torch.rand(2, 37, generator=torch.Generator().manual_seed(3)) > 0.3
    key_mask[1] = False  # batch row 1: no key at all -> zeros, not NaN
    key_mask = key_mask.to(device)
    got = K.attention_received(q, k, key_mask=key_mask)
    torch.testing.assert_close(got, reference.attention_received(q, k, key_mask=key_mask), **SAME_INPUT)
    assert (got[~key_mask] == 0).all() and torch.equal(got[1], torch.zeros(37, device=device))
    torch.testing.assert_close(got[0].sum(), torch.tensor(1.0, device=device))
    # the masked map's column means, built in full
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 16 ** -0.5
    probs = torch.softmax(scores.masked_fill(~key_mask[:1, None, None, :], float("-inf")), dim=-1)
    torch.testing.assert_close(got[0], probs[0].mean(dim=(0, 1)), rtol=1e-5, atol=1e-9)


def test_kernel_reads_strided_views(triton_backend, device):
    """Integrations hand over [B, N, H, d] projections transposed to [B, H, N, d], without copies."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 50, 4, 16, generator=g).to(device).transpose(1, 2)
    k = torch.randn(2, 50, 4, 16, generator=g).to(device).transpose(1, 2)
    assert not q.is_contiguous()
    torch.testing.assert_close(K.attention_received(q, k), reference.attention_received(q, k), **SAME_INPUT)


def test_torch_backend_on_cpu(monkeypatch):
    monkeypatch.setenv("VTOKEN_KERNELS", "auto")
    q, k = make_inputs(7, torch.float32, "cpu")
    assert K.backend_for(q) == "torch"
    assert torch.equal(K.attention_received(q, k), reference.attention_received(q, k))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of key heads"):
        K.attention_received(torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="key_mask"):
        K.attention_received(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
                             key_mask=torch.ones(1, 4, dtype=torch.bool))
