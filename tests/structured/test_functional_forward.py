"""``functional_forward``: the product through plain torch ops, vmappable over stacked
parameters (what mixed-adapter batches run), equal to ``forward``."""

import pytest
import torch
from torch.func import functional_call, vmap

from surm import structured

from .cases import CASES, case_id


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_vmap_over_stacked_parameters_equals_each_matrix(case):
    name, m, n, knobs = case
    torch.manual_seed(0)
    mats = [structured.make(name, m, n, init="random", dtype=torch.float64, **knobs) for _ in range(3)]
    for S in mats:
        with torch.no_grad():
            for p in S.parameters():
                p.normal_()
    x = torch.randn(4, 3, n, dtype=torch.float64)
    which = torch.tensor([2, 0, 1, 2])
    params = {
        key: torch.stack([dict(S.named_parameters())[key] for S in mats])[which]
        for key, _ in mats[0].named_parameters()
    }

    class Product(torch.nn.Module):
        def __init__(self, S):
            super().__init__()
            self.S = S

        def forward(self, v):
            return self.S.functional_forward(v)

    product = Product(mats[0])
    with torch.no_grad():
        rows = vmap(lambda p, v: functional_call(product, {f"S.{k}": t for k, t in p.items()}, (v,)))(params, x)
        expected = torch.stack([mats[i](x[b]) for b, i in enumerate(which.tolist())])
    torch.testing.assert_close(rows, expected, rtol=1e-10, atol=1e-10)
