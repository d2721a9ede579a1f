"""``update_energy()`` against the Jacobian it summarises: sum_p ||dS/dp||_F^2 / (m n) at the
zero init, averaged over draws of the random factor of the bilinear families."""

import pytest
import torch

from surm import structured

from .cases import knob_settings

SHAPES = [(8, 8), (6, 10), (16, 4)]


def jacobian_energy(name, m, n, knobs, draws):
    total = 0.0
    for seed in range(draws):
        torch.manual_seed(seed)
        S = structured.make(name, m, n, dtype=torch.float64, **knobs)
        params = list(S.parameters())
        jac = torch.autograd.functional.jacobian(
            lambda *ps: S._dense_with(list(ps)), tuple(p.detach() for p in params))
        total += sum(float(j.pow(2).sum()) for j in jac) / (m * n)
    return total / draws


@pytest.mark.parametrize("name", structured.names())
@pytest.mark.parametrize("m,n", SHAPES)
def test_update_energy_is_the_mean_jacobian_energy(name, m, n):
    for knobs in knob_settings(name, m, n):
        S = structured.make(name, m, n, **knobs)
        linear = isinstance(S, structured.LinearStructuredMatrix)
        measured = jacobian_energy(name, m, n, knobs, draws=1 if linear else 100)
        # exact for the linear families; the bilinear ones average 100 draws of the random factor
        assert measured == pytest.approx(S.update_energy(), rel=1e-12 if linear else 0.2), knobs
