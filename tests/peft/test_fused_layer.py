"""The fused parallel path inside SurmLayer gives the plain path's values and gradients."""

import copy

import peft
import pytest
import torch

import surm
from surm.peft import SurmLayer

from .tiny_models import bert, gpt2


@pytest.mark.parametrize("factory", [bert, gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("structure,knobs", [("circulant", {}), ("toeplitz", {}), ("kronecker", {}), ("ldr", {"rank": 2})])
def test_fused_equals_plain_in_a_model(factory, structure, knobs):
    torch.manual_seed(0)
    base, inputs, run = factory()
    models = {}
    for fused in (True, False):
        config = surm.SurmConfig(structure=structure, init="random", fused=fused, **knobs)
        models[fused] = peft.get_peft_model(copy.deepcopy(base), config)
    models[False].load_state_dict(models[True].state_dict())
    outs, grads = {}, {}
    for fused, model in models.items():
        model.train()
        torch.manual_seed(1)  # the base model's own dropout draws the same masks in both runs
        out = run(model)
        out.pow(2).mean().backward()
        outs[fused] = out.detach()
        grads[fused] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-10, atol=1e-12)
    assert grads[True].keys() == grads[False].keys()
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-9, atol=1e-12)


def test_dropout_in_training_takes_the_plain_path():
    torch.manual_seed(0)
    base, inputs, run = bert()
    model = peft.get_peft_model(base, surm.SurmConfig(init="random", dropout=0.5, fused=True))
    layer = next(m for m in model.modules() if isinstance(m, SurmLayer))
    model.train()
    assert not layer._can_fuse("default")
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    drop = torch.nn.functional.dropout(x, 0.5, training=True)
    S = layer.surm_matrix["default"]
    torch.testing.assert_close(y, layer.base_layer(x) + layer.surm_alpha["default"] * S(drop))
    model.eval()
    assert layer._can_fuse("default")  # dropout is the identity in eval mode
