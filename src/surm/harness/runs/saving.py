"""What a finished run leaves on disk, one layout whatever the model:

``<out>/results.json``
    the run's record (metrics, parameters, times, memory, the loss curve);
``<out>/adapter/``
    PEFT methods: ``save_pretrained`` (``adapter_config.json``, ``adapter_model.safetensors``, the
    model card) with the tokenizer and, for a classifier, the model config with the labels
    (``id2label`` / ``label2id``), so that the folder serves inference as it is;
``<out>/trainable.safetensors``
    full fine-tuning, head only and BitFit: the tensors that trained, with the tokenizer and the
    labelled config beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["jsonable", "save_weights", "write_results"]


def save_weights(model, spec, label_names: list[str], out: Path) -> Path:
    """Save the trained weights of ``spec``'s run into ``out`` (the module docstring's layout);
    returns where they are."""
    import peft
    from safetensors.torch import save_file

    from surm.harness.methods import trainable_state

    entry = spec.model_entry
    if isinstance(model, peft.PeftModel):
        folder = weights = out / "adapter"
        model.save_pretrained(folder)
        base = model.get_base_model()
    else:
        folder, weights = out, out / "trainable.safetensors"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in trainable_state(model).items()}, str(weights))
        base = model
    if spec.modality == "text":
        base.config.id2label = dict(enumerate(label_names))
        base.config.label2id = {name: i for i, name in enumerate(label_names)}
        base.config.save_pretrained(folder)
    if entry.tokenizer is not None:
        entry.tokenizer().save_pretrained(folder)
    return weights


def write_results(record: dict, out: Path) -> Path:
    """``out/results.json`` (written whole or not at all)."""
    import os

    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    partial = out / ".results.json.partial"
    partial.write_text(json.dumps(record, indent=1, default=jsonable) + "\n")
    os.replace(partial, path)
    return path


def jsonable(value):
    """``json.dumps``' ``default``: numpy scalars, paths and sets (``SurmConfig.target_modules``)."""
    import numpy as np

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
