"""Adversarial adapter folders, each loaded in a forked child of a fresh process that measures
its own peak-memory growth; run as ``python -m tests.peft.adversarial_cases WORKDIR``, it prints
one JSON line per case. Used by ``test_adversarial_files.py``.

Each case builds a folder (from a tiny MLP) and names the call that loads it. The child takes a
snapshot of the model (module types, state dict, requires_grad), reads ``ru_maxrss`` just before
the call, makes it, and reports the outcome, the warnings, whether the model is unchanged and
how much the peak resident set grew (KiB).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import traceback
import warnings
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file

import surm
from tests.peft.tiny_models import mlp


# -- folders -----------------------------------------------------------------------------------
def _surm_folder(path: Path, **config) -> Path:
    torch.manual_seed(0)
    model = peft.get_peft_model(mlp()[0], surm.SurmConfig(**{"target_modules": ["fc1", "fc2"], **config}))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    model.save_pretrained(path)
    return path


def _lora_folder(path: Path) -> Path:
    torch.manual_seed(0)
    peft.get_peft_model(mlp()[0], peft.LoraConfig(target_modules=["fc1", "fc2"], r=2)).save_pretrained(path)
    return path


def _edit_weights(path: Path, edit) -> Path:
    file = path / "adapter_model.safetensors"
    save_file(edit(load_file(file)), file)
    return path


def _edit_config(path: Path, **changes) -> Path:
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return path


def _all_half(sd):
    return {k: v.half() for k, v in sd.items()}


def _signatures(edit):
    return lambda sd: {k: edit(v) if k.endswith("surm_signature") else v for k, v in sd.items()}


def _truncated(path: Path) -> Path:
    file = path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return path


def _not_json(path: Path) -> Path:
    (path / "adapter_config.json").write_text("{not json")
    return path


def _surm_config_beside_lora_weights(path: Path) -> Path:
    _lora_folder(path)
    shutil.copy(_surm_folder(path.with_name(path.name + "_surm")) / "adapter_config.json", path)
    return path


FOLDERS = {
    "signature bytes damaged": lambda p: _edit_weights(_surm_folder(p), _signatures(lambda v: torch.full_like(v, 255))),
    "every tensor cast to half": lambda p: _edit_weights(_surm_folder(p), _all_half),
    "int64 signature": lambda p: _edit_weights(_surm_folder(p), _signatures(lambda v: v.long())),
    "oversized signature": lambda p: _edit_weights(
        _surm_folder(p), _signatures(lambda v: torch.full((2**20,), ord(" "), dtype=torch.uint8))),
    "only float tensors cast": lambda p: _edit_weights(
        _surm_folder(p), lambda sd: {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}),
    "huge rank": lambda p: _edit_config(_surm_folder(p, structure="ldr"), rank=1_000_000),
    "huge block_size": lambda p: _edit_config(_surm_folder(p), block_size=10**9),
    "SURM peft_type on LoRA weights": lambda p: _edit_config(_lora_folder(p), peft_type="SURM"),
    "SURM config beside LoRA weights": _surm_config_beside_lora_weights,
    "LORA peft_type on SURM weights": lambda p: _edit_config(_surm_folder(p), peft_type="LORA"),
    "truncated weights": lambda p: _truncated(_surm_folder(p)),
    "config not JSON": lambda p: _not_json(_surm_folder(p)),
    "good": _surm_folder,
}


# -- calls -------------------------------------------------------------------------------------
def _from_pretrained(folder: Path, good: Path):
    base = mlp()[0]
    return base, lambda: peft.PeftModel.from_pretrained(base, folder)


def _load_adapter(name: str):
    def make(folder: Path, good: Path):
        model = peft.PeftModel.from_pretrained(mlp()[0], good)
        return model, lambda: model.load_adapter(folder, adapter_name=name)
    return make


def _add_adapter(name: str):
    def make(folder: Path, good: Path):
        model = peft.PeftModel.from_pretrained(mlp()[0], good)
        return model, lambda: model.add_adapter(name, surm.SurmConfig(target_modules=["fc1"]))
    return make


def _load_adapters(folder: Path, good: Path):
    model = peft.PeftModel.from_pretrained(mlp()[0], good)
    return model, lambda: surm.peft.load_adapters(model, {"other": folder})


def _allocates(folder: Path, good: Path):
    """A control: a call that allocates 150 MiB must show as growth."""
    base = mlp()[0]
    return base, lambda: torch.ones(150 * 2**20 // 8, dtype=torch.float64).sum()


def _allocates_after_a_freed_peak(folder: Path, good: Path):
    """A control: 150 MiB allocated and freed before the call, 50 MiB in it: the 50 must show
    (the peak is reset just before the call)."""
    torch.ones(150 * 2**20 // 8, dtype=torch.float64).sum()
    base = mlp()[0]
    return base, lambda: torch.ones(50 * 2**20 // 8, dtype=torch.float64).sum()


#: case -> (folder, how the folder is loaded)
CASES = {
    **{folder: (folder, _from_pretrained) for folder in FOLDERS if folder != "good"},
    **{f"load_adapter {folder}": (folder, _load_adapter("other"))
       for folder in ("every tensor cast to half", "truncated weights", "huge block_size")},
    "load_adapters config not JSON": ("config not JSON", _load_adapters),
    **{f"load_adapter name {name!r}": ("good", _load_adapter(name)) for name in ("../x", "a/b", "")},
    **{f"add_adapter name {name!r}": ("good", _add_adapter(name)) for name in ("../x", "a/b", "")},
    "control allocation": ("good", _allocates),
    "control allocation after a freed peak": ("good", _allocates_after_a_freed_peak),
}


# -- one case in a child -------------------------------------------------------------------------
def _snapshot(model: torch.nn.Module):
    return (
        [(name, type(m).__name__) for name, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
    )


def _same(before, after) -> bool:
    return (before[0] == after[0] and before[2] == after[2] and before[1].keys() == after[1].keys()
            and all(torch.equal(v, before[1][k]) for k, v in after[1].items()))


def _reset_peak() -> bool:
    """Set the peak resident set (what ``ru_maxrss`` reports) to the current one (Linux), so that
    the growth measured next is the call's, not a higher peak of the setup before it."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def _run(case: str, folders: dict[str, Path]) -> dict:
    folder, make = CASES[case]
    model, call = make(folders[folder], folders["good"])
    before = _snapshot(model)
    peak_reset = _reset_peak()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
            outcome, kind, message = "loaded", type(result).__name__, ""
        except Exception as err:  # every failure is reported, its type checked by the test
            outcome, kind, message = "error", type(err).__name__, str(err)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    report = {"case": case, "outcome": outcome, "type": kind, "message": message, "grew_kb": grew,
              "peak_reset": peak_reset,
              "unchanged": _same(before, _snapshot(model)), "warnings": [str(w.message) for w in caught]}
    if outcome == "loaded" and isinstance(result, peft.PeftModel):
        report["loaded"] = {k: v.tolist() for k, v in result.state_dict().items() if "surm_matrix" in k}
    return report


def _in_child(case: str, folders: dict[str, Path], out: Path) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            out.write_text(json.dumps(_run(case, folders)))
        except BaseException:
            out.write_text(json.dumps({"case": case, "outcome": "crashed", "message": traceback.format_exc()}))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def main(workdir: str) -> None:
    torch.set_num_threads(1)  # before any op: the process forks once per case
    work = Path(workdir)
    folders = {name: build(work / name.replace(" ", "_")) for name, build in FOLDERS.items()}
    for case in CASES:
        out = work / f"result_{len(os.listdir(work))}.json"
        _in_child(case, folders, out)
        print(out.read_text() if out.exists() else json.dumps({"case": case, "outcome": "no report"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
