"""torch.compile (inductor, CPU) of every family: both parallel-linear paths, forward and backward,
and each adjoint route of ``param_grads``, compiled as one graph (``fullgraph=True``: no graph
break, no mutation of an ``as_strided`` view that functionalization rejects), equal to eager and
to the dense reference. Small shapes, the dynamo caches reset around each test, to bound the
compile time."""

import pytest
import torch
import torch.nn.functional as F

from surm import structured

# inductor falls back to eager kernels for the complex (FFT-domain) ops and says so
pytestmark = pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex")

SCALE = 0.5
TOL = {"rtol": 1e-4, "atol": 1e-5}

# (name, m, n, knobs): every family, rectangular; the block (C3A) circulant layout. The route test
# adds the block skew-circulant and the LDR whose merge and adjoint go by rows (2m < n).
CASES = [
    ("circulant", 12, 8, {}),
    ("circulant", 8, 8, {"block_size": 4}),
    ("skew_circulant", 8, 12, {}),
    ("toeplitz", 12, 8, {}),
    ("symmetric_toeplitz", 8, 12, {}),
    ("kronecker", 12, 8, {"terms": 2}),
    ("ldr", 12, 8, {"rank": 2}),
    ("low_rank", 12, 8, {"rank": 2}),
    ("skew_circulant_product", 12, 8, {}),
    ("toeplitz_product", 8, 12, {}),
]
ROUTE_CASES = [c for c in CASES if c[0] not in ("kronecker", "low_rank", "toeplitz_product")] + [
    ("skew_circulant", 8, 8, {"block_size": 4}),
    ("ldr", 4, 12, {"rank": 1}),
]


def _id(case):
    name, m, n, knobs = case
    return f"{name}-{m}x{n}" + "".join(f"-{k}={v}" for k, v in knobs.items())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_close_all(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what} #{i}: {m}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_parallel_linear_compiles(case, fused):
    """``parallel_linear(fused=True/False)`` compiled: output, and the gradients of x, the base
    weight and bias and the structure's parameters, equal eager's and the dense reference's."""
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", **knobs)
    W = torch.randn(m, n, requires_grad=True)
    b = torch.randn(m, requires_grad=True)
    x = torch.randn(2, 3, n, requires_grad=True)

    def layer(x):
        return structured.parallel_linear(x, W, b, S, SCALE, fused=fused)

    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    wanted = [x, W, b, *S.parameters()]
    y = compiled(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, wanted, g)
    y_eager = layer(x)
    y_dense = F.linear(x, W + SCALE * S.dense(), b)
    torch.testing.assert_close(y, y_eager, **TOL)
    torch.testing.assert_close(y, y_dense, **TOL)
    _assert_close_all(grads, torch.autograd.grad(y_eager, wanted, g), "grad vs eager")
    _assert_close_all(grads, torch.autograd.grad(y_dense, wanted, g), "grad vs dense")


@pytest.mark.parametrize("case", ROUTE_CASES, ids=_id)
def test_adjoint_routes_compile(case):
    """Both routes of ``param_grads``, compiled in one graph (the fused backward picks one by a
    cost model: at these sizes always ``matmul`` for the circulants and Toeplitz): equal to eager
    and to the generic adjoint ``dense_param_grads``."""
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", **knobs)
    x, g = torch.randn(5, n), torch.randn(5, m)

    def adjoints(x, g):
        return S.param_grads(x, g, method="fft"), S.param_grads(x, g, method="matmul")

    got = torch.compile(adjoints, backend="inductor", fullgraph=True)(x, g)
    dense = S.dense_param_grads(x, g)
    for method, grads, eager in zip(("fft", "matmul"), got, adjoints(x, g)):
        _assert_close_all(grads, eager, f"{method} vs eager")
        _assert_close_all(grads, dense, f"{method} vs dense")
