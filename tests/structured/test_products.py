"""The fast product of every family equals the dense reference, in values and gradients."""

import pytest
import torch

from surm import structured

from .cases import CASES, IDS

F64 = torch.float64


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fast_product_matches_dense_values_and_gradients(case):
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    x = torch.randn(3, 2, n, dtype=F64, requires_grad=True)
    fast = S(x)
    assert fast.shape == (3, 2, m)
    dense = S.dense()
    assert dense.shape == (m, n)
    ref = x @ dense.T
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)

    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [x, *S.parameters()], g)
    grads_ref = torch.autograd.grad(x @ S.dense().T, [x, *S.parameters()], g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] * c[2] <= 80], ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-{c[3]}")
def test_gradcheck(case):
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    params = list(S.parameters())
    x = torch.randn(2, n, dtype=F64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(S, dict(zip([k for k, _ in S.named_parameters()], ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in params]))


@pytest.mark.parametrize("name", structured.names())
def test_unbatched_and_many_batch_dims(name):
    S = structured.make(name, 6, 4, init="random", dtype=F64)
    for shape in [(4,), (1, 4), (2, 3, 5, 4)]:
        x = torch.randn(shape, dtype=F64)
        torch.testing.assert_close(S(x), x @ S.dense().T)
