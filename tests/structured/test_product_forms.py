"""The product forms: circulant_product, skew_circulant_product (``Z_f(a * b)``) and
toeplitz_product (``T(b) T(a)``, symmetric Toeplitz factors), against their definitions."""

import numpy as np
import pytest
import scipy.linalg
import torch

from surm import structured
from surm.structured import circulant, products

F64 = torch.float64
SHAPES = [(6, 6), (5, 9), (12, 7)]
CIRCULANT_PRODUCTS = ["circulant_product", "skew_circulant_product"]
NAMES = [*CIRCULANT_PRODUCTS, "toeplitz_product"]


def _linear_of(name):
    return {"circulant_product": structured.Circulant, "skew_circulant_product": structured.SkewCirculant}[name]


def _reference(S):
    """The matrix by its definition, in numpy."""
    m, n = S.shape
    a, b = S.a.detach().numpy(), S.b.detach().numpy()
    if S.name == "toeplitz_product":
        return (scipy.linalg.toeplitz(b) @ scipy.linalg.toeplitz(a))[:m, :n]  # first row = first column
    # Z_f(a * b), one N x N block: entry (i, j) = c[i - j] for i >= j, f * c[N + i - j] otherwise
    c = (a * b).reshape(-1)
    N = c.size
    i, j = np.indices((N, N))
    Z = np.where(i >= j, 1.0, S.f) * c[(i - j) % N]
    return Z[:m, :n]


# -- definitions, fast product, merge, adjoint ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m,n", SHAPES)
def test_dense_is_the_definition(name, m, n):
    S = structured.make(name, m, n, init="random", dtype=F64)
    np.testing.assert_allclose(S.dense().detach().numpy(), _reference(S), rtol=1e-12, atol=1e-12)
    assert S.num_params == 2 * max(m, n)
    assert not isinstance(S, structured.LinearStructuredMatrix)


@pytest.mark.parametrize("name", CIRCULANT_PRODUCTS)
def test_circulant_product_is_the_circulant_of_a_times_b(name):
    for knobs in ({}, {"block_size": 3}):
        S = structured.make(name, 6, 9, init="random", dtype=F64, **knobs)
        C = structured.make(name.removesuffix("_product"), 6, 9, dtype=F64, **knobs)
        with torch.no_grad():
            C.weight.copy_(S.a * S.b)
        torch.testing.assert_close(S.dense(), C.dense(), rtol=0, atol=0)
        torch.testing.assert_close(S.weight, S.a * S.b)
        assert S.a.shape == S.b.shape == C.weight.shape
        assert S.knobs() == {"block_size": knobs.get("block_size")}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m,n", SHAPES)
def test_fast_product_gradcheck(name, m, n):
    """Values and gradients (x, a, b) of the fast product: torch.autograd.gradcheck, and the
    dense reference's gradients of a random loss."""
    S = structured.make(name, m, n, init="random", dtype=F64)
    x = torch.randn(3, n, dtype=F64, requires_grad=True)

    def f(x, a, b):
        return torch.func.functional_call(S, {"a": a, "b": b}, (x,))

    a, b = (p.detach().requires_grad_() for p in (S.a, S.b))
    assert torch.autograd.gradcheck(f, (x, a, b))
    y = S(x)
    torch.testing.assert_close(y, x @ S.dense().T, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    fast = torch.autograd.grad(y, [x, S.a, S.b], g)
    ref = torch.autograd.grad(x @ S.dense().T, [x, S.a, S.b], g)
    for u, v in zip(fast, ref):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m,n", [*SHAPES, (1, 1), (1, 7), (7, 1), (2, 16), (16, 3)])
def test_merge_is_weight_plus_scaled_dense(name, m, n):
    S = structured.make(name, m, n, init="random", dtype=F64)
    W = torch.randn(m, n, dtype=F64)
    torch.testing.assert_close(S.merge(W, 0.3), W + 0.3 * S.dense(), rtol=1e-12, atol=1e-12)
    half = S.merge(W, -2.0, dtype=torch.float32)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, (W - 2.0 * S.dense()).float())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m,n", [*SHAPES, (1, 5), (5, 1), (16, 3)])
