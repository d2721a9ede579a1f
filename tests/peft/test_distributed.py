"""Multi-process training of SURM adapters: DDP, Accelerate and FSDP2 on 2 CPU processes (gloo).

One launch of two worker processes (this file run as a script, with the environment torchrun
sets: MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) trains a tiny
MLP with every case of ``CASES`` under every mode of ``MODES``, each rank on its own data,
and writes the adapters, gathered to full tensors, to one file per rank. The tests compare
the two ranks with each other, with the initial adapters and with a single-process run on the
two ranks' batches concatenated (what gradient averaging must give). Under a hard timeout, so
that a hang fails instead of stalling the run.

The "seeds" modes seed the adapter init differently on each rank (as Accelerate's
``set_seed(seed, device_specific=True)`` does): DDP broadcasts rank 0's parameters when it
wraps the model, FSDP2 (``fully_shard``) does not, which
:func:`surm.peft.distributed.broadcast_adapter_init` fixes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

WORLD = 2
STEPS = 3
BATCH = 6
LR = 0.2
BASE_SEED = 0
ADAPTER_SEED = 100  # rank r draws its adapters with ADAPTER_SEED + r in the "seeds" modes
TIMEOUT_S = 180  # the launch normally takes 5-10 s; this only stops a hang

#: case -> (SurmConfig keyword arguments, whether the head "2" is freshly initialised on each
#: rank with the rank's seed, as from_pretrained does for a new classification head)
CASES = {
    "circulant": (dict(structure="circulant", target_modules=["0", "2"]), False),
    "kronecker": (dict(structure="kronecker", target_modules=["0", "2"]), False),
    "ldr": (dict(structure="ldr", rank=2, target_modules=["0", "2"]), False),
    "low_rank": (dict(structure="low_rank", rank=4, target_modules=["0", "2"]), False),
    "ldr+head": (dict(structure="ldr", rank=2, target_modules=["0"], modules_to_save=["2"]), True),
}
#: mode -> (wrapper, adapter seed differs per rank, broadcast_adapter_init before wrapping)
MODES = {
    "ddp": ("ddp", True, False),
    "accelerate": ("accelerate", True, False),
    "fsdp2": ("fsdp2", False, False),
    "fsdp2_seeds": ("fsdp2", True, False),
    "hsdp_seeds": ("hsdp", True, False),
    "fsdp2_seeds_broadcast": ("fsdp2", True, True),
    "hsdp_seeds_broadcast": ("hsdp", True, True),
}
#: cases whose init draws something at random (a bilinear factor or a fresh head)
RANDOM_INIT = ("kronecker", "ldr", "low_rank", "ldr+head")
#: cases with a randomly drawn tensor of at least WORLD rows: plain FSDP2 splits it over ranks
STITCHED = ("ldr", "low_rank", "ldr+head")


# -- shared by the workers and the single-process references ------------------------------
def build(case: str, seed: int):
    """The PEFT model of ``case``: the base MLP is the same on every rank (as loaded from a
    checkpoint); the adapters (and a fresh head) are drawn after seeding with ``seed``."""
    import peft

    import surm

    kwargs, fresh_head = CASES[case]
    torch.manual_seed(BASE_SEED)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    torch.manual_seed(seed)
    if fresh_head:
        base[2].reset_parameters()
    return peft.get_peft_model(base, surm.SurmConfig(**kwargs))


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [
        (torch.randn(BATCH, 16, generator=g, dtype=torch.float64),
         torch.randn(BATCH, 4, generator=g, dtype=torch.float64))
        for _ in range(STEPS)
    ]


def train(model: nn.Module, data, backward=None) -> None:
    """STEPS steps of SGD on the mean squared error; the optimizer sees only trainable params."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        (backward or (lambda t: t.backward()))(loss)
        opt.step()
        opt.zero_grad()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (adapters, modules_to_save copies), as full plain tensors
    (DTensors are gathered, a collective call: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = t.detach().clone()
    return out


# -- the worker ------------------------------------------------------------------------------
def _fsdp_wrap(model, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for child in model.base_model.model:
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)


def worker(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from surm.peft.distributed import broadcast_adapter_init

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    data = batches(rank)
    results: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict = {"rank": rank, "backend": dist.get_backend(), "broadcast": {}}
    meshes = {
        "fsdp2": init_device_mesh("cpu", (WORLD,)),
        "hsdp": init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard")),
    }
    accelerator = None
    for mode, (wrapper, per_rank_seed, broadcast) in MODES.items():
        for case in CASES:
            seed = ADAPTER_SEED + rank if per_rank_seed else ADAPTER_SEED
            if wrapper == "accelerate":
                import accelerate
                from accelerate.utils import set_seed

                if accelerator is None:
                    accelerator = accelerate.Accelerator(cpu=True)
                    meta["accelerate"] = {
                        "distributed_type": str(accelerator.distributed_type),
                        "num_processes": accelerator.num_processes,
                        "process_index": accelerator.process_index,
                        "device": str(accelerator.device),
                    }
                set_seed(ADAPTER_SEED, device_specific=True)  # seeds ADAPTER_SEED + rank
                meta["accelerate"]["seed"] = torch.initial_seed()
                model = build(case, seed=torch.initial_seed())
                prepared = accelerator.prepare(model)
                meta["accelerate"]["wrapper"] = type(prepared).__name__
                train(prepared, data, backward=accelerator.backward)
            else:
                model = build(case, seed=seed)
                if broadcast:
                    meta["broadcast"][f"{mode}/{case}"] = broadcast_adapter_init(model, src=0)
                if wrapper == "ddp":
                    train(nn.parallel.DistributedDataParallel(model), data)
                else:
                    _fsdp_wrap(model, meshes[wrapper])
                    sharded = [p for p in model.parameters() if p.requires_grad]
                    meta.setdefault("placements", {})[f"{mode}/{case}"] = sorted(
                        {str(p.placements) if isinstance(p, DTensor) else "plain" for p in sharded}
                    )
                    train(model, data)
                    if mode == "fsdp2" and case == "ldr":
                        try:
                            broadcast_adapter_init(model)
                            meta["broadcast_after_shard"] = "no error"
                        except RuntimeError as err:
                            meta["broadcast_after_shard"] = str(err)
            results[f"{mode}/{case}"] = adapter_state(model)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(meta))
    dist.barrier()
    dist.destroy_process_group()


# -- the launch ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path) -> tuple[bool, str]:
    """Run the two workers; (finished in time with exit status 0 on both ranks, their logs)."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(WORLD),
            OMP_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
            HF_HUB_OFFLINE="1",
        )
        log = open(out_dir / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(
            subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(out_dir)],
                             env=env, stdout=log, stderr=log)
        )
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)  # the other rank would hang
        timed_out = time.monotonic() > deadline
        if failed or timed_out:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.05)
    text = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        text.append(f"--- rank {rank} (exit status {p.returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    ok = not timed_out and all(p.returncode == 0 for p in procs)
    return ok, ("TIMED OUT\n" if timed_out else "") + "\n".join(text)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out_dir = tmp_path_factory.mktemp("distributed")
    for _attempt in range(2):
        ok, logs = _launch(out_dir)
        if ok or "EADDRINUSE" not in logs and "address already in use" not in logs.lower():
            break  # retry only when the free port was taken before rank 0 bound it
    assert ok, f"the 2-process run failed:\n{logs}"
    return (
        [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)],
        [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)],
    )


# -- single-process references ---------------------------------------------------------------
_REFS: dict = {}


def reference(case: str, init: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One process, the model of rank 0's seed (or the given initial state), trained on the
    two ranks' batches concatenated: the mean loss over both, which DDP and FSDP2 average."""
    key = (case, init is not None)
    if init is None and key in _REFS:
        return _REFS[key]
    model = build(case, seed=ADAPTER_SEED)
    if init is not None:
        model.load_state_dict(init)
    data = [(torch.cat([b[i][0] for b in map(batches, range(WORLD))]),
             torch.cat([b[i][1] for b in map(batches, range(WORLD))])) for i in range(STEPS)]
    train(model, data)
    state = adapter_state(model)
    if init is None:
        _REFS[key] = state
    return state


def initial(case: str, seed: int = ADAPTER_SEED) -> dict[str, torch.Tensor]:
    return adapter_state(build(case, seed=seed))


def stitched_init(case: str) -> dict[str, torch.Tensor]:
    """What plain FSDP2 starts from when rank r draws with ADAPTER_SEED + r: each parameter
    (frozen ones too) split along dim 0 into WORLD chunks, chunk r taken from rank r's draw."""
    states = [build(case, seed=ADAPTER_SEED + r).state_dict() for r in range(WORLD)]
    out = {}
    for name in states[0]:
        chunks = [list(s[name].chunk(WORLD)) if s[name].dim() else [s[name]] for s in states]
        out[name] = torch.cat([chunks[r][r] for r in range(len(chunks[0]))]) if states[0][name].dim() else chunks[0][0]
    return out


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def ranks_equal(states: list[dict[str, torch.Tensor]]) -> bool:
    return all(torch.equal(states[0][n], s[n]) for s in states[1:] for n in states[0])


def assert_trained(state: dict, case: str) -> None:
    init = initial(case)
    assert state.keys() == init.keys() and state
    unchanged = [n for n in state if torch.equal(state[n], init[n])]
    assert not unchanged, f"parameters unchanged by training: {unchanged}"


# -- the tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["ddp", "accelerate", "fsdp2"])
def test_ranks_agree_and_match_single_process(runs, mode, case):
    """DDP and Accelerate (ranks seeded differently: both broadcast rank 0's parameters when
    wrapping) and FSDP2 (same seed on every rank): both ranks end with the same adapters,
    changed by training, equal to one process trained on the concatenated batches."""
    results, _ = runs
    states = [r[f"{mode}/{case}"] for r in results]
    assert ranks_equal(states)
    assert_trained(states[0], case)
    assert_close(states[0], reference(case))


def test_launch_used_gloo_accelerate_and_sharding(runs):
    _, meta = runs
    for rank, m in enumerate(meta):
        assert m["rank"] == rank and m["backend"] == "gloo"
        acc = m["accelerate"]
        assert acc["distributed_type"].endswith("MULTI_CPU"), acc
        assert (acc["num_processes"], acc["process_index"]) == (WORLD, rank)
        assert acc["device"].split(":")[0] == "cpu", acc["device"]
        assert acc["wrapper"] == "DistributedDataParallel"
        assert acc["seed"] == ADAPTER_SEED + rank  # set_seed(..., device_specific=True)
        for key, placements in m["placements"].items():
            want = "(Shard(dim=0),)" if key.startswith("fsdp2") else "(Replicate(), Shard(dim=0))"
            assert placements == [want], (key, placements)


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_with_rank_seeds_trains_a_stitched_init(runs, case):
    """Plain FSDP2 (1-D mesh), adapters drawn with a different seed on each rank, no broadcast:
    the ranks agree (one sharded model), but it starts from each rank's own dim-0 shard of its
    own draw, so where a random tensor has >= 2 rows the result is not rank 0's model."""
    results, _ = runs
    states = [r[f"fsdp2_seeds/{case}"] for r in results]
    assert ranks_equal(states)
    assert_close(states[0], reference(case, init=stitched_init(case)))
    differs = any(not torch.allclose(states[0][n], reference(case)[n]) for n in states[0])
    assert differs == (case in STITCHED)


@pytest.mark.parametrize("case", CASES)
def test_hsdp_with_rank_seeds_diverges(runs, case):
    """FSDP2 on a (replicate=2, shard=1) mesh, seeds differing per rank, no broadcast: the
    replicas keep their own random factors and only average gradients, so the ranks end with
    different adapters (circulant's zero init draws nothing, so it is unaffected)."""
    results, _ = runs
    states = [r[f"hsdp_seeds/{case}"] for r in results]
    assert ranks_equal(states) == (case not in RANDOM_INIT)
    if case == "circulant":
        assert_close(states[0], reference(case))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["fsdp2_seeds_broadcast", "hsdp_seeds_broadcast"])
