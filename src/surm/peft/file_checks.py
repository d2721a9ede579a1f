"""A saved SURM adapter checked against what its config builds, before any module is replaced.

``PeftModel.from_pretrained`` and ``load_adapter`` first wrap the target modules, then read the
weights. A file that cannot fit would fail only then, with the model already changed. Here the
folder is read first, from the safetensors header alone (names, shapes, dtypes; no tensor is
loaded but the signatures, a few hundred bytes each): the file must be complete, hold exactly
the SURM tensors the config builds on this model, with their shapes and a floating dtype, and
each saved signature must be what the config builds. The checks of the load itself stay, as a
second line (:meth:`SurmModel._remap_adapter_state_dict_for_load`).

File keys are ``base_model.model.<module>.<store>[.<parameter>]``: PEFT drops the adapter name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from surm import structured

from .layer import adapter_signature, check_signature_layout, decode_signature, side_tensor_shapes, signatures_agree

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_OTHER_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                 "BOOL": torch.bool}


def folder_being_loaded() -> Path | None:
    """The folder (``model_id``) that PEFT's ``PeftModel.from_pretrained`` or ``load_adapter``,
    the innermost one on the call stack, is loading; None when neither runs: then the adapter
    being injected is a new one (``get_peft_model``), whatever config it was given."""
    from peft import PeftModel

    loaders = {PeftModel.from_pretrained.__func__.__code__, PeftModel.load_adapter.__code__}
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in loaders:
            model_id = frame.f_locals.get("model_id")
            return Path(model_id) if isinstance(model_id, (str, os.PathLike)) else None
        frame = frame.f_back
    return None


def is_loading_from(folder: Path | None) -> bool:
    """Whether PEFT is loading the adapter saved in ``folder`` (the folder a config was read
    from): it loads that folder or the one above it (``subfolder=``). A config read from one
    folder and passed to a load of another (``config=``) is not checked against either."""
    loading = folder_being_loaded()
    if folder is None or loading is None:
        return False
    folder, loading = folder.resolve(), loading.resolve()
    return loading == folder or loading in folder.parents


def check_saved_adapter(folder: Path, placement: str, alpha: float, planned: dict[str, structured.StructuredMatrix],
                        modules_to_save: list[str] | None, model: nn.Module) -> None:
    """Refuse (ValueError naming the tensor and the fix) a saved adapter in ``folder`` that does not
    fit: ``planned`` maps each target module's name in ``model`` to the matrix S its config builds
    there (on the meta device). Pickled weights (``adapter_model.bin``) cannot be read without
    loading them and are left to the load's own checks."""
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLED_WEIGHTS_NAME).is_file():
            return
        raise ValueError(
            f"surm: {folder} has adapter_config.json but no {WEIGHTS_NAME}: the save was interrupted or the weights "
            f"were moved. Save the adapter again, or copy its {WEIGHTS_NAME} beside the config."
        )
    expected, signatures = _expected_tensors(placement, alpha, planned)
    with _opened(weights) as file:
        header = {key: (tuple(file.get_slice(key).get_shape()), file.get_slice(key).get_dtype()) for key in file.keys()}
        for key, built in signatures.items():
            if key in header:
                _check_signature(file, key, header[key], built)
    for key, (shape, dtype) in header.items():
        if key in signatures:
            continue  # checked above
        if "surm_" in key:
            _check_surm_tensor(key, shape, dtype, expected)
        else:
            _check_saved_module_tensor(key, shape, modules_to_save, model)
    missing = [key for key in expected if key not in header]
    if missing:
        more = f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else ""
        raise ValueError(misfit(f"the config builds {missing[0]!r}{more}, which the file does not hold"))


def misfit(problem: str) -> str:
    """The message of an adapter whose tensors do not fit the model."""
    return (f"surm: the adapter does not fit this base model: {problem}. Was it saved for a different base model "
            f"or with other knobs?")


def signature_mismatch(module: str, saved: dict[str, Any], built: dict[str, Any]) -> str:
    """The message of a saved signature that is not what the config builds."""
    return (
        f"surm: the adapter's tensors for {module} were saved as {_describe(saved)}, but its config builds "
        f"{_describe(built)}. adapter_config.json does not describe these weights; set structure, its knobs, "
        f"placement and alpha back to what was trained."
    )