def test_param_grads_are_the_dense_adjoint(name, m, n):
    S = structured.make(name, m, n, init="random", dtype=F64)
    x, g = torch.randn(4, 3, n, dtype=F64), torch.randn(4, 3, m, dtype=F64)
    ref = S.dense_param_grads(x, g)
    routes = [{"method": r} for r in ("fft", "matmul", "auto")] if name in CIRCULANT_PRODUCTS else [{}]
    for route in routes:
        for got, want in zip(S.param_grads(x, g, **route), ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CIRCULANT_PRODUCTS)
def test_circulant_product_adjoint_accumulates_over_token_chunks(monkeypatch, name):
    monkeypatch.setattr(circulant, "chunk_rows", lambda size, budget=0: 3)
    for knobs in ({}, {"block_size": 3}):
        S = structured.make(name, 9, 6, init="random", dtype=F64, **knobs)
        x, g = torch.randn(11, 6, dtype=F64), torch.randn(11, 9, dtype=F64)
        for got, want in zip(S.param_grads(x, g, method="fft"), S.dense_param_grads(x, g)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_diagonal_prefix_sums_and_their_adjoint():
    for m, n in [(1, 1), (1, 4), (4, 1), (5, 8), (8, 5)]:
        R = torch.randn(m, n, dtype=F64)
        want = torch.zeros(m, n, dtype=F64)
        for i in range(m):
            for j in range(n):
                want[i, j] = sum(R[i - t, j - t] for t in range(min(i, j) + 1))
        torch.testing.assert_close(products._diagonal_cumsum(R), want)
        G = torch.randn(m, n, dtype=F64)
        forward = (products._diagonal_cumsum(R) * G).sum()
        torch.testing.assert_close(forward, (R * products._diagonal_cumsum_reverse(G)).sum())


# -- init and update energy ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m,n", SHAPES)
def test_zero_init_is_zero_and_moves_b(name, m, n):
    S = structured.make(name, m, n, dtype=F64)
    assert S.a.any() and not S.b.any()
    x = torch.randn(5, n, dtype=F64)
    y = S(x)
    assert torch.equal(y, torch.zeros_like(y))
    (y * torch.randn_like(y)).sum().backward()
    assert not S.a.grad.any()  # b = 0: a does not move S
    assert S.b.grad.norm() > 0


def _jacobian_energy(S):
    """``sum_p ||dS/dp||_F^2 / (m n)`` at S's current parameters, by autograd Jacobians."""
    m, n = S.shape
    params = tuple(p.detach() for p in S.parameters())
    jac = torch.autograd.functional.jacobian(lambda *ps: S._dense_with(list(ps)), params)
    return sum(float(j.pow(2).sum()) for j in jac) / (m * n)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m,n", [*SHAPES, (16, 4), (3, 11)])
def test_update_energy_is_the_expected_jacobian_energy(name, m, n):
    """Exactly: the energy is a quadratic form in the random factor a, so its expectation over
    the zero init's a ~ N(0, I) is the sum of its values at the unit vectors a = e_j. And by
    Monte Carlo over zero inits (400 draws, within 10 %)."""
    S = structured.make(name, m, n, dtype=F64)
    exact = 0.0
    for j in range(S.a.numel()):
        with torch.no_grad():
            S.a.zero_()
            S.a.view(-1)[j] = 1.0
        exact += _jacobian_energy(S)
    assert exact == pytest.approx(S.update_energy(), rel=1e-12)
    draws = []
    for seed in range(400):
        torch.manual_seed(seed)
        draws.append(_jacobian_energy(structured.make(name, m, n, dtype=F64)))
    assert np.mean(draws) == pytest.approx(S.update_energy(), rel=0.1)


def test_toeplitz_product_update_energy_closed_form():
    # square N: D = sum_i min(i, N - 1 - i); E = N + 2 D / N^2
    S = structured.make("toeplitz_product", 6, 6)
    assert S.update_energy() == pytest.approx(6 + 2 * (0 + 1 + 2 + 2 + 1 + 0) / 6**2)
    assert structured.make("toeplitz_product", 1, 9).update_energy() == 9.0
    assert structured.make("circulant_product", 5, 9, init="random").update_energy() == 1.0


# -- projection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CIRCULANT_PRODUCTS)
@pytest.mark.parametrize("m,n,knobs", [(6, 6, {}), (5, 9, {}), (12, 7, {}), (6, 9, {"block_size": 3})])
def test_circulant_product_projection(name, m, n, knobs):
    """Exact on members; the f-circulant's least-squares fit on anything else."""
    cls = structured.get(name)
    member = structured.make(name, m, n, init="random", dtype=F64, **knobs).dense().detach()
    P = cls.project(member, **knobs)
    assert P.shape == (m, n) and P.knobs() == {"block_size": knobs.get("block_size")}
    torch.testing.assert_close(P.dense().detach(), member, rtol=1e-12, atol=1e-14)
    M = torch.randn(m, n, dtype=F64)
    ours = cls.project(M, **knobs).dense().detach()
    torch.testing.assert_close(ours, _linear_of(name).project(M, **knobs).dense().detach())


@pytest.mark.parametrize("name", CIRCULANT_PRODUCTS)
def test_circulant_product_projection_keeps_every_coefficient_trainable(name):
    """Where the fitted coefficient is 0, a = 1 and b = 0 (not both 0, where no gradient reaches)."""
    P = structured.get(name).project(torch.zeros(4, 6))
    assert torch.equal(P.a, torch.ones_like(P.a)) and not P.b.any()
    x = torch.randn(3, 6)
    (P(x) * torch.randn(3, 4)).sum().backward()
    assert P.b.grad.norm() > 0


@pytest.mark.parametrize("m,n", [(6, 6), (5, 9), (12, 7), (16, 16), (9, 20)])
@pytest.mark.parametrize("seed", [0, 1])
def test_toeplitz_product_projection_recovers_a_member(m, n, seed):
    torch.manual_seed(seed)
    member = structured.make("toeplitz_product", m, n, init="random", dtype=F64).dense().detach()
    P = structured.ToeplitzProduct.project(member)
    assert P.shape == (m, n) and P.a.dtype == F64
    error = float((P.dense().detach() - member).norm() / member.norm())
    symmetric = structured.SymmetricToeplitz.project(member).dense().detach()
    symmetric_error = float((symmetric - member).norm() / member.norm())
    assert error < 1e-4
    assert symmetric_error > 0.1  # a product form is far from symmetric Toeplitz
    torch.testing.assert_close(P.a.norm(), P.b.norm())  # balanced factors


@pytest.mark.parametrize("m,n", [(6, 6), (5, 9), (12, 7)])
def test_toeplitz_product_projection_of_any_matrix(m, n):
    """Never worse than the symmetric-Toeplitz projection (its start); repeatable (no global RNG;
    BLAS threading may still change the last bits, which L-BFGS amplifies a little); keeps M's
    dtype; ``steps=0`` is that projection."""
    from surm.harness.threads import torch_threads

    M = torch.randn(m, n, dtype=F64, generator=torch.Generator().manual_seed(m * 100 + n))
    with torch_threads(1):  # the same BLAS reduction order in both fits
        P = structured.ToeplitzProduct.project(M)
        torch.manual_seed(123)  # the fit does not depend on the global RNG
        again = float((structured.ToeplitzProduct.project(M).dense().detach() - M).norm())
    symmetric = structured.SymmetricToeplitz.project(M).dense().detach()
    error = float((P.dense().detach() - M).norm())
    assert error <= float((symmetric - M).norm()) + 1e-12
    assert again == pytest.approx(error, rel=1e-9)
    torch.testing.assert_close(structured.ToeplitzProduct.project(M, steps=0).dense(), symmetric)
    P32 = structured.ToeplitzProduct.project(M.float(), steps=10)
    assert P32.a.dtype == torch.float32 and P32.shape == (m, n)


def test_toeplitz_product_projection_steps_must_be_a_count():
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        structured.ToeplitzProduct.project(torch.randn(4, 4), steps=-1)
