"""The packaged models in the Hugging Face cache under their Hub ids (links, offline loads)."""

import os
import subprocess
import sys

from surm.harness.models import hub_cache


def test_minilm_loads_by_its_hub_id_offline_from_the_registered_cache(tmp_path):
    snapshot = hub_cache.register("minilm", root=tmp_path)
    assert snapshot is not None and (snapshot / "config.json").is_symlink()
    assert hub_cache.register("minilm", root=tmp_path) == snapshot  # idempotent
    code = ("from transformers import AutoConfig, AutoTokenizer\n"
            "c = AutoConfig.from_pretrained('sentence-transformers/all-MiniLM-L6-v2')\n"
            "t = AutoTokenizer.from_pretrained('sentence-transformers/all-MiniLM-L6-v2')\n"
            "print(c.model_type, c.hidden_size, t('a film')['input_ids'][0])")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["bert", "384", "101"]


def test_a_real_download_is_never_shadowed(tmp_path):
    repo = tmp_path / "models--sentence-transformers--all-MiniLM-L6-v2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c9745ed1d9f207416be6d2e6f8de32d1f16199bf")
    assert hub_cache.register("minilm", root=tmp_path) is None
    assert (repo / "refs" / "main").read_text() == "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
    assert not (repo / "snapshots").exists()