def _describe(signature: dict[str, Any]) -> str:
    knobs = ", ".join(f"{k}={v}" for k, v in signature.items() if k not in ("structure", "placement", "alpha"))
    alpha = f" and alpha={signature['alpha']}" if "alpha" in signature else ""
    return f"{signature['structure']}({knobs}) with placement={signature['placement']!r}{alpha}"


def _expected_tensors(
    placement: str, alpha: float, planned: dict[str, structured.StructuredMatrix]
) -> tuple[dict[str, tuple[int, ...]], dict[str, dict[str, Any]]]:
    """The file keys and shapes of the float tensors the config builds, and the signature of each
    module (saved signatures are optional: files written before they existed have none)."""
    shapes, signatures = {}, {}
    for module, S in planned.items():
        for name, param in S.named_parameters():
            shapes[f"{PREFIX}{module}.surm_matrix.{name}"] = tuple(param.shape)
        for store, shape in side_tensor_shapes(S, placement).items():
            shapes[f"{PREFIX}{module}.{store}"] = shape
        signatures[f"{PREFIX}{module}.surm_signature"] = adapter_signature(S, placement, alpha)
    return shapes, signatures


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``safe_open`` of the weights (it reads the header and checks that the file covers every
    tensor it lists), a damaged or truncated file reported as a ValueError naming it."""
    try:
        file = safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise ValueError(
            f"surm: {path} is not a readable safetensors file ({err}): it is truncated (an interrupted save or "
            f"copy) or damaged. Save the adapter again."
        ) from None
    with file:
        yield file


def _torch_dtype(dtype: str) -> torch.dtype | str:
    return _FLOAT_DTYPES.get(dtype) or _OTHER_DTYPES.get(dtype) or dtype


def _check_signature(file: Any, key: str, layout: tuple[tuple[int, ...], str], built: dict[str, Any]) -> None:
    shape, dtype = layout
    check_signature_layout(_torch_dtype(dtype), shape, key)
    saved = decode_signature(file.get_tensor(key), key)
    if not signatures_agree(saved, built):
        raise ValueError(signature_mismatch(key.removeprefix(PREFIX).removesuffix(".surm_signature"), saved, built))


def _check_surm_tensor(key: str, shape: tuple[int, ...], dtype: str, expected: dict[str, tuple[int, ...]]) -> None:
    if key not in expected:
        raise ValueError(misfit(f"checkpoint tensor {key!r} has no counterpart in this model"))
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"surm: checkpoint tensor {key!r} is stored as {_torch_dtype(dtype)}, but SURM parameters are floating "
            f"point: the file is damaged or was converted by a tool that cast every tensor. Save the adapter again."
        )
    if shape != expected[key]:
        raise ValueError(misfit(f"checkpoint tensor {key!r} has shape {shape} but the config builds {expected[key]}"))


def _check_saved_module_tensor(key: str, shape: tuple[int, ...], modules_to_save: list[str] | None,
                               model: nn.Module) -> None:
    """A tensor of a module saved in full (``modules_to_save``) must fit the model's module."""
    module, _, name = key.removeprefix(PREFIX).rpartition(".")
    if not modules_to_save or not any(module == m or module.endswith("." + m) for m in modules_to_save):
        return  # not SURM's: PEFT's own load decides
    try:
        target = model.get_submodule(module)
    except AttributeError:
        raise ValueError(misfit(f"checkpoint tensor {key!r} (modules_to_save) has no module {module!r} here")) from None
    target = getattr(target, "original_module", target)  # already wrapped by an earlier adapter
    own = dict(target.named_parameters(recurse=False)) | dict(target.named_buffers(recurse=False))
    if name not in own:
        raise ValueError(misfit(f"checkpoint tensor {key!r} (modules_to_save) has no counterpart in {module!r}"))
    if tuple(own[name].shape) != shape:
        raise ValueError(misfit(f"checkpoint tensor {key!r} has shape {shape} but the model's {module}.{name} has "
                                f"shape {tuple(own[name].shape)}"))
