"""The fused parallel layer ``F.linear(x, W0 + scale * S, b0)`` and the family adjoints behind it."""

import pytest
import torch

from surm import structured
from surm.structured import _fft, circulant, fused, ldr, toeplitz

from .cases import CASES, IDS

F64 = torch.float64
SCALE = 0.7
ROUTE_FAMILIES = (
    structured.Circulant, structured.SkewCirculant, structured.Toeplitz, structured.LDR,
    structured.CirculantProduct, structured.SkewCirculantProduct,
)


def _methods(S):
    """The adjoint routes a family offers (``method=`` of param_grads), or [None]."""
    if isinstance(S, ROUTE_FAMILIES):
        return ["fft", "matmul", "auto"]
    return [None]


def _param_grads(S, x, g, method):
    return S.param_grads(x, g) if method is None else S.param_grads(x, g, method=method)


# -- the family additions: merge and param_grads ------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_is_weight_plus_scaled_dense(case):
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    W = torch.randn(m, n, dtype=F64)
    torch.testing.assert_close(S.merge(W, SCALE), W + SCALE * S.dense(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_param_grads_match_the_dense_fallback(case):
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    x = torch.randn(3, 5, n, dtype=F64)
    g = torch.randn(3, 5, m, dtype=F64)
    ref = S.dense_param_grads(x, g)
    # the fallback is the autograd gradient of sum g . (x S^T)
    auto = torch.autograd.grad((g * (x @ S.dense().T)).sum(), list(S.parameters()))
    for a, b in zip(ref, auto):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for method in _methods(S):
        got = _param_grads(S, x, g, method)
        assert len(got) == len(ref) == len(S.param_names())
        for a, b, p in zip(got, ref, S.parameters()):
            assert a.shape == p.shape and a.dtype == p.dtype
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} {method}")


@pytest.mark.parametrize("module", [circulant, toeplitz, ldr])
@pytest.mark.parametrize(
    "name,knobs",
    [("circulant", {}), ("circulant", {"block_size": 3}), ("skew_circulant", {"block_size": 3}),
     ("skew_circulant", {}), ("toeplitz", {}), ("symmetric_toeplitz", {}), ("ldr", {"rank": 2})],
)
def test_fft_adjoints_accumulate_over_token_chunks(monkeypatch, module, name, knobs):
    """Many tokens, tiny chunks: the frequency-domain sums over chunks equal the one-shot result."""
    for where in (module, _fft):  # the shared cross-correlation chunks in _fft
        monkeypatch.setattr(where, "chunk_rows", lambda size, budget=0: 3, raising=False)
    S = structured.make(name, 9, 6, init="random", dtype=F64, **knobs)
    x, g = torch.randn(11, 6, dtype=F64), torch.randn(11, 9, dtype=F64)
    for a, b in zip(S.param_grads(x, g, method="fft"), S.dense_param_grads(x, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", structured.names())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_param_grads_half_inputs(name, dtype):
    """Half-precision tokens: the adjoint runs in float32 and returns the parameters' dtype."""
    S = structured.make(name, 24, 16, init="random")
    x, g = torch.randn(40, 16), torch.randn(40, 24)
    ref = S.dense_param_grads(x, g)
    for method in _methods(S):
        got = _param_grads(S, x.to(dtype), g.to(dtype), method)
        for a, b in zip(got, ref):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_adjoint_method_cost_model():
    """The CPU cost model picks FFTs for big circulants, matmuls elsewhere and for LDR at many tokens."""
    assert structured.make("circulant", 768, 768).adjoint_method(4096) == "fft"
    assert structured.make("toeplitz", 384, 384).adjoint_method(4096) == "matmul"
    assert structured.make("ldr", 384, 384).adjoint_method(4096) == "matmul"
    assert structured.make("ldr", 384, 384).adjoint_method(8) == "fft"
    assert structured.make("circulant", 768, 768).adjoint_method(4096, device="meta") == "matmul"


def test_param_grads_errors():
    S = structured.make("toeplitz", 6, 4)
    with pytest.raises(ValueError, match="output gradient of shape"):
        S.param_grads(torch.randn(3, 4), torch.randn(2, 6))
    with pytest.raises(ValueError, match="method must be"):
        S.param_grads(torch.randn(3, 4), torch.randn(3, 6), method="magic")
    with pytest.raises(ValueError, match="cannot merge"):
        S.merge(torch.randn(4, 6))


# -- the fused function ---------------------------------------------------------------------------


def _inputs(m, n, *, lead=(3, 2), weight_grad=True, bias=True, dtype=F64):
    x = torch.randn(*lead, n, dtype=dtype, requires_grad=True)
    W = torch.randn(m, n, dtype=dtype, requires_grad=weight_grad)
    b = torch.randn(m, dtype=dtype, requires_grad=weight_grad) if bias else None
    return x, W, b


def _grads(y, inputs, g):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(y, wanted, g)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fused_matches_plain_values_and_all_gradients(case):
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    x, W, b = _inputs(m, n)
    params = list(S.parameters())
    y_fused = structured.fused_parallel_linear(x, W, b, S, SCALE)
    y_plain = structured.plain_parallel_linear(x, W, b, S, SCALE)
    assert y_fused.shape == (3, 2, m)
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y_plain)
    for a, c in zip(_grads(y_fused, [x, W, b, *params], g), _grads(y_plain, [x, W, b, *params], g)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] * c[2] <= 80], ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-{c[3]}")
def test_gradcheck_fused_function(case):
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    x, W, b = _inputs(m, n, lead=(2,))
    params = list(S.parameters())  # gradcheck perturbs these in place: the ones S uses

    def f(x, W, b, *ps):
        return structured.fused_parallel_linear(x, W, b, S, SCALE)

    assert torch.autograd.gradcheck(f, (x, W, b, *params))


@pytest.mark.parametrize("name", structured.names())
def test_gradcheck_frozen_base_without_bias(name):
    S = structured.make(name, 5, 7, init="random", dtype=F64)
    x, W, _ = _inputs(5, 7, lead=(2, 3), weight_grad=False, bias=False)

    def f(x, *ps):
        return structured.fused_parallel_linear(x, W, None, S, -1.5)

    assert torch.autograd.gradcheck(f, (x, *S.parameters()))


@pytest.mark.parametrize("name", structured.names())
@pytest.mark.parametrize("shape", [(7,), (1, 7), (2, 3, 4, 7)])
def test_batch_dims_and_frozen_parts(name, shape):
    S = structured.make(name, 6, 7, init="random", dtype=F64)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    W = torch.randn(6, 7, dtype=F64)
    y = structured.fused_parallel_linear(x, W, None, S, 2)
    torch.testing.assert_close(y, x @ (W + 2 * S.dense()).T)
    y.sum().backward()  # an expanded (stride 0) upstream gradient
    torch.testing.assert_close(x.grad, torch.ones(*shape[:-1], 6, dtype=F64) @ (W + 2 * S.dense()))
    assert W.grad is None
    # frozen structure, input without grad: no gradient at all is asked for
    for p in S.parameters():
        p.requires_grad_(False)
    assert not structured.fused_parallel_linear(x.detach(), W, None, S, 2).requires_grad


@pytest.mark.parametrize("name", structured.names())
def test_only_some_parameters_trainable(name):
    S = structured.make(name, 6, 8, init="random", dtype=F64)
    params = list(S.parameters())
    params[0].requires_grad_(False)
    x, W, b = _inputs(6, 8, weight_grad=False)
    y = structured.fused_parallel_linear(x, W, b, S, SCALE)
    y_ref = structured.plain_parallel_linear(x, W, b, S, SCALE)
    g = torch.randn_like(y)
    wanted = [x, *params[1:]]
    for a, c in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(y_ref, wanted, g)):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("name", structured.names())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", [torch.float32, "same"])
