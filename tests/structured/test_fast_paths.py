"""The fast paths of LLM-size layers, each against its reference: the FFT length of the windowed
products, the one-pass merge into a buffer, the fused layer's reused merge buffer, and the
fused-or-plain rule at SmolLM2's and Llama-2-7B's shapes."""

import pytest
import torch

from surm import structured
from surm.structured import _fft, fused

F64 = torch.float64
SCALE = 0.7


@pytest.mark.parametrize("rows, cols, period, size", [
    (11008, 4096, 11008, 15360),  # 11008 = 2^8 * 43: the smooth embedding of the window is cheaper
    (4096, 11008, 11008, 15360),
    (4096, 4096, 4096, 4096),  # a smooth period is never longer than the embedding
    (384, 1536, 1536, 1536),
    (11008, 4096, None, 15360),  # no period (skew-circulant, Toeplitz): the embedding
    (384, 384, None, 768),
    (7, 7, 7, 7),  # a small prime period still beats an embedding twice as long
])
def test_lag_fft_size(rows, cols, period, size):
    assert _fft.lag_fft_size(rows, cols, period) == size
    assert size >= (rows + cols - 1) or size == period


def test_non_smooth_circulant_uses_the_embedding_and_matches_dense():
    S = structured.make("circulant", 172, 43, init="random", dtype=F64)  # 172 = 4 * 43
    assert S._window_fft_size() == 216
    x = torch.randn(5, 43, dtype=F64, requires_grad=True)
    g = torch.randn(5, 172, dtype=F64)
    want = torch.autograd.grad(x @ S.dense().T, [x, S.weight], g)
    got = torch.autograd.grad(S(x), [x, S.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    (adjoint,) = S.param_grads(x.detach(), g, method="fft")
    torch.testing.assert_close(adjoint, want[1])


def test_add_toeplitz_is_the_dense_sum():
    W = torch.randn(37, 300, dtype=F64)  # more rows than one block of the chunked flip
    v = torch.randn(37 + 300 - 1, dtype=F64)
    out = torch.empty_like(W)
    _fft.add_toeplitz_(out, W, v, SCALE)
    torch.testing.assert_close(out, W + SCALE * _fft.toeplitz_from_lags(v, 37, 300))


MERGE_CASES = [("circulant", {}), ("circulant", {"block_size": 3}), ("skew_circulant", {}), ("toeplitz", {}),
               ("symmetric_toeplitz", {}), ("kronecker", {}), ("kronecker", {"terms": 2}), ("ldr", {"rank": 2}),
               ("low_rank", {"rank": 2}), ("circulant_product", {}), ("toeplitz_product", {})]


@pytest.mark.parametrize("name, knobs", MERGE_CASES, ids=[f"{n}{k}" for n, k in MERGE_CASES])
@pytest.mark.parametrize("m, n", [(6, 9), (9, 6)])
def test_merge_into_a_buffer_equals_merge(name, knobs, m, n):
    S = structured.make(name, m, n, init="random", dtype=F64, **knobs)
    W = torch.randn(m, n, dtype=F64)
    out = torch.full((m, n), float("nan"), dtype=F64)
    assert S.merge(W, SCALE, out=out) is out
    torch.testing.assert_close(out, W + SCALE * S.dense())
    torch.testing.assert_close(out, S.merge(W, SCALE))


def test_fused_layers_of_one_shape_share_the_buffer_correctly(monkeypatch):
    """Two adapters of the same shape, one after the other, forward and backward (float32, the
    dtype that uses the reused buffer, here at any size): each against its dense reference."""
    monkeypatch.setattr(fused, "_WORKSPACE_MIN_BYTES", 0)
    torch.manual_seed(0)
    layers = [(structured.make(name, 12, 8, init="random"), torch.randn(12, 8)) for name in ("circulant", "toeplitz")]
    x = torch.randn(4, 8, requires_grad=True)
    workspace = structured.MergeWorkspace()
    ys = [structured.fused_parallel_linear(x, W, None, S, SCALE, workspace=workspace) for S, W in layers]
    loss = sum((y * (i + 1)).sum() for i, y in enumerate(ys))
    grads = torch.autograd.grad(loss, [x, *(S.weight for S, _ in layers)])
    ref_ys = [x @ (W + SCALE * S.dense()).T for S, W in layers]
    ref_loss = sum((y * (i + 1)).sum() for i, y in enumerate(ref_ys))
    ref = torch.autograd.grad(ref_loss, [x, *(S.weight for S, _ in layers)])
    for a, b in zip([*ys, *grads], [*ref_ys, *ref]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert workspace.held_bytes() == 12 * 8 * 4  # one float32 buffer, shared by both layers


LLM_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]


@pytest.mark.parametrize("m, n", LLM_SHAPES)
def test_path_rule_at_llm_shapes(m, n):
    """Training at 2048 tokens (the LLM benchmark): the fused path for the families with an O(m n)
    merge, which it beats plain by 10-20 % at Llama-2-7B's FFN shapes; LDR stays plain there
    (its merge transforms n columns). Below the crossover (about 500 tokens) plain."""
    meta = {"device": "meta"}
    for name in ("circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "kronecker"):
        S = structured.make(name, m, n, **meta)
        assert fused.prefer_fused(S, 2048), name
        assert not fused.prefer_fused(S, 64), name
    if min(m, n) >= 4096:
        assert not fused.prefer_fused(structured.make("ldr", m, n, rank=1, **meta), 2048)


def test_path_rule_at_minilm_shapes_is_the_fitted_one():
    """Below the cap the rule is k * sqrt(m n), as fitted at MiniLM's shapes."""
    S = structured.make("circulant", 384, 384, device="meta")
    assert not fused.prefer_fused(S, 172) and fused.prefer_fused(S, 173)
    T = structured.make("toeplitz", 1536, 384, device="meta")
    assert not fused.prefer_fused(T, 214) and fused.prefer_fused(T, 216)


@pytest.mark.parametrize("m, n", [(172, 43), (43, 172), (12, 12)])
@pytest.mark.parametrize("x_grad", [True, False])
def test_ldr_chunked_product_and_the_composed_one_match_dense(m, n, x_grad):
    """LDR's product (its own backward, token chunks) and the torch-composed one that
    torch.compile traces: values and gradients against the dense matrix, float64, tokens in
    leading dims and more tokens than one chunk."""
    S = structured.make("ldr", m, n, rank=2, init="random", dtype=F64)
    x = torch.randn(3, 700, n, dtype=F64, requires_grad=x_grad)
    g = torch.randn(3, 700, m, dtype=F64)
    wanted = [x, S.G, S.H] if x_grad else [S.G, S.H]
    ref = torch.autograd.grad(x @ S.dense().T, wanted, g)
    for product in (S, S._product_composed):
        y = product(x)
        torch.testing.assert_close(y, x @ S.dense().T)
        for a, b in zip(torch.autograd.grad(y, wanted, g), ref):
            torch.testing.assert_close(a, b)
