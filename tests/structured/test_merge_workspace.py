"""The fused path's merge buffers (:class:`surm.structured.MergeWorkspace`): reused across steps,
one per thread, freed with their owner, by release, or when their thread ends."""

import copy
import gc
import pickle
import threading
import weakref

import pytest
import torch

from surm import structured
from surm.structured import fused

F64 = torch.float64
SCALE = 0.7
M, N = 12, 8


@pytest.fixture(autouse=True)
def _buffers_at_any_size(monkeypatch):
    """The buffers are used from 32 MiB on; here at the tiny test sizes too."""
    monkeypatch.setattr(fused, "_WORKSPACE_MIN_BYTES", 0)


def _layer(seed=0):
    torch.manual_seed(seed)
    return structured.make("toeplitz", M, N, init="random", dtype=F64), torch.randn(M, N, dtype=F64)


def _step(S, W, x, workspace):
    """One fused forward + backward: y and the gradients of x and S's parameters."""
    y = structured.fused_parallel_linear(x, W, None, S, SCALE, workspace=workspace)
    return (y.detach(), *torch.autograd.grad(y.pow(2).sum(), [x, *S.parameters()]))


def _reference(S, W, x):
    y = x @ (W + SCALE * S.dense()).T
    return (y.detach(), *torch.autograd.grad(y.pow(2).sum(), [x, *S.parameters()]))


def _buffers(workspace):
    return list(workspace._held.values())


def test_training_steps_reuse_one_buffer_and_match_dense():
    S, W = _layer()
    workspace = structured.MergeWorkspace()
    pointers = set()
    for _ in range(3):
        x = torch.randn(5, N, dtype=F64, requires_grad=True)
        for got, want in zip(_step(S, W, x, workspace), _reference(S, W, x)):
            torch.testing.assert_close(got, want)
        pointers.update(b.data_ptr() for b in _buffers(workspace))
    assert len(pointers) == 1
    assert workspace.held_bytes() == M * N * F64.itemsize


def test_no_workspace_holds_nothing():
    S, W = _layer()
    x = torch.randn(5, N, dtype=F64, requires_grad=True)
    before = {key: ws.held_bytes() for key, ws in fused._SHARED.items()}
    for got, want in zip(_step(S, W, x, None), _reference(S, W, x)):
        torch.testing.assert_close(got, want)
    assert {key: ws.held_bytes() for key, ws in fused._SHARED.items()} == before


def test_another_dtype_replaces_the_buffer():
    workspace = structured.MergeWorkspace()
    first = weakref.ref(workspace.buffer(torch.Size([M, N]), F64))
    assert workspace.buffer(torch.Size([M, N]), F64).data_ptr() == first().data_ptr()
    workspace.buffer(torch.Size([M, N]), torch.float32)
    gc.collect()
    assert first() is None
    assert workspace.held_bytes() == M * N * 4


def test_two_threads_on_one_layer_get_their_own_buffers_and_the_right_results():
    """Both threads run the same S and W through one workspace at the same time, each with its own
    inputs; every result equals the dense reference, and each thread wrote its own buffer."""
    S, W = _layer()
    workspace = structured.MergeWorkspace()
    start, done, counted = threading.Barrier(2), threading.Barrier(3), threading.Event()
    pointers, errors = {}, []

    def run(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            xs = [torch.randn(5, N, dtype=F64, generator=g, requires_grad=True) for _ in range(30)]
            start.wait()
            results = [_step(S, W, x, workspace) for x in xs]
            pointers[seed] = workspace.buffer(W.shape, F64).data_ptr()
            for x, got in zip(xs, results):
                for a, b in zip(got, _reference(S, W, x)):
                    torch.testing.assert_close(a, b)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.wait()
            counted.wait()  # keep both threads (and their buffers) alive until they are counted

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    done.wait()
    held = workspace.held_bytes()
    counted.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(pointers.values())) == 2
    assert held == 2 * M * N * F64.itemsize
    gc.collect()
    assert workspace.held_bytes() == 0  # a thread's buffer goes with the thread


def test_release_frees_every_threads_buffer():
    workspace = structured.MergeWorkspace()
    ready, finish = threading.Event(), threading.Event()
    refs = [weakref.ref(workspace.buffer(torch.Size([M, N]), F64))]

    def other_thread():
        refs.append(weakref.ref(workspace.buffer(torch.Size([M, N]), F64)))
        ready.set()
        finish.wait()

    thread = threading.Thread(target=other_thread)
    thread.start()
    ready.wait()
    assert workspace.held_bytes() == 2 * M * N * F64.itemsize
    workspace.release()
    gc.collect()
    alive = [r() is not None for r in refs]
    finish.set()
    thread.join()
    assert alive == [False, False]
    assert workspace.held_bytes() == 0
    assert workspace.buffer(torch.Size([M, N]), F64).shape == (M, N)  # usable again


def test_release_merge_workspaces_frees_the_shared_ones():
    S, W = _layer()
    workspace = structured.MergeWorkspace.shared((M, N))
    x = torch.randn(5, N, dtype=F64, requires_grad=True)
    _step(S, W, x, workspace)
    buffer = weakref.ref(_buffers(workspace)[0])
    assert structured.release_merge_workspaces() >= M * N * F64.itemsize
    gc.collect()
    assert buffer() is None
    assert workspace.held_bytes() == 0


def test_a_shared_workspace_lives_as_long_as_its_holders():
    a = structured.MergeWorkspace.shared((M, N))
    assert structured.MergeWorkspace.shared((M, N)) is a
    assert structured.MergeWorkspace.shared((N, M)) is not a
    a.buffer(torch.Size([M, N]), F64)
    buffer = weakref.ref(_buffers(a)[0])
    workspace = weakref.ref(a)
    del a
    gc.collect()
    assert workspace() is None and buffer() is None
    assert (M, N) not in fused._SHARED


def test_copies_share_the_shared_workspace_and_hold_no_buffer():
    shared = structured.MergeWorkspace.shared((M, N))
    private = structured.MergeWorkspace()
    private.buffer(torch.Size([M, N]), F64)
    assert copy.deepcopy(shared) is shared
    assert pickle.loads(pickle.dumps(shared)) is shared
    copied = copy.deepcopy(private)
    assert copied is not private and copied.held_bytes() == 0


def test_a_workspace_of_another_type_is_refused():
    S, W = _layer()
    x = torch.randn(5, N, dtype=F64)
    for call in (structured.fused_parallel_linear, structured.parallel_linear):
        with pytest.raises(TypeError, match="workspace must be a surm.structured.MergeWorkspace or None, not dict"):
            call(x, W, None, S, SCALE, workspace={})


def test_a_compiled_call_with_a_workspace_matches_dense_and_holds_nothing():
    """Under torch.compile the merged weight is the graph's own: no buffer is taken, one graph."""
    torch._dynamo.reset()
    S, W = _layer()
    workspace = structured.MergeWorkspace()
    x = torch.randn(5, N, dtype=F64, requires_grad=True)
    compiled = torch.compile(
        lambda x: structured.parallel_linear(x, W, None, S, SCALE, fused=True, workspace=workspace),
        backend="inductor", fullgraph=True,
    )
    y = compiled(x)
    got = (y.detach(), *torch.autograd.grad(y.pow(2).sum(), [x, *S.parameters()]))
    for a, b in zip(got, _reference(S, W, x)):
        torch.testing.assert_close(a, b)
    assert workspace.held_bytes() == 0
    torch._dynamo.reset()