def test_half_precision(name, dtype, param_dtype):
    """bf16/fp16 x and base weight, fp32 or half structured parameters: output and every gradient
    in its input's dtype, close to the float32 computation."""
    param_dtype = dtype if param_dtype == "same" else param_dtype
    m, n = 48, 32
    S32 = structured.make(name, m, n, init="random")
    S = structured.make(name, m, n, init="random", dtype=param_dtype)
    with torch.no_grad():
        for p, q in zip(S.parameters(), S32.parameters()):
            p.copy_(q)
            q.copy_(p.float())  # the same (rounded) values in both
    x32, W32, b32 = _inputs(m, n, lead=(4, 5), dtype=torch.float32)
    with torch.no_grad():
        W32.copy_(W32.to(dtype).float())
        b32.copy_(b32.to(dtype).float())
        x32.copy_(x32.to(dtype).float())
    x = x32.detach().to(dtype).requires_grad_()
    W = W32.detach().to(dtype).requires_grad_()
    b = b32.detach().to(dtype).requires_grad_()
    y = structured.fused_parallel_linear(x, W, b, S, SCALE)
    y32 = structured.fused_parallel_linear(x32, W32, b32, S32, SCALE)
    assert y.dtype == dtype
    tol = {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(y.float(), y32, **tol)
    torch.testing.assert_close(y32, structured.plain_parallel_linear(x32, W32, b32, S32, SCALE), rtol=1e-4, atol=1e-4)
    g32 = torch.randn_like(y32).to(dtype).float()
    grads = torch.autograd.grad(y, [x, W, b, *S.parameters()], g32.to(dtype))
    grads32 = torch.autograd.grad(y32, [x32, W32, b32, *S32.parameters()], g32)
    for a, c, inp in zip(grads, grads32, [x, W, b, *S.parameters()]):
        assert a.dtype == inp.dtype
        scale = c.abs().max().item() + 1e-6
        torch.testing.assert_close(a.float() / scale, c / scale, **tol)


@pytest.mark.parametrize("name", ["circulant", "toeplitz", "kronecker", "ldr", "low_rank"])
def test_saves_only_x_and_parameters(name):
    """No FFT intermediates, no fp32 copy of a bf16 x, no m x n matrix."""
    S = structured.make(name, 48, 32, init="random")
    W, b = torch.randn(48, 32, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = structured.fused_parallel_linear(x, W, b, S, SCALE)
    known = {t.untyped_storage().data_ptr() for t in [x, W, *S.parameters()]}
    assert {t.untyped_storage().data_ptr() for t in saved} <= known
    assert any(t is x for t in saved)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("name", structured.names())
def test_functional_call_substitutes_parameters(name):
    """Under torch.func.functional_call the fused layer uses (and differentiates) the substitutes."""
    S = structured.make(name, 6, 5, init="random", dtype=F64)
    subs = {k: torch.randn_like(v, requires_grad=True) for k, v in S.named_parameters()}
    x, W, b = _inputs(6, 5, weight_grad=False)

    class Layer(torch.nn.Module):
        def __init__(self, S, fn):
            super().__init__()
            self.S, self.fn = S, fn

        def forward(self, x):
            return self.fn(x, W, b, self.S, SCALE)

    named = {f"S.{k}": v for k, v in subs.items()}
    y = torch.func.functional_call(Layer(S, structured.fused_parallel_linear), named, (x,))
    y_ref = torch.func.functional_call(Layer(S, structured.plain_parallel_linear), named, (x,))
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    wanted = [x, *subs.values()]
    for a, c in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(y_ref, wanted, g)):
        torch.testing.assert_close(a, c)


def test_shape_errors_name_the_fix():
    S = structured.make("circulant", 6, 4)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"weight of shape \(4, 6\).*\(6, 4\)"):
        structured.fused_parallel_linear(x, torch.randn(4, 6), None, S, 1.0)
    with pytest.raises(ValueError, match=r"bias of shape \(4,\)"):
        structured.fused_parallel_linear(x, torch.randn(6, 4), torch.randn(4), S, 1.0)
    with pytest.raises(ValueError, match="in_features=4"):
        structured.fused_parallel_linear(torch.randn(2, 5), torch.randn(6, 4), None, S, 1.0)


