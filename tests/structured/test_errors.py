"""Bad input fails early with a message that names the value and the fix."""

import pytest
import torch

from surm import structured


def test_unknown_family_lists_known_ones():
    with pytest.raises(ValueError, match="unknown structure 'circulent'.*circulant.*toeplitz.*ldr"):
        structured.make("circulent", 4, 4)


def test_unknown_knob_lists_accepted_ones():
    with pytest.raises(TypeError, match="toeplitz does not take the knob.*block_size.*its knobs: none"):
        structured.make("toeplitz", 4, 4, block_size=2)
    with pytest.raises(TypeError, match="ldr does not take the knob.*ranks.*its knobs: rank"):
        structured.make("ldr", 4, 4, ranks=2)


@pytest.mark.parametrize("name", ["circulant", "skew_circulant"])
def test_block_size_that_does_not_divide(name):
    expected = r"block_size=48 must divide both out_features=1536 and in_features=100.*gcd = 4"
    with pytest.raises(ValueError, match=expected):
        structured.make(name, 1536, 100, block_size=48)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_integer_knobs(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        structured.make("ldr", 4, 4, rank=bad)
    with pytest.raises(ValueError, match="out_features must be a positive integer"):
        structured.make("toeplitz", bad, 4)


def test_bad_init_mode():
    with pytest.raises(ValueError, match="init must be one of"):
        structured.make("circulant", 4, 4, init="normal")


@pytest.mark.parametrize("name", structured.names())
def test_wrong_input_width(name):
    S = structured.make(name, 6, 4)
    with pytest.raises(ValueError, match=r"input of shape \(3, 5\) has 5 features.*expected in_features=4"):
        S(torch.randn(3, 5))


@pytest.mark.parametrize("name", structured.names())
@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_project_needs_a_matrix(name, shape):
    with pytest.raises(ValueError, match=rf"{name}.project expects a 2-D matrix.*got a tensor of shape"):
        structured.get(name).project(torch.randn(shape))


def test_kronecker_factors_that_do_not_fit():
    with pytest.raises(ValueError, match=r"factors A \(2 x 2\) and B \(3 x 3\) give a 6 x 6 matrix.*out_features=8"):
        structured.make("kronecker", 8, 6, factors=((2, 2), (3, 3)))
    with pytest.raises(ValueError, match="factors must be"):
        structured.make("kronecker", 8, 6, factors=(2, 3))


def test_kronecker_factors_are_never_truncated():
    with pytest.raises(ValueError, match=r"factors must be \(\(a1, a2\), \(b1, b2\)\).*4\.5"):
        structured.make("kronecker", 8, 9, factors=((2, 4.5), (4, 2)))
    assert structured.make("kronecker", 8, 6, factors=((2, 2), (4, 3))).factors == ((2, 2), (4, 3))
