"""bf16 / fp16 inputs: FFTs run in a float32 island, outputs come back in the input's dtype."""

import pytest
import torch

from surm import structured


@pytest.mark.parametrize("name", structured.names())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_return_their_dtype_and_match_float32(name, dtype):
    S = structured.make(name, 24, 16, init="random")
    x = torch.randn(5, 16)
    y = S(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), S(x), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in S.parameters())


@pytest.mark.parametrize("name", structured.names())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameters(name, dtype):
    S = structured.make(name, 12, 12, init="random", dtype=dtype)
    x = torch.randn(3, 12, dtype=dtype, requires_grad=True)
    y = S(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype
    assert all(p.grad.dtype == dtype for p in S.parameters())


@pytest.mark.parametrize("name", structured.names())
def test_float64_parameters_with_float32_input(name):
    S = structured.make(name, 6, 9, init="random", dtype=torch.float64)
    x = torch.randn(2, 9)
    y = S(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (x.double() @ S.dense().T).float())
