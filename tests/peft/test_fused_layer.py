"""The fused parallel path inside SurmLayer gives the plain path's values and gradients."""

import copy
import gc
import io
import threading
import weakref

import peft
import pytest
import torch

import surm
from surm import structured
from surm.peft import SurmLayer

from .tiny_models import bert, gpt2


@pytest.mark.parametrize("factory", [bert, gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize(
    "structure,knobs", [("circulant", {}), ("toeplitz", {}), ("kronecker", {}), ("ldr", {"rank": 2})]
)
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


def _fused_model(monkeypatch, base):
    """``base`` with fused SURM circulant adapters whose merge goes into the layers' workspaces
    (used from 32 MiB on; here at any size)."""
    monkeypatch.setattr(structured.fused, "_WORKSPACE_MIN_BYTES", 0)
    model = peft.get_peft_model(base, surm.SurmConfig(init="random", fused=True))
    return model, [m for m in model.modules() if isinstance(m, SurmLayer)]


def test_layers_of_one_shape_share_a_workspace(monkeypatch):
    torch.manual_seed(0)
    base, inputs, run = bert()
    model, layers = _fused_model(monkeypatch, base)
    by_shape = {}
    for layer in layers:
        by_shape.setdefault((layer.out_features, layer.in_features), set()).add(id(layer.merge_workspace))
    assert len(by_shape) > 1 and all(len(ids) == 1 for ids in by_shape.values())
    model.train()
    run(model).pow(2).mean().backward()
    workspaces = {id(layer.merge_workspace): layer.merge_workspace for layer in layers}.values()
    # one float64 buffer per shape (this thread's), m x n elements each
    assert sum(w.held_bytes() for w in workspaces) == sum(m * n * 8 for m, n in by_shape)
    assert "merge_workspace" not in " ".join(model.state_dict())


def test_deleting_the_model_frees_its_merge_buffers(monkeypatch):
    """Fused forward + backward, then ``del model; gc.collect()``: the buffers and the
    workspaces are gone (nothing process-wide keeps them)."""
    torch.manual_seed(0)
    base, inputs, run = bert()
    model, layers = _fused_model(monkeypatch, base)
    model.train()
    run(model).pow(2).mean().backward()
    buffers = [weakref.ref(b) for layer in layers for b in layer.merge_workspace._held.values()]
    workspaces = [weakref.ref(layer.merge_workspace) for layer in layers]
    assert buffers
    del model, base, layers
    gc.collect()
    assert [r() for r in buffers + workspaces] == [None] * (len(buffers) + len(workspaces))


def test_two_threads_running_one_layer_match_the_plain_path(monkeypatch):
    """Two threads run the same fused SurmLayer (forward and backward) at once: each thread's
    output and gradients equal the plain path's for its input, and each wrote its own buffer."""
    torch.manual_seed(0)
    base, inputs, run = bert()
    model, layers = _fused_model(monkeypatch, base)
    layer = layers[0]
    params = [p for p in layer.parameters() if p.requires_grad]
    xs = {seed: torch.randn(3, 5, layer.in_features, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)}

    def step(x):
        x = x.clone().requires_grad_()
        y = layer(x)
        return [y.detach(), *torch.autograd.grad(y.pow(2).sum(), [x, *params])]

    start, done, counted = threading.Barrier(2), threading.Barrier(3), threading.Event()
    results, pointers, errors = {}, {}, []

    def worker(seed):
        try:
            start.wait()
            results[seed] = [step(xs[seed]) for _ in range(20)]
            pointers[seed] = layer.merge_workspace.buffer(torch.Size([layer.out_features, layer.in_features]),
                                                          torch.float64).data_ptr()
        except Exception as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.wait()
            counted.wait()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in xs]
    for t in threads:
        t.start()
    done.wait()
    counted.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(pointers.values())) == 2
    layer.surm_fused["default"] = False
    for seed, runs in results.items():
        want = step(xs[seed])
        for got in runs:
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_model_with_filled_workspaces_copies_and_pickles(monkeypatch):
    """deepcopy and torch.save see the workspaces as scratch: the copy shares the workspace of
    each shape (no buffer copied) and computes the same outputs."""
    torch.manual_seed(0)
    base, inputs, run = bert()
    model, layers = _fused_model(monkeypatch, base)
    out = run(model)
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        other_layers = [m for m in other.modules() if isinstance(m, SurmLayer)]
        assert [m.merge_workspace for m in other_layers] == [m.merge_workspace for m in layers]
        torch.testing.assert_close(run(other), out)
