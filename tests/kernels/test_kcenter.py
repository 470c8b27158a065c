"""kcenter_select: the reference against a slow loop over a full distance matrix, the Triton kernels
against the reference, index for index.

Exact index equality is a fair demand of the kernels for every input dtype: both backends normalise the
same rounded inputs with the same function to identical float32 unit vectors, so half-precision inputs
are no different from float32 ones, and only the summation order of the dot products differs (~1e-7).
That can flip a pick only at a near-tie; ``decision_margins`` checks that the test data has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vtoken.kernels as K
from vtoken.kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass
class Case:
    batch: int
    n: int
    dim: int
    k: int
    padded: bool = False
    block_n: int = 16  # small token tiles and feature chunks: several of each, with remainders
    block_d: int = 16

    def __str__(self) -> str:
        return f"B{self.batch}-N{self.n}-D{self.dim}-k{self.k}{'-padded' if self.padded else ''}"


CASES = [
    Case(2, 37, 24, 8),
    Case(1, 65, 40, 10, padded=True),
    Case(2, 130, 20, 12, padded=True, block_n=32, block_d=16),
    # N <= D: the reference holds the N x N distances instead of streaming the features each step
    Case(2, 30, 48, 9),
    Case(1, 40, 40, 11, padded=True),
]


def make_inputs(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    g = torch.Generator().manual_seed(case.n)
    x = torch.randn(case.batch, case.n, case.dim, generator=g)
    valid = None
    if case.padded:
        valid = torch.rand(case.batch, case.n, generator=g) > 0.25
        valid[:, -3:] = False  # trailing padding, as in a right-padded batch
        valid = valid.to(device)
    return x.to(device, dtype), valid


def slow_kcenter(x: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> list[list[int]]:
    """DivPrune's greedy max-min selection, spelled out over a full float64 distance matrix."""
    picks = []
    for b in range(x.shape[0]):
        xb = x[b].double()
        xb = xb / xb.norm(dim=-1, keepdim=True).clamp_min(reference.COSINE_EPS)
        dist = (1 - xb @ xb.T).tolist()
        tokens = [i for i in range(x.shape[1]) if valid is None or bool(valid[b, i])]
        # Nearest other valid token; a token alone has none (0). max() keeps the first maximal element,
        # so ties go to the lowest index.
        nearest = {i: min([dist[i][j] for j in tokens if j != i], default=0.0) for i in tokens}
        chosen = [max(tokens, key=nearest.__getitem__)]
        while len(chosen) < k:
            rest = [i for i in tokens if i not in chosen]
            farthest = {i: min(dist[i][c] for c in chosen) for i in rest}
            chosen.append(max(rest, key=farthest.__getitem__))
        picks.append(chosen)
    return picks