def test_broadcast_adapter_init_fixes_fsdp2(runs, mode, case):
    """broadcast_adapter_init before fully_shard: ranks seeded differently end identical and
    equal to the single-process run from rank 0's init, on both meshes."""
    results, meta = runs
    states = [r[f"{mode}/{case}"] for r in results]
    assert ranks_equal(states)
    assert_trained(states[0], case)
    assert_close(states[0], reference(case))
    names = meta[0]["broadcast"][f"{mode}/{case}"]
    assert names == meta[1]["broadcast"][f"{mode}/{case}"]
    assert not any(".base_layer." in n for n in names), names
    assert any(".surm_matrix.default." in n for n in names)
    if CASES[case][1]:
        assert any(".modules_to_save.default." in n for n in names)
        assert any(".original_module." in n for n in names)


def test_broadcast_after_fully_shard_raises(runs):
    _, meta = runs
    for m in meta:
        assert "before fully_shard" in m["broadcast_after_shard"], m["broadcast_after_shard"]


def test_broadcast_adapter_init_without_process_group_does_nothing():
    import torch.distributed as dist

    from surm.peft.distributed import adapter_tensors, broadcast_adapter_init

    assert not (dist.is_available() and dist.is_initialized())
    model = build("ldr+head", seed=ADAPTER_SEED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert broadcast_adapter_init(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = set(adapter_tensors(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= names
    assert not any("base_layer" in n for n in names)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2])
