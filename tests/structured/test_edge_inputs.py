"""Edge inputs of the families and of the parallel layer: inputs without tokens, a first use under
``torch.inference_mode()``, 0-dim inputs. References: ``x @ S.dense().T`` and ``nn.Linear``."""

import pytest
import torch
import torch.nn.functional as F

from surm import structured
from surm.structured import _fft

from .cases import CASES, IDS

F64 = torch.float64
SCALE = 0.7
EMPTY_LEADS = [(0,), (2, 0)]  # leading dims of an input without tokens
ROUTE_FAMILIES = (
    structured.Circulant, structured.SkewCirculant, structured.Toeplitz, structured.LDR,
    structured.CirculantProduct, structured.SkewCirculantProduct,
)


def _methods(S):
    """The ``method=`` values of S.param_grads (None: the family takes no ``method``)."""
    return ["fft", "matmul", "auto"] if isinstance(S, ROUTE_FAMILIES) else [None]


def _param_grads(S, x, g, method):
    return S.param_grads(x, g) if method is None else S.param_grads(x, g, method=method)


def _assert_zero_grads(grads, params):
    for gr, p in zip(grads, params, strict=True):
        assert gr is not None, "a parameter got no gradient"
        assert gr.shape == p.shape and gr.dtype == p.dtype
        assert torch.count_nonzero(gr) == 0


# -- inputs without tokens ---------------------------------------------------------------------


@pytest.mark.parametrize("lead", EMPTY_LEADS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_product_without_tokens(case, lead):
    """S(x) for x (..., 0 tokens, n) is (..., m), like nn.Linear: empty forward, empty input
    gradient, zero (not missing) parameter gradients, equal to the dense reference's."""
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    x = torch.randn(*lead, n, dtype=F64, requires_grad=True)
    y = S(x)
    assert y.shape == (*lead, m) and y.dtype == F64 and y.requires_grad
    y_ref = x @ S.dense().T
    torch.testing.assert_close(y, y_ref)
    params = list(S.parameters())
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], g)
    assert grads[0].shape == x.shape
    _assert_zero_grads(grads[1:], params)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", structured.names())
def test_product_without_tokens_half_input_and_backward_call(name):
    """bf16 x without tokens, float32 parameters: bf16 output; ``.sum().backward()`` (the usual
    training call) leaves zero gradients on the parameters, as it does on nn.Linear's."""
    S = structured.make(name, 12, 10, init="random")
    x = torch.randn(0, 10, dtype=torch.bfloat16, requires_grad=True)
    y = S(x)
    assert y.shape == (0, 12) and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.shape == (0, 10) and x.grad.dtype == torch.bfloat16
    _assert_zero_grads([p.grad for p in S.parameters()], list(S.parameters()))
    lin = torch.nn.Linear(10, 12)
    lin(x.detach().float()).sum().backward()
    assert lin.weight.grad is not None and torch.count_nonzero(lin.weight.grad) == 0


_PATHS = {
    "fused_parallel_linear": lambda x, W, b, S: structured.fused_parallel_linear(x, W, b, S, SCALE),
    "plain_parallel_linear": lambda x, W, b, S: structured.plain_parallel_linear(x, W, b, S, SCALE),
    "parallel_linear(fused=None)": lambda x, W, b, S: structured.parallel_linear(x, W, b, S, SCALE),
    "parallel_linear(fused=True)": lambda x, W, b, S: structured.parallel_linear(x, W, b, S, SCALE, fused=True),
    "parallel_linear(fused=False)": lambda x, W, b, S: structured.parallel_linear(x, W, b, S, SCALE, fused=False),
}


@pytest.mark.parametrize("path", list(_PATHS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parallel_linear_without_tokens(case, path):
    """Every parallel path on x (2, 0, n): y (2, 0, m), and x, W, b and the structure get the
    gradients of ``F.linear(x, W + scale * S, b)`` (empty, zeros)."""
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    x = torch.randn(2, 0, n, dtype=F64, requires_grad=True)
    W = torch.randn(m, n, dtype=F64, requires_grad=True)
    b = torch.randn(m, dtype=F64, requires_grad=True)
    y = _PATHS[path](x, W, b, S)
    assert y.shape == (2, 0, m) and y.dtype == F64
    y_ref = F.linear(x, W + SCALE * S.dense(), b)
    params = list(S.parameters())
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, W, b, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x, W, b, *params], g)
    _assert_zero_grads(grads[1:], [W, b, *params])
    for a, c in zip(grads, grads_ref, strict=True):
        assert a.shape == c.shape
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_param_grads_without_tokens(case):
    """Every adjoint route on zero tokens: zero gradients, in each parameter's shape and dtype."""
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    x, g = torch.randn(2, 0, n, dtype=F64), torch.randn(2, 0, m, dtype=F64)
    params = list(S.parameters())
    _assert_zero_grads(S.dense_param_grads(x, g), params)
    for method in _methods(S):
        _assert_zero_grads(_param_grads(S, x, g, method), params)
    if isinstance(S, ROUTE_FAMILIES):  # the method is still checked
        with pytest.raises(ValueError, match="method must be"):
            S.param_grads(x, g, method="magic")


