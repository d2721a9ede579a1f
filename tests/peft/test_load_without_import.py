"""An adapter saved by surm loads the way PEFT users load adapters, in a fresh process that never
imports surm: the ``surm-peft-hook.pth`` start-up file installed with the package arms SURM's
registration for the moment PEFT is imported. Offline: the base is found where the adapter says."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from surm.peft import SurmConfig
from tests.peft import tiny_models

IDS = [[1, 5, 6, 7, 2, 9]]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SURM_NO_PEFT_HOOK"}
    environment.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environment)


def test_the_install_put_the_start_up_hook_into_site_packages():
    hooks = [Path(folder, "surm-peft-hook.pth") for folder in {sysconfig.get_paths()["purelib"], *sys.path}
             if Path(folder, "surm-peft-hook.pth").is_file()]
    assert hooks, "surm-peft-hook.pth is missing: reinstall surm (pip install -e . or pip install surm)"
    assert "_surm_peft_hook" in hooks[0].read_text()


def test_start_up_arms_the_hook_and_imports_nothing_else():
    result = _python("import sys; print([type(f).__name__ for f in sys.meta_path].count('SurmPeftStartupHook'), "
                     "sorted(m for m in ('_surm_peft_hook', 'surm', 'torch', 'peft', 'typing', 're') "
                     "if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 1) == ["1", "[]\n"]


def test_without_the_hook_peft_does_not_know_surm():
    result = _python("import sys; hooked = [type(f).__name__ for f in sys.meta_path].count('SurmPeftStartupHook'); "
                     "from peft import mapping; print(hooked, 'SURM' in mapping.PEFT_TYPE_TO_CONFIG_MAPPING)",
                     SURM_NO_PEFT_HOOK="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False"]


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama saved as a base model, a SURM adapter on it and the adapted logits."""
    root = tmp_path_factory.mktemp("fresh_process")
    torch.manual_seed(0)
    base, _, _ = tiny_models.llama(torch.float32)
    base.save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")  # as a user has it: it knows where it came from
    config = SurmConfig(structure="toeplitz", target_modules="all-linear", init="random", task_type="CAUSAL_LM")
    model = get_peft_model(base, config).eval()
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        torch.save(model(torch.tensor(IDS)).logits, root / "expected.pt")
    return root


@pytest.mark.parametrize("loader", [
    "from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(adapter)",
    "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
    "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)",
])
def test_a_fresh_process_without_import_surm_loads_the_adapter_offline(saved_llama, loader):
    assert json.loads((saved_llama / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(saved_llama / "base")
    code = (f"import sys, torch\nadapter, base = {str(saved_llama / 'adapter')!r}, {str(saved_llama / 'base')!r}\n"
            f"{loader}\n"
            "model.eval()\n"
            f"with torch.no_grad():\n    logits = model(torch.tensor({IDS})).logits\n"
            f"expected = torch.load({str(saved_llama / 'expected.pt')!r})\n"
            "print(type(model).__name__, type(model.base_model).__name__, torch.equal(logits, expected))")
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["PeftModelForCausalLM", "SurmModel", "True"]


def test_without_the_hook_loading_fails_with_peft_s_error(saved_llama):
    """The opt-out does what it says (the adapter then needs ``import surm``)."""
    adapter = str(saved_llama / "adapter")
    code = f"from peft import AutoPeftModelForCausalLM\nAutoPeftModelForCausalLM.from_pretrained({adapter!r})"
    result = _python(code, SURM_NO_PEFT_HOOK="1")
    assert result.returncode != 0 and "SURM" in result.stderr


@pytest.mark.integration
def test_an_adapter_on_packaged_smollm2_loads_by_hub_id_offline(tmp_path):
    """The set-up put the packaged SmolLM2 into the Hugging Face cache under its Hub id, so the
    adapter's ``base_model_name_or_path`` resolves offline, in a process that never imports surm."""
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    base = AutoModelForCausalLM.from_pretrained(hub_id)
    model = get_peft_model(base, SurmConfig(target_modules=["q_proj", "v_proj"], init="random",
                                            task_type="CAUSAL_LM")).eval()
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == hub_id
    with torch.no_grad():
        torch.save(model(torch.tensor(IDS)).logits, tmp_path / "expected.pt")
    code = ("import sys, torch\nfrom peft import AutoPeftModelForCausalLM\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r}).eval()\n"
            f"with torch.no_grad():\n    logits = model(torch.tensor({IDS})).logits\n"
            f"print('surm.peft' in sys.modules, torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r})))")
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True"]
