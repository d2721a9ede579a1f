"""A save killed halfway leaves the previous files intact and a temporary surm recognises as its
own; the next save or load in that folder removes it, and nothing else."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import peft
import pytest
import torch

import surm
from surm.peft.atomic_files import PREFIX, remove_orphans

from .tiny_models import mlp


def _save(path, **config):
    torch.manual_seed(0)
    model = peft.get_peft_model(mlp()[0], surm.SurmConfig(target_modules=["fc1", "fc2"], **config))
    model.save_pretrained(path)
    return model


def _dead_pid():
    """The id of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _orphans(folder, pid):
    """A temporary file and a temporary folder as an interrupted save by process ``pid`` leaves them."""
    file = folder / f"{PREFIX}{pid}-0123abcd-README.md"
    file.write_text("half a card")
    directory = folder / f"{PREFIX}{pid}-89abcdef-adapter_config.json"
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"half": ')
    return [file, directory]


def test_a_save_leaves_no_temporary(tmp_path):
    _save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]


@pytest.mark.parametrize("then", ["save", "from_pretrained", "load_adapters"])
def test_orphans_of_a_dead_process_are_removed_by_the_next_save_or_load(tmp_path, then):
    model = _save(tmp_path)
    orphans = _orphans(tmp_path, _dead_pid())
    if then == "save":
        model.save_pretrained(tmp_path)
    elif then == "from_pretrained":
        peft.PeftModel.from_pretrained(mlp()[0], tmp_path)
    else:
        surm.peft.load_adapters(peft.PeftModel.from_pretrained(mlp()[0], tmp_path), {"other": tmp_path})
    assert not any(p.exists() for p in orphans)
    assert {p.name for p in tmp_path.iterdir()} == {"README.md", "adapter_config.json", "adapter_model.safetensors"}


def test_temporaries_of_a_running_process_and_other_files_are_kept(tmp_path):
    _save(tmp_path)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        in_progress = _orphans(tmp_path, running.pid)
        not_ours = [tmp_path / name for name in (".surm-tmp-notes", "adapter_config.json.tmp", ".surm-tmp-12-xyz-a")]
        for path in not_ours:
            path.write_text("someone else's")
        assert remove_orphans(tmp_path) == []
        assert all(p.exists() for p in in_progress + not_ours)
    finally:
        running.kill()
        running.wait()
    assert sorted(remove_orphans(tmp_path)) == sorted(in_progress)  # its writer is gone now


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch, peft, surm
    sys.path.insert(0, {root!r})
    from tests.peft.tiny_models import mlp
    torch.manual_seed(0)
    model = peft.get_peft_model(mlp()[0], surm.SurmConfig(target_modules=["fc1", "fc2"], alpha=1.0))
    model.save_pretrained({folder!r})
    model.peft_config["default"].alpha = 2.0
    def killed(*args):  # the process dies between writing the temporary and renaming it
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace = killed
    model.save_pretrained({folder!r})
""")


def test_a_save_killed_before_its_rename_keeps_the_old_config_and_its_orphan_goes_on_load(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = _KILLED_SAVE.format(root=root, folder=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    orphans = [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]
    assert len(orphans) == 1 and orphans[0].is_dir(), sorted(p.name for p in tmp_path.iterdir())
    assert json.loads((orphans[0] / "adapter_config.json").read_text())["alpha"] == 2.0  # the new config, unrenamed
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alpha"] == 1.0  # the old one, whole
    config = surm.SurmConfig.from_pretrained(tmp_path)
    assert config.alpha == 1.0
    assert not orphans[0].exists()
