"""Adversarial adapter folders: each ends in a clear error naming the problem, or in a correct
load; after every error the model is unchanged (module types, state dict, requires_grad), and
no failing case grows the process's peak memory by 100 MB or more.

The cases run in forked children of one fresh process (``adversarial_cases.py``), each reading
``ru_maxrss`` just before its call, so the growth is the call's own; two controls that allocate
show that the measurement sees memory.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import surm

from .adversarial_cases import CASES

LIMIT_KB = 100 * 1024
_NAME = r"adapter name .* cannot be used.*non-empty string without '\.', '/'"

#: case -> (exception type, phrase of its message)
ERRORS = {
    "signature bytes damaged": ("DamagedSignatureError", r"surm_signature does not hold JSON text.*damaged"),
    "every tensor cast to half": ("DamagedSignatureError", r"signature is a torch\.float16 tensor.*cast every tensor"),
    "int64 signature": ("DamagedSignatureError", r"signature is a torch\.int64 tensor.*not a uint8 vector"),
    "oversized signature": ("DamagedSignatureError", r"surm_signature holds 1048576 bytes; a SURM signature is JSON "
                                                     r"text of at most 4096"),
    "huge rank": ("ValueError", r"ldr: rank=1000000 is above what a 12x10 matrix can use"),
    "huge block_size": ("ValueError", r"block_size=1000000000 must divide"),
    "SURM peft_type on LoRA weights": ("ValueError", r"says peft_type 'SURM' but holds LoRA's fields"),
    "SURM config beside LoRA weights": ("ValueError", r"config builds 'base_model\.model\.fc1\.surm_matrix\.weight'.*"
                                                      r"which the file does not hold"),
    "truncated weights": ("ValueError", r"adapter_model\.safetensors is not a readable safetensors file.*truncated"),
    # PEFT reads the file before surm is called: its own JSON error
    "config not JSON": ("JSONDecodeError", r"Expecting property name enclosed in double quotes"),
    "load_adapter every tensor cast to half": ("DamagedSignatureError", r"signature is a torch\.float16 tensor"),
    "load_adapter truncated weights": ("ValueError", r"is not a readable safetensors file"),
    "load_adapter huge block_size": ("ValueError", r"block_size=1000000000 must divide"),
    "load_adapters config not JSON": ("ValueError", r"config_not_JSON/adapter_config\.json is not JSON"),
    **{f"{call} name {name!r}": ("ValueError", _NAME) for call in ("load_adapter", "add_adapter")
       for name in ("../x", "a/b", "")},
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    work = tmp_path_factory.mktemp("adversarial")
    root = Path(__file__).resolve().parents[2]
    src = Path(surm.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(root)])}
    done = subprocess.run([sys.executable, "-m", "tests.peft.adversarial_cases", str(work)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(found) == set(CASES)
    return work, found


def test_every_case_is_covered():
    assert set(ERRORS) | {"only float tensors cast", "LORA peft_type on SURM weights", "control allocation",
                          "control allocation after a freed peak"} == set(CASES)


@pytest.mark.parametrize("case", ERRORS)
def test_an_adversarial_file_ends_in_a_clear_error_and_changes_nothing(reports, case):
    report = reports[1][case]
    kind, phrase = ERRORS[case]
    assert report["outcome"] == "error", report
    assert report["type"] == kind, report
    assert re.search(phrase, report["message"]), report["message"]
    assert report["unchanged"], report
    assert report["peak_reset"]
    assert report["grew_kb"] < LIMIT_KB, f"{case}: the peak grew {report['grew_kb']} KiB"


def test_a_file_whose_float_tensors_were_cast_loads_the_cast_values(reports):
    work, found = reports
    report = found["only float tensors cast"]
    assert report["outcome"] == "loaded", report
    saved = load_file(work / "good" / "adapter_model.safetensors")
    assert len(report["loaded"]) == 2
    for key, values in report["loaded"].items():
        file_key = key.replace(".default", "")
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), saved[file_key].float().double(),
                                   rtol=0, atol=0)


def test_a_lora_peft_type_on_surm_weights_is_peft_s_lora_load_and_it_warns(reports):
    """PEFT builds a LoRA model from a config that says LORA and never calls surm: the result
    is LoRA at its zero start, with PEFT's warning that every LoRA tensor is missing."""
    report = reports[1]["LORA peft_type on SURM weights"]
    assert report["outcome"] == "loaded"
    assert any(re.search(r"Found missing adapter keys.*lora_A", w) for w in report["warnings"]), report["warnings"]
    assert report["grew_kb"] < LIMIT_KB


def test_the_memory_measurement_sees_what_a_call_allocates(reports):
    found = reports[1]
    assert found["control allocation"]["grew_kb"] > 140 * 1024
    assert found["control allocation after a freed peak"]["grew_kb"] > 45 * 1024  # the peak was reset before it