@pytest.mark.parametrize("name", ["ldr", "circulant", "toeplitz"])
def test_fused_without_tokens_in_a_batch_with_tokens_elsewhere(name):
    """Zero tokens after calls with tokens (the usual order in training): still zeros, and the
    next call with tokens is unaffected."""
    S = structured.make(name, 12, 10, init="random", dtype=F64)
    W = torch.randn(12, 10, dtype=F64)
    for tokens in (5, 0, 5):
        x = torch.randn(tokens, 10, dtype=F64, requires_grad=True)
        y = structured.fused_parallel_linear(x, W, None, S, SCALE)
        y_ref = structured.plain_parallel_linear(x, W, None, S, SCALE)
        g = torch.randn_like(y)
        wanted = [x, *S.parameters()]
        for a, c in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(y_ref, wanted, g), strict=True):
            torch.testing.assert_close(a, c)


# -- first use of a size under torch.inference_mode() -------------------------------------------


@pytest.fixture
def fresh_fft_caches():
    """The size caches of the FFT helpers are process-global: start this test without entries."""
    for fn in vars(_fft).values():
        if callable(getattr(fn, "cache_clear", None)):
            fn.cache_clear()
    yield


# Sizes used nowhere else in the tests (the caches are process-global), one per case.
_INFERENCE_CASES = [
    ("skew_circulant", 29, 29, {}),
    ("skew_circulant", 31, 17, {}),
    ("skew_circulant", 38, 57, {"block_size": 19}),
    ("ldr", 37, 37, {"rank": 2}),
    ("ldr", 4, 41, {"rank": 1}),  # 2m < n: the merge builds W by rows, through the mask
    ("circulant", 43, 43, {}),
    ("toeplitz", 47, 23, {}),
    ("symmetric_toeplitz", 23, 53, {}),
    ("kronecker", 22, 26, {}),
    ("low_rank", 22, 26, {"rank": 2}),
    ("skew_circulant_product", 59, 59, {}),
    ("toeplitz_product", 61, 31, {}),
]


@pytest.mark.parametrize("case", _INFERENCE_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-{c[3]}" for c in _INFERENCE_CASES])
@pytest.mark.parametrize("path", ["product", "fused"])
def test_inference_mode_first_then_training(fresh_fft_caches, case, path):
    """A size seen first under torch.inference_mode() (evaluation before training, or a serving
    warm-up) must not break later training steps at that size: nothing cached may be an
    inference tensor. float32, where the cached mask itself (not a cast copy) enters the graph."""
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", **knobs)
    W = torch.randn(m, n)

    def run(x):
        if path == "product":
            return S(x)
        return structured.fused_parallel_linear(x, W, None, S, SCALE)

    x = torch.randn(3, n, requires_grad=True)
    with torch.inference_mode():
        y_inf = run(x)
    y = run(x)  # training: x and the parameters require grad
    y_ref = x @ (SCALE * S.dense() + W).T if path == "fused" else x @ S.dense().T
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_inf, y.detach(), rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    wanted = [x, *S.parameters()]
    for a, c in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(y_ref, wanted, g), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


# -- 0-dim inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [None, True, False])
@pytest.mark.parametrize("name", structured.names())
def test_zero_dim_input_gets_the_input_error(name, fused):
    """A 0-dim x is an input error (ValueError naming in_features), on every path: not an
    IndexError from the token count of the fused=None policy."""
    S = structured.make(name, 6, 4)
    W = torch.randn(6, 4)
    match = r"input of shape \(\) has no features.*in_features=4"
    with pytest.raises(ValueError, match=match):
        structured.parallel_linear(torch.tensor(1.0), W, None, S, SCALE, fused=fused)
    with pytest.raises(ValueError, match=match):
        S(torch.tensor(1.0))
