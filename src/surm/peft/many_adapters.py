"""Many adapters resident on one base: load a folder of saved SURM adapters in one pass.

``PeftModel.load_adapter`` matches the config's targets against every module of the model and
builds the whole model's state dict once per adapter, so loading N adapters costs N times a
cost that itself grows with the adapters already resident. :func:`load_adapters` matches each
distinct targeting once, adds every adapter to the layers that already carry SURM adapters,
and copies its tensors straight from the file into them, with the checks of a single load:
the saved signature (family, knobs, placement) must be what the config builds, and every
tensor must have its counterpart, with its shape. A failing adapter is taken out again, the
ones loaded before it stay, and the error names the folder.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from .config import SurmConfig
from .file_checks import WEIGHTS_NAME, check_saved_adapter
from .layer import SurmLayer, check_adapter_name, decode_signature, signatures_agree
from .model import matched_targets, planned_matrix

#: a layer's per-adapter stores besides the matrix, saved as ``<module>.<store>``
_STORES = ("surm_bias", "surm_inner_bias", "surm_signature")
#: config fields that decide which modules an adapter targets
_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "placement")


def load_adapters(model: PeftModel, adapters: Mapping[str, str | os.PathLike]) -> list[str]:
    """Load the SURM adapters ``{name: folder}`` (each written by ``save_pretrained``) onto
    ``model``, a ``PeftModel`` holding at least one SURM adapter, for inference. Returns the
    names loaded, in order. Adapters whose targets some layer does not carry yet, or that
    save ``modules_to_save``, go through ``model.load_adapter`` (PEFT's own load)."""
    if not isinstance(model, PeftModel) or not any(isinstance(m, SurmLayer) for m in model.modules()):
        raise TypeError("load_adapters: pass a PeftModel with a SURM adapter, e.g. from PeftModel.from_pretrained")
    for name in adapters:
        check_adapter_name(name)
    taken = [name for name in adapters if name in model.peft_config]
    if taken:
        raise ValueError(f"load_adapters: the model already has adapter(s) {', '.join(taken)}; pick other names "
                         f"or delete_adapter them first")
    layers = {key: m for key, m in model.base_model.model.named_modules() if isinstance(m, SurmLayer)}
    matched: dict[tuple, list[str] | None] = {}
    loaded = []
    for name, folder in adapters.items():
        folder = Path(folder)
        config = _config(folder)
        targeting = tuple(repr(getattr(config, f)) for f in _TARGETING)
        if targeting not in matched:
            matched[targeting] = _targets(model, config, layers)
        targets = matched[targeting]
        if targets is None or config.modules_to_save:
            model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            layers = {key: m for key, m in model.base_model.model.named_modules() if isinstance(m, SurmLayer)}
            matched.clear()
        else:
            _load_into_layers(model, name, config, folder, {key: layers[key] for key in targets})
        loaded.append(name)
    return loaded


def _config(folder: Path) -> SurmConfig:
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"load_adapters: {folder} has no adapter_config.json; is it a saved adapter folder?")
    config = SurmConfig.from_pretrained(str(folder))
    if not isinstance(config, SurmConfig):
        raise ValueError(f"load_adapters: {folder} holds a {type(config).__name__}, not a SURM adapter")
    config.inference_mode = True
    return config


def _targets(model: PeftModel, config: SurmConfig, layers: dict[str, SurmLayer]) -> list[str] | None:
    """The module names ``config`` targets, or None when one of them carries no SURM layer yet."""
    keys = [key for key, _ in matched_targets(copy.copy(config), model.base_model.model)]
    return keys if all(key in layers for key in keys) else None


def _load_into_layers(
    model: PeftModel, name: str, config: SurmConfig, folder: Path, layers: dict[str, SurmLayer]
) -> None:
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"load_adapters: {folder} has no {WEIGHTS_NAME}")
    try:  # from the file's header, before its tensors are read
        planned = {key: planned_matrix(config, key, layer.get_base_layer()) for key, layer in layers.items()}
        check_saved_adapter(folder, config.placement, config.alpha, planned, config.modules_to_save,
                            model.base_model.model)
    except ValueError as err:
        raise type(err)(f"load_adapters: {folder}: {err}") from err
    saved = load_file(str(weights))
    model.peft_config[name] = config
    try:
        for key, layer in layers.items():
            try:
                layer.update_layer(name, config, config.knobs_for(key), structure=config.structure_for(key),
                                   reactivate=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"load_adapters: {folder}: cannot build adapter {name!r} on {key}: {err}") from err
        _copy_tensors(name, saved, layers, folder)
    except Exception:
        model.base_model.delete_adapter(name)
        raise


def _copy_tensors(name: str, saved: dict[str, torch.Tensor], layers: dict[str, SurmLayer], folder: Path) -> None:
    """Every saved SURM tensor into its layer's adapter ``name``: the signature checked, each
    tensor's counterpart and shape checked, none left over and none missing."""
    prefix = "base_model.model."
    consumed = set()
    for key, layer in layers.items():
        own = {f"{prefix}{key}.surm_matrix.{p}": t for p, t in layer.surm_matrix[name].named_parameters()}
        for store in _STORES:
            if name in getattr(layer, store):
                own[f"{prefix}{key}.{store}"] = getattr(layer, store)[name]
        signature = f"{prefix}{key}.surm_signature"
        if signature in saved:
            built, found = decode_signature(own[signature], signature), decode_signature(saved[signature], signature)
            if not signatures_agree(found, built):
                raise ValueError(f"load_adapters: {folder}: the tensors of {key} were saved as {found}, but "
                                 f"adapter_config.json builds {built}; the config does not describe these weights")
        for file_key, tensor in own.items():
            if file_key == signature:  # checked above, or saved before signatures were recorded
                consumed.add(file_key)
                continue
            if file_key not in saved:
                raise ValueError(f"load_adapters: {folder}: the file has no {file_key!r}, which the config builds")
            if saved[file_key].shape != tensor.shape:
                raise ValueError(f"load_adapters: {folder}: {file_key!r} has shape {tuple(saved[file_key].shape)}, "
                                 f"the model's has {tuple(tensor.shape)}: saved for another base or other knobs?")
            with torch.no_grad():
                tensor.copy_(saved[file_key])
            consumed.add(file_key)
    extra = [k for k in saved if "surm_" in k and k not in consumed]
    if extra:
        raise ValueError(f"load_adapters: {folder}: tensor {extra[0]!r} (and {len(extra) - 1} more) has no "
                         f"counterpart among the layers its config targets")