def test_policy_and_dispatch():
    S = structured.make("circulant", 384, 384)
    assert fused.prefer_fused(S, 4096) is True
    assert fused.prefer_fused(S, 1) is False
    # monotone in the number of tokens, for every family, training and inference
    for name in structured.names():
        T = structured.make(name, 96, 64)
        for backward in (True, False):
            picks = [fused.prefer_fused(T, t, backward=backward) for t in (1, 4, 16, 64, 256, 1024, 4096)]
            assert picks == sorted(picks) and picks[-1]
    S64 = structured.make("toeplitz", 6, 4, init="random", dtype=F64)
    x, W, b = _inputs(6, 4, weight_grad=False)
    ref = structured.plain_parallel_linear(x, W, b, S64, SCALE)
    for choice in (None, True, False):
        torch.testing.assert_close(structured.parallel_linear(x, W, b, S64, SCALE, fused=choice), ref)


@pytest.mark.parametrize("name", ["ldr", "circulant", "toeplitz", "kronecker"])
def test_fused_parameter_gradients_have_the_parameters_strides(name):
    S = structured.make(name, 4, 32, init="random")
    weight = torch.randn(4, 32)
    x = torch.randn(6, 32)
    fused.fused_parallel_linear(x, weight, None, S, 0.5).sum().backward()
    for p in S.parameters():
        assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())