def decision_margins(x: torch.Tensor, picks: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """For every pick, how far the winner's score is above the runner-up's (ties go by index)."""
    xn = reference.normalize(x.cpu())
    valid = None if valid is None else valid.cpu()
    nearest = reference.nearest_neighbour_distance(xn, valid)
    margins = []
    for b in range(x.shape[0]):
        score = nearest[b]
        blocked = torch.zeros(x.shape[1], dtype=torch.bool) if valid is None else ~valid[b]
        for step, index in enumerate(picks[b].tolist()):
            top = score.masked_fill(blocked, float("-inf")).topk(2).values
            if torch.isfinite(top).all():
                margins.append(top[0] - top[1])
            blocked[index] = True
            distance = 1 - xn[b] @ xn[b, index]
            score = distance if step == 0 else torch.minimum(score, distance)
    return torch.stack(margins)


def check_selection(picks: torch.Tensor, k: int, n: int, valid: torch.Tensor | None) -> None:
    assert picks.dtype == torch.long and picks.shape[1] == k
    assert ((picks >= 0) & (picks < n)).all()
    for b, row in enumerate(picks.cpu().tolist()):
        assert len(set(row)) == k, f"row {b} picks a token twice: {row}"
        if valid is not None:
            assert valid[b].cpu()[row].all(), f"row {b} picks padding: {row}"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_slow_loop(case, dtype):
    x, valid = make_inputs(case, dtype)
    picks = reference.kcenter_select(x, case.k, valid=valid)
    check_selection(picks, case.k, case.n, valid)
    assert picks.tolist() == slow_kcenter(x, case.k, valid)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_matches_reference_exactly(triton_backend, device, case, dtype):
    from vtoken.kernels.kcenter import kcenter_select_triton

    x, valid = make_inputs(case, dtype, device)
    expected = reference.kcenter_select(x, case.k, valid=valid)
    assert decision_margins(x, expected, valid).min() > 1e-5, "near-tie in the data: pick another seed"
    got = kcenter_select_triton(x, case.k, valid=valid, block_n=case.block_n, block_d=case.block_d)
    check_selection(got, case.k, case.n, valid)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("padded", [False, True])
def test_nearest_neighbour_kernel_matches_reference(triton_backend, device, padded):
    from vtoken.kernels.kcenter import nearest_neighbour_distance_triton

    x, valid = make_inputs(Case(2, 70, 24, 1, padded=padded), device=device)
    xn = reference.normalize(x)
    got = nearest_neighbour_distance_triton(xn, valid, block_n=16)
    expected = reference.nearest_neighbour_distance(xn, valid)
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))  # padding: -inf
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_dispatch_runs_the_kernel_with_default_tiles(triton_backend, device):
    x, valid = make_inputs(Case(1, 70, 200, 6, padded=True), torch.bfloat16, device)
    picks = K.kcenter_select(x, 6, valid=valid)
    assert torch.equal(picks, reference.kcenter_select(x, 6, valid=valid))
    assert torch.equal(K.kcenter_select(x, 6, valid=valid), picks)  # deterministic


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exact_duplicates_are_never_picked_twice(monkeypatch, device, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("VTOKEN_KERNELS", backend)
    g = torch.Generator().manual_seed(3)
    distinct = torch.randn(1, 6, 16, generator=g)
    x = distinct[:, torch.arange(40) % 6].to(device)  # 6 distinct tokens, each repeated
    # Up to 6 picks every pick is a distinct token, the lowest index of its copies; beyond that the
    # remaining tokens are all copies at distance ~0 and only uniqueness is promised.
    first_six = K.kcenter_select(x, 6)
    assert sorted(first_six[0].tolist()) == list(range(6))
    picks = K.kcenter_select(x, 20)
    check_selection(picks, 20, 40, None)
    assert torch.equal(picks[:, :6], first_six)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_budget_edges(monkeypatch, device, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("VTOKEN_KERNELS", backend)
    x = torch.randn(2, 20, 8, device=device)
    valid = torch.ones(2, 20, dtype=torch.bool, device=device)
    valid[1, 5:] = False  # row 1 has 5 valid tokens
    with pytest.raises(ValueError, match="cannot select 6 tokens from 5"):
        K.kcenter_select(x, 6, valid=valid)
    with pytest.raises(ValueError):
        K.kcenter_select(x, 21)
    assert K.kcenter_select(x, 0).shape == (2, 0)
    everything = K.kcenter_select(x, 5, valid=valid)
    assert sorted(everything[1].tolist()) == [0, 1, 2, 3, 4]
    lone = torch.zeros(2, 20, dtype=torch.bool, device=device)
    lone[:, 7] = True  # a single valid token has no neighbour: it is still the first pick
    assert K.kcenter_select(x, 1, valid=lone).tolist() == [[7], [7]]


def full_matrix_nearest(xn: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The nearest-neighbour distances from the whole N x N distance matrix at once."""
    distance = 1.0 - xn @ xn.transpose(1, 2)
    blocked = torch.eye(xn.shape[1], dtype=torch.bool)[None]
    if valid is not None:
        blocked = blocked | ~valid[:, None, :]
    nearest = distance.masked_fill(blocked, float("inf")).min(dim=-1).values
    nearest = nearest.masked_fill(torch.isinf(nearest), 0.0)
    return nearest if valid is None else nearest.masked_fill(~valid, float("-inf"))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("block_rows", [16, 17, 64, 100, 130, 1000])
def test_reference_nearest_neighbour_in_row_blocks_is_the_full_matrix_result(padded, block_rows):
    """Row blocks (the last one overlapping so that all have one shape) give bit-identical distances."""
    x, valid = make_inputs(Case(2, 130, 20, 1, padded=padded))
    x[:, 90] = x[:, 5]  # an exact duplicate pair in different blocks
    xn = reference.normalize(x)
    got = reference.nearest_neighbour_distance(xn, valid, block_rows=block_rows)
    assert torch.equal(got, full_matrix_nearest(xn, valid))


def test_reference_kcenter_picks_do_not_depend_on_the_blocking(monkeypatch):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 32, generator=g)
    x[:, 250] = x[:, 3]
    valid = torch.rand(2, 300, generator=g) > 0.2
    whole = reference.kcenter_select(x, 20, valid=valid)  # 300 x 300 fits one block
    monkeypatch.setattr(reference, "NEAREST_BLOCK_ELEMENTS", 2 * 300 * 64)  # 64-row blocks
    assert torch.equal(reference.kcenter_select(x, 20, valid=valid), whole)
    assert whole.tolist() == slow_kcenter(x, 20, valid)


def test_reference_nearest_neighbour_refuses_tiny_blocks():
    with pytest.raises(ValueError, match="block_rows must be >= 16"):
        reference.nearest_neighbour_distance(reference.normalize(torch.randn(1, 40, 8)), block_rows=4)
