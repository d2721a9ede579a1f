"""The model catalog: every model a run can name, with what the harness needs to know of it.

A :class:`ModelEntry` says what data a model takes (its modality), how to load it (weights and
tokenizer), how to build its skeleton on the meta device (shapes only: a method is checked
against its layers before any weights load), where each method family puts its adapters (its
:class:`~surm.harness.models.profiles.Profile`) and how tables name it. :func:`entry` resolves a
name, an alias or a local transformers directory; :data:`DEFAULTS` gives each modality's model.

Adding a packaged model is adding one entry to :data:`CATALOG`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .profiles import EFFICIENTNET, Profile, transformer_profile

__all__ = ["ALIASES", "CATALOG", "DEFAULTS", "ModelEntry", "entry", "names"]

#: The modalities: labelled texts, labelled images, prompt -> response pairs.
MODALITIES = ("text", "image", "causal_lm")


@dataclass(frozen=True)
class ModelEntry:
    """A model a run can name.

    ``load(num_labels)`` returns ``(model, tokenizer)`` (``tokenizer`` None for an image model;
    ``num_labels`` is the new head's size, ignored by a causal LM, which has no new head);
    ``skeleton()`` the model on the meta device (a two-label head for classifiers);
    ``tokenizer()`` its tokenizer alone (None: an image model). ``packaged``: the weights ship
    inside an installed package (offline).
    """

    name: str
    modality: str
    title: str
    profile: Profile
    load: Callable[[int | None], tuple[Any, Any]]
    skeleton: Callable[[], Any]
    packaged: bool = True
    pretrained: bool = True
    tokenizer: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"model {self.name}: modality must be one of {MODALITIES}, got {self.modality!r}")


# --------------------------------------------------------------------------- loaders


def _quiet(load: Callable[[], Any]) -> Any:
    """``load()`` with transformers' load report (the newly initialised head) and bars silenced."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        return load()
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def _minilm(num_labels: int | None):
    from .packaged import load_text_classifier

    return _quiet(lambda: load_text_classifier(num_labels or 2, None))


def _minilm_path() -> str:
    from .packaged import packaged_text_model_path

    return str(packaged_text_model_path())


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_path(), local_files_only=True)


def _smollm2_tokenizer():
    from .packaged import causal_lm_tokenizer

    return causal_lm_tokenizer("smollm2-135m")


def _tiny_llama_tokenizer():
    from . import tiny

    return tiny.tokenizer()


def _tiny_bert(num_labels: int | None):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from . import tiny

    tokenizer = AutoTokenizer.from_pretrained(_minilm_path(), local_files_only=True)
    return BertForSequenceClassification(tiny.bert_config(tokenizer.vocab_size, num_labels or 2)), tokenizer


def _efficientnet(num_labels: int | None):
    from .packaged import load_image_classifier, plain_pointwise_convs

    return plain_pointwise_convs(load_image_classifier(num_labels or 2)), None


def _efficientnet_skeleton():
    import torch

    from .packaged import load_image_classifier, plain_pointwise_convs

    with torch.device("meta"):
        return plain_pointwise_convs(load_image_classifier(2, pretrained=False))


def _smollm2(num_labels: int | None):
    from .packaged import load_causal_lm

    return _quiet(lambda: load_causal_lm("smollm2-135m"))


def _tiny_llama(num_labels: int | None):
    from . import tiny

    return tiny.model(), tiny.tokenizer()


def _classifier_skeleton(config) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    config.num_labels = 2
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def _causal_lm_skeleton(config) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _minilm_skeleton():
    from transformers import AutoConfig

    return _classifier_skeleton(AutoConfig.from_pretrained(_minilm_path(), local_files_only=True))


def _tiny_bert_skeleton():
    from . import tiny

    return _classifier_skeleton(tiny.bert_config())


def _smollm2_skeleton():
    from .packaged import causal_lm_config

    return _causal_lm_skeleton(causal_lm_config("smollm2-135m"))


def _tiny_llama_skeleton():
    from . import tiny

    return _causal_lm_skeleton(tiny.llama_config())


_BERT = transformer_profile("bert", head="classifier")
_LLAMA = transformer_profile("llama", head=None)

