"""dense() equals a construction that does not share code with the library."""

import numpy as np
import pytest
import scipy.linalg
import torch

from surm import structured

F64 = torch.float64


def _crop(M, m, n):
    return M[:m, :n]


@pytest.mark.parametrize("m,n", [(7, 7), (8, 8), (5, 11), (11, 5)])
def test_circulant_is_scipy_circulant(m, n):
    S = structured.make("circulant", m, n, init="random", dtype=F64)
    c = S.weight.detach().reshape(-1).numpy()
    np.testing.assert_allclose(S.dense().detach().numpy(), _crop(scipy.linalg.circulant(c), m, n))


@pytest.mark.parametrize("m,n,b", [(6, 9, 3), (8, 4, 4), (10, 10, 5), (4, 6, 2)])
def test_block_circulant_is_a_grid_of_scipy_circulants(m, n, b):
    S = structured.make("circulant", m, n, block_size=b, init="random", dtype=F64)
    w = S.weight.detach().numpy()
    ref = np.block([[scipy.linalg.circulant(w[p, q]) for q in range(n // b)] for p in range(m // b)])
    np.testing.assert_allclose(S.dense().detach().numpy(), ref)


def _skew_by_definition(v):
    N = len(v)
    Z = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            Z[i, j] = v[i - j] if i >= j else -v[N + i - j]
    return Z


@pytest.mark.parametrize("m,n", [(7, 7), (6, 6), (4, 9), (9, 4)])
def test_skew_circulant_matches_definition(m, n):
    S = structured.make("skew_circulant", m, n, init="random", dtype=F64)
    v = S.weight.detach().reshape(-1).numpy()
    np.testing.assert_allclose(S.dense().detach().numpy(), _crop(_skew_by_definition(v), m, n))


def test_skew_circulant_blocks_match_definition():
    S = structured.make("skew_circulant", 6, 9, block_size=3, init="random", dtype=F64)
    w = S.weight.detach().numpy()
    ref = np.block([[_skew_by_definition(w[p, q]) for q in range(3)] for p in range(2)])
    np.testing.assert_allclose(S.dense().detach().numpy(), ref)


@pytest.mark.parametrize("m,n", [(7, 7), (6, 6), (4, 9), (9, 4), (1, 5)])
def test_toeplitz_is_scipy_toeplitz(m, n):
    S = structured.make("toeplitz", m, n, init="random", dtype=F64)
    t = S.weight.detach().numpy()  # t[k + n - 1] = t_k
    first_col = t[n - 1 :]  # t_0 .. t_{m-1}
    first_row = t[n - 1 :: -1]  # t_0, t_{-1}, .., t_{-(n-1)}
    np.testing.assert_allclose(S.dense().detach().numpy(), scipy.linalg.toeplitz(first_col, first_row))


@pytest.mark.parametrize("m,n", [(7, 7), (6, 6), (4, 9), (9, 4)])
def test_symmetric_toeplitz_is_scipy_toeplitz(m, n):
    S = structured.make("symmetric_toeplitz", m, n, init="random", dtype=F64)
    s = S.weight.detach().numpy()
    np.testing.assert_allclose(S.dense().detach().numpy(), scipy.linalg.toeplitz(s[:m], s[:n]))
    if m == n:
        np.testing.assert_allclose(S.dense().detach().numpy(), S.dense().detach().numpy().T)


@pytest.mark.parametrize("m,n,terms", [(6, 6, 1), (12, 8, 2), (7, 7, 1), (8, 20, 3)])
def test_kronecker_is_torch_kron(m, n, terms):
    S = structured.make("kronecker", m, n, terms=terms, init="random", dtype=F64)
    ref = sum(torch.kron(S.A[k], S.B[k]) for k in range(terms))
    torch.testing.assert_close(S.dense(), ref)


def test_kronecker_explicit_factors():
    S = structured.make("kronecker", 6, 8, factors=((3, 2), (2, 4)), init="random", dtype=F64)
    assert S.A.shape == (1, 3, 2) and S.B.shape == (1, 2, 4)
    torch.testing.assert_close(S.dense(), torch.kron(S.A[0], S.B[0]))


@pytest.mark.parametrize("m,n,r", [(5, 5, 1), (6, 6, 3), (4, 7, 2), (7, 4, 2)])
def test_ldr_is_sum_of_circulant_times_skew(m, n, r):
    S = structured.make("ldr", m, n, rank=r, init="random", dtype=F64)
    G, H = S.G.detach().numpy(), S.H.detach().numpy()
    full = sum(scipy.linalg.circulant(G[i]) @ _skew_by_definition(H[i]) for i in range(r))
    np.testing.assert_allclose(S.dense().detach().numpy(), _crop(full, m, n), atol=1e-12)


@pytest.mark.parametrize("n", [5, 8])
def test_ldr_has_low_displacement_rank(n):
    """Z_1 W - W Z_-1 has rank <= r for the unit f-circulant shift matrices Z_f."""
    r = 2
    W = structured.make("ldr", n, n, rank=r, init="random", dtype=F64).dense().detach().numpy()

    def shift(f):
        Z = np.diag(np.ones(n - 1), -1)
        Z[0, -1] = f
        return Z

    disp = shift(1) @ W - W @ shift(-1)
    assert np.linalg.matrix_rank(disp, tol=1e-9) <= r


def test_low_rank_is_b_times_a():
    S = structured.make("low_rank", 6, 9, rank=2, init="random", dtype=F64)
    torch.testing.assert_close(S.dense(), S.B @ S.A)
    assert torch.linalg.matrix_rank(S.dense()) == 2
