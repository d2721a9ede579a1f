"""A run's model on the meta device, to check a method against its layers before any weights load.

``surm finetune``, ``surm plan`` and the experiments' :class:`~surm.experiments.store.Runner`
use it so that a bad method for a model (a block size that divides no layer, a knob the family
lacks, a PEFT method that cannot adapt convolutions) fails before training starts, not after
hours of other runs.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["check_fits", "skeleton", "text_model_path"]


def text_model_path(model: str) -> str:
    """Where a text model's config and tokenizer are: the packaged MiniLM (also the tokenizer
    of tiny-bert), or the model's own directory or name."""
    from surm.models import packaged_text_model_path

    return str(packaged_text_model_path()) if model in ("minilm", "tiny-bert") else model


def skeleton(spec) -> nn.Module:
    """``spec``'s model (a :class:`~surm.experiments.runs.RunSpec`), built on the meta device:
    its layers and shapes, no weights (the classification head has 2 outputs).

    Raises ValueError: an unknown model, a folder without a transformers config, or a model
    that is no sequence classifier.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

    from surm import methods
    from surm.models import load_image_classifier

    from .runs import TINY_BERT

    if spec.model == "efficientnet":
        with torch.device("meta"):
            return methods.plain_pointwise_convs(load_image_classifier(2, pretrained=False))
    if spec.model == "tiny-bert":
        config = BertConfig(**TINY_BERT)
    elif spec.model != "minilm" and not Path(spec.model).is_dir():  # not looked up online: runs are offline
        raise ValueError(f"unknown model {spec.model!r}: choose minilm, tiny-bert, efficientnet or a local "
                         f"transformers model directory")
    else:
        try:
            config = AutoConfig.from_pretrained(text_model_path(spec.model))
        except (OSError, ValueError) as err:
            raise ValueError(f"model {spec.model!r}: no transformers config there "
                             f"({str(err).splitlines()[0]})") from None
    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except ValueError as err:
        raise ValueError(f"model {spec.model!r} is no sequence classifier ({str(err).splitlines()[0]})") from None


def check_fits(spec, adapter=None) -> None:
    """Apply ``spec``'s method (or ``adapter``, a config) to the skeleton of its model: an unknown
    model, a knob the family lacks or a block size that does not divide a layer fails here, as a
    ValueError naming the method and the model, with no weights loaded."""
    from surm import methods

    model = skeleton(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            methods.apply(model, spec.method if adapter is None else copy.deepcopy(adapter), spec.profile)
    except (ValueError, TypeError) as err:
        what = spec.method.name if adapter is None else "the adapter config"
        raise ValueError(f"{what} on {spec.model}: {err}") from None
