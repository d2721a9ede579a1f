"""Parameter counts follow the families' formulas; zero init is an exact zero with a live gradient."""

import math

import pytest
import torch

from surm import structured

from .cases import CASES, IDS


def expected_params(name, m, n, knobs):
    if name in ("circulant", "skew_circulant"):
        b = knobs.get("block_size")
        return max(m, n) if b is None else m * n // b
    if name in ("circulant_product", "skew_circulant_product"):
        b = knobs.get("block_size")
        return 2 * (max(m, n) if b is None else m * n // b)
    if name == "toeplitz_product":
        return 2 * max(m, n)
    if name == "toeplitz":
        return m + n - 1
    if name == "symmetric_toeplitz":
        return max(m, n)
    if name == "kronecker":
        (a1, a2), (b1, b2) = knobs.get("factors") or structured.auto_factors(m, n)
        return knobs.get("terms", 1) * (a1 * a2 + b1 * b2)
    if name == "ldr":
        return 2 * knobs.get("rank", 1) * max(m, n)
    if name == "low_rank":
        return knobs.get("rank", 8) * (m + n)
    raise AssertionError(name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_num_params_matches_formula(case):
    name, m, n, knobs = case
    S = structured.make(name, m, n, **knobs)
    assert S.num_params == expected_params(name, m, n, knobs)
    assert S.num_params == sum(p.numel() for p in S.parameters() if p.requires_grad)


def test_paper_sizes():
    assert structured.make("circulant", 768, 768).num_params == 768
    assert structured.make("toeplitz", 768, 768).num_params == 1535
    assert structured.make("ldr", 768, 768, rank=2).num_params == 4 * 768
    assert structured.make("circulant", 1536, 384, block_size=128).num_params == 1536 * 384 // 128
    assert structured.make("low_rank", 768, 768, rank=4).num_params == 4 * 1536


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_init_is_exactly_zero_and_trainable(case):
    name, m, n, knobs = case
    S = structured.make(name, m, n, init="zero", dtype=torch.float64, **knobs)
    x = torch.randn(4, n, dtype=torch.float64)
    y = S(x)
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(S.dense(), torch.zeros(m, n, dtype=torch.float64))
    (S(x) * torch.randn(4, m, dtype=torch.float64)).sum().backward()
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in S.parameters()))
    assert grad_norm > 0, "zero init must leave a non-zero gradient"


@pytest.mark.parametrize(
    "name", ["kronecker", "ldr", "low_rank", "circulant_product", "skew_circulant_product", "toeplitz_product"]
)
def test_bilinear_zero_init_zeroes_one_factor_only(name):
    S = structured.make(name, 8, 8, init="zero")
    zeros = [p for p in S.parameters() if not p.any()]
    assert len(zeros) == 1


@pytest.mark.parametrize("name", structured.names())
def test_random_init_scale(name):
    """Random init keeps activations at the input's scale: Var(y_i) ~ ||x||^2 / n."""
    n = 256
    torch.manual_seed(1)
    S = structured.make(name, n, n, init="random", dtype=torch.float64)
    ratio = float(S.dense().detach().pow(2).sum() / n)  # mean squared row norm, ~1 for variance 1/n
    assert 0.5 < ratio < 2.0


@pytest.mark.parametrize("name", structured.names())
def test_reset_parameters_switches_mode(name):
    S = structured.make(name, 6, 6, init="random")
    assert S.dense().abs().sum() > 0
    S.reset_parameters("zero")
    assert S.dense().abs().sum() == 0
