"""cosine_to_pivots: the reference against torch's cosine_similarity, the Triton kernel against both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtoken.kernels as K
from vtoken.kernels import reference

# Kernel vs reference on the same inputs: only fp32 arithmetic differs, whatever the input dtype.
SAME_INPUT = {"atol": 1e-6, "rtol": 1e-5}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def torch_cosine(x: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """The definition, spelled with torch.nn.functional.cosine_similarity in float64."""
    return F.cosine_similarity(pivots.double()[:, :, None], x.double()[:, None], dim=-1,
                               eps=reference.COSINE_EPS)


def make_inputs(batch: int, n: int, pivots: int, dim: int, dtype: torch.dtype, device: str = "cpu"):
    g = torch.Generator().manual_seed(n * 31 + pivots)
    x = torch.randn(batch, n, dim, generator=g)
    x[0, 1] = 0.0  # a zero token: cosine 0 with every pivot, not NaN
    return x.to(device, dtype), torch.randn(batch, pivots, dim, generator=g).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_cosine_similarity(dtype):
    x, p = make_inputs(2, 37, 5, 40, dtype)
    got = reference.cosine_to_pivots(x, p)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 37)
    torch.testing.assert_close(got.double(), torch_cosine(x, p), **SAME_INPUT)
    assert (got[0, :, 1] == 0).all()


@pytest.mark.parametrize("shape", [(2, 37, 5, 40), (1, 130, 1, 48), (1, 65, 40, 16)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference(triton_backend, device, shape, dtype):
    from vtoken.kernels.similarity import cosine_to_pivots_triton

    x, p = make_inputs(*shape, dtype, device)
    # Small tiles: N spans several token tiles and D several chunks, with remainders.
    got = cosine_to_pivots_triton(x, p, block_n=32, block_d=16)
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[2], shape[1])
    torch.testing.assert_close(got, reference.cosine_to_pivots(x, p), **SAME_INPUT)
    torch.testing.assert_close(got.cpu().double(), torch_cosine(x.cpu(), p.cpu()), **SAME_INPUT)


def test_dispatch_runs_the_kernel_with_default_tiles(triton_backend, device):
    x, p = make_inputs(1, 70, 3, 100, torch.bfloat16, device)
    torch.testing.assert_close(K.cosine_to_pivots(x, p), reference.cosine_to_pivots(x, p), **SAME_INPUT)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        K.cosine_to_pivots(torch.randn(1, 5, 8), torch.randn(1, 2, 7))
