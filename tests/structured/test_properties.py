"""Property-based checks over shapes and knobs (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surm import structured

F64 = torch.float64


@st.composite
def family_shape_knobs(draw):
    name = draw(st.sampled_from(structured.names()))
    m = draw(st.integers(1, 24))
    n = draw(st.integers(1, 24))
    knobs = {}
    if name in ("circulant", "skew_circulant", "circulant_product", "skew_circulant_product") and draw(st.booleans()):
        common = [b for b in range(1, min(m, n) + 1) if m % b == 0 and n % b == 0]
        knobs["block_size"] = draw(st.sampled_from(common))
    elif name == "kronecker":  # knobs the shape can use (larger ones are refused)
        (a1, a2), (b1, b2) = structured.make(name, m, n, device="meta").factors
        knobs["terms"] = draw(st.integers(1, min(3, a1 * a2, b1 * b2)))
    elif name == "ldr":
        knobs["rank"] = draw(st.integers(1, min(4, max(m, n))))
    elif name == "low_rank":
        knobs["rank"] = draw(st.integers(1, min(4, m, n)))
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    return name, m, n, knobs, tuple(batch)


@settings(max_examples=150, deadline=None)
@given(family_shape_knobs())
def test_fast_product_equals_dense(case):
    name, m, n, knobs, batch = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    x = torch.randn(*batch, n, dtype=F64)
    torch.testing.assert_close(S(x), x @ S.dense().T, rtol=1e-9, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(family_shape_knobs())
def test_product_is_linear_in_x(case):
    name, m, n, knobs, batch = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    x1, x2 = torch.randn(2, *batch, n, dtype=F64)
    torch.testing.assert_close(S(2.0 * x1 - x2), 2.0 * S(x1) - S(x2), rtol=1e-9, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(family_shape_knobs())
def test_projection_is_idempotent_and_never_worse_than_zero(case):
    name, m, n, knobs, _ = case
    cls = structured.get(name)
    M = torch.randn(m, n, dtype=F64)
    fitted = name in ("ldr", "toeplitz_product")  # no closed form: a local fit
    extra = {"steps": 20} if fitted else {}
    fit = cls.project(M, **knobs, **extra).dense().detach()
    assert (M - fit).norm() <= M.norm() + 1e-9
    if not fitted:  # closed forms are projections: P(P(M)) = P(M)
        again = cls.project(fit, **knobs).dense().detach()
        torch.testing.assert_close(again, fit, rtol=1e-8, atol=1e-9)