#: The models runs know by name.
CATALOG: dict[str, ModelEntry] = {
    "minilm": ModelEntry("minilm", "text", "MiniLM", _BERT, _minilm, _minilm_skeleton, tokenizer=_minilm_tokenizer),
    "tiny-bert": ModelEntry("tiny-bert", "text", "A tiny random BERT", _BERT, _tiny_bert, _tiny_bert_skeleton,
                            pretrained=False, tokenizer=_minilm_tokenizer),
    "efficientnet": ModelEntry("efficientnet", "image", "EfficientNet-Lite0", EFFICIENTNET, _efficientnet,
                               _efficientnet_skeleton),
    "smollm2-135m": ModelEntry("smollm2-135m", "causal_lm", "SmolLM2-135M-Instruct", _LLAMA, _smollm2,
                               _smollm2_skeleton, tokenizer=_smollm2_tokenizer),
    "tiny-llama": ModelEntry("tiny-llama", "causal_lm", "tiny random Llama", _LLAMA, _tiny_llama,
                             _tiny_llama_skeleton, pretrained=False, tokenizer=_tiny_llama_tokenizer),
}
#: Other names of catalog models.
ALIASES = {"smollm2": "smollm2-135m"}
#: The model a run takes when it names none, by the modality of its data.
DEFAULTS = {"text": "minilm", "image": "efficientnet", "causal_lm": "smollm2-135m"}


def names() -> list[str]:
    """The catalog's model names."""
    return list(CATALOG)


def entry(name: str | None, modality: str) -> ModelEntry:
    """The model ``name`` (a catalog name, an alias, or a local transformers directory) for data
    of ``modality``; None: the modality's default (:data:`DEFAULTS`).

    Raises ValueError: an unknown name (not a directory either: runs are offline), a model
    that takes other data than ``modality``, or a directory without a transformers config.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; one of {', '.join(MODALITIES)}")
    name = DEFAULTS[modality] if name is None else ALIASES.get(name, name)
    if name in CATALOG:
        found = CATALOG[name]
    elif Path(name).is_dir():
        found = _local(str(Path(name)), modality)
    else:
        raise ValueError(f"unknown model {name!r}: choose {', '.join(CATALOG)} or a local transformers model "
                         f"directory")
    if found.modality != modality:
        takes = {"text": "labelled texts", "image": "labelled images", "causal_lm": "prompt -> response pairs"}
        raise ValueError(f"model {found.name} takes {takes[found.modality]}, but the data are "
                         f"{takes[modality]} (their default model: {DEFAULTS[modality]})")
    return found


@lru_cache(maxsize=32)
def _local(path: str, modality: str) -> ModelEntry:
    """An entry for a local transformers directory: its config's model type gives the profile;
    text data make it a sequence classifier, prompt -> response data a causal LM."""
    from transformers import AutoConfig

    if modality == "image":
        raise ValueError(f"model {path!r}: a local directory is a transformers model; image runs take efficientnet")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {path!r}: no transformers config there ({str(err).splitlines()[0]})") from None
    if modality == "text":
        skeleton = lambda: _checked_classifier(config, path)  # noqa: E731
        head = _head_name(skeleton())
        load = lambda num_labels: _local_classifier(path, num_labels)  # noqa: E731
    else:
        skeleton = lambda: _causal_lm_skeleton(config)  # noqa: E731
        head = None
        load = lambda num_labels: _local_causal_lm(path)  # noqa: E731
    return ModelEntry(path, modality, Path(path).name, transformer_profile(config.model_type, head), load, skeleton,
                      packaged=False, tokenizer=lambda: _local_tokenizer(path))


def _checked_classifier(config, path: str):
    try:
        return _classifier_skeleton(config)
    except ValueError as err:
        raise ValueError(f"model {path!r} is no sequence classifier ({str(err).splitlines()[0]})") from None


def _head_name(model) -> str | None:
    """The classification head's module name (``classifier`` for BERT, ``score`` for GPT-2)."""
    children = dict(model.named_children())
    return next((name for name in ("classifier", "score") if name in children), None)


def _local_classifier(path: str, num_labels: int | None):
    from .packaged import load_text_classifier

    return _quiet(lambda: load_text_classifier(num_labels or 2, path))


def _local_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _local_causal_lm(path: str):
    from .packaged import load_causal_lm

    return _quiet(lambda: load_causal_lm(path))
