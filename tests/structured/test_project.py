"""project(): Frobenius-optimal fits where a closed form exists, a good fit for LDR."""

import pytest
import torch

from surm import structured

F64 = torch.float64
LINEAR = ["circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz"]


def _basis(name, m, n, knobs):
    """(m*n, P) matrix whose columns are dense() of each unit parameter vector."""
    S = structured.make(name, m, n, dtype=F64, **knobs)
    cols = []
    for k in range(S.weight.numel()):
        with torch.no_grad():
            S.weight.zero_()
            S.weight.view(-1)[k] = 1.0
        cols.append(S.dense().detach().reshape(-1))
    return torch.stack(cols, 1)


LSQ_CASES = [(name, m, n, {}) for name in LINEAR for m, n in [(7, 7), (6, 10), (10, 6)]] + [
    (name, 6, 9, {"block_size": 3}) for name in ("circulant", "skew_circulant")
]


@pytest.mark.parametrize("name,m,n,knobs", LSQ_CASES)
def test_linear_projection_is_least_squares(name, m, n, knobs):
    M = torch.randn(m, n, dtype=F64)
    P = structured.get(name).project(M, **knobs)
    basis = _basis(name, m, n, knobs)
    lstsq = torch.linalg.lstsq(basis, M.reshape(-1, 1)).solution.reshape(-1)
    fit = P.dense().detach()
    torch.testing.assert_close(fit.reshape(-1), basis @ lstsq)
    residual = (M - fit).reshape(-1)
    torch.testing.assert_close(basis.T @ residual, torch.zeros(basis.shape[1], dtype=F64), atol=1e-10, rtol=0)


FAMILIES = ["circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "kronecker", "low_rank"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("m,n", [(8, 8), (6, 10), (9, 3)])
def test_projecting_a_member_returns_it(name, m, n):
    knobs = {"rank": 2} if name == "low_rank" else {}
    member = structured.make(name, m, n, init="random", dtype=F64, **knobs).dense().detach()
    P = structured.get(name).project(member, **knobs)
    torch.testing.assert_close(P.dense().detach(), member)


def test_projecting_a_block_circulant_returns_it():
    member = structured.make("circulant", 6, 12, block_size=3, init="random", dtype=F64).dense().detach()
    P = structured.Circulant.project(member, block_size=3)
    torch.testing.assert_close(P.dense().detach(), member)


@pytest.mark.parametrize("m,n,rank", [(8, 6, 1), (8, 6, 3), (5, 9, 5), (4, 4, 4)])
def test_low_rank_projection_is_eckart_young(m, n, rank):
    M = torch.randn(m, n, dtype=F64)
    P = structured.LowRank.project(M, rank=rank)
    s = torch.linalg.svdvals(M)
    optimum = s[rank:].pow(2).sum().sqrt()
    torch.testing.assert_close((M - P.dense().detach()).norm(), optimum)


@pytest.mark.parametrize("m,n,factors,terms",
                         [(6, 8, ((2, 4), (3, 2)), 1), (6, 8, ((3, 2), (2, 4)), 2), (9, 9, None, 2)])
def test_kronecker_projection_is_van_loan_pitsianis_optimum(m, n, factors, terms):
    M = torch.randn(m, n, dtype=F64)
    P = structured.Kronecker.project(M, factors=factors, terms=terms)
    (a1, a2), (b1, b2) = P.factors
    # the optimum: best rank-`terms` fit of the rearranged matrix, independent of the fold
    blocks = [M[i * b1 : (i + 1) * b1, j * b2 : (j + 1) * b2].reshape(-1) for i in range(a1) for j in range(a2)]
    s = torch.linalg.svdvals(torch.stack(blocks))
    optimum = s[terms:].pow(2).sum().sqrt()
    torch.testing.assert_close((M - P.dense().detach()).norm(), optimum)
    # and nothing a random restart of gradient descent finds is better
    other = structured.Kronecker.project(M + 0.1 * torch.randn_like(M), factors=factors, terms=terms)
    assert (M - other.dense().detach()).norm() >= optimum - 1e-12


def test_ldr_projection_is_at_least_as_good_as_circulant_and_skew():
    M = torch.randn(12, 12, dtype=F64)
    circ = (M - structured.Circulant.project(M).dense()).norm()
    r1 = (M - structured.LDR.project(M, rank=1).dense().detach()).norm()
    r2 = (M - structured.LDR.project(M, rank=2).dense().detach()).norm()
    assert r1 <= circ + 1e-12
    assert r2 <= r1 + 1e-12


def test_ldr_projection_recovers_a_toeplitz_matrix_at_rank_two():
    """Every Toeplitz matrix is a circulant plus a skew-circulant: in the r = 2 class."""
    T = structured.make("toeplitz", 16, 16, init="random", dtype=F64).dense().detach()
    fit = structured.LDR.project(T, rank=2).dense().detach()
    assert (fit - T).norm() / T.norm() < 1e-5


def test_ldr_projection_of_circulant_is_exact_rectangular():
    C = structured.make("circulant", 5, 9, init="random", dtype=F64).dense().detach()
    fit = structured.LDR.project(C, rank=1, steps=0).dense().detach()
    torch.testing.assert_close(fit, C)


def test_project_keeps_float32_and_shape():
    M = torch.randn(6, 4)
    for name in structured.names():
        P = structured.get(name).project(M)
        assert P.shape == (6, 4)
        assert P.dense().dtype == torch.float32
