"""``SurmModel``: the PEFT tuner that injects :class:`SurmLayer` into a model."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import (
    AuxiliaryTrainingWrapper,
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from torch import nn

from surm import structured

from . import quantized
from .config import SurmConfig
from .file_checks import check_saved_adapter, is_loading_from, misfit, signature_mismatch
from .layer import SurmLayer, check_adapter_name, decode_signature, features, signatures_agree, unsupported_reason
from .mixed import adapter_names_hooks
from .targets import PARALLEL_TARGETS, default_targets


def _show(targets: Any) -> str:
    return repr(sorted(targets)) if isinstance(targets, (set, list, tuple)) else repr(targets)


class SurmModel(BaseTuner):
    """Creates a SURM model from a (transformers or plain PyTorch) model; use it through
    ``peft.get_peft_model(model, SurmConfig(...))``."""

    prefix: str = "surm_"
    tuner_layer_cls = SurmLayer
    target_module_mapping = PARALLEL_TARGETS

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """What ``PeftModel.forward`` / ``generate`` enter around the base model's call: passes
        ``adapter_names`` (one adapter name or ``"__base__"`` per row) to every SURM layer;
        see :mod:`surm.peft.mixed`."""
        with adapter_names_hooks(self, kwargs.pop("adapter_names", None), kwargs.get("num_beams")):
            yield

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, after a check of the adapter name; the model as it was is remembered
        (:class:`_Before`), so that an injection that fails halfway, or a load that fails after it,
        leaves the model exactly as it was: no wrapper, adapter entry or changed requires_grad."""
        check_adapter_name(adapter_name)
        before = _Before(model, adapter_name)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except Exception:
            before.restore(self)
            raise
        self._before_last_injection = before

    def _prepare_adapter_config(self, peft_config: SurmConfig, model_config: dict) -> SurmConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            targets = default_targets(model_type, peft_config.placement)
            if targets is None:
                raise ValueError(
                    f"SurmConfig: no default target modules for model type {model_type!r} with "
                    f"placement={peft_config.placement!r}; pass target_modules=[...] (module names or a regex)."
                )
            peft_config.target_modules = set(targets)
        return peft_config

    def _prepare_model(self, peft_config: SurmConfig, model: nn.Module) -> None:
        """Check every target before any layer is replaced, so a bad config changes nothing:
        each target's structure (``structure_pattern``) must take its knobs and fit its shape,
        and every ``knob_pattern`` / ``structure_pattern`` key must match a target. When PEFT is
        loading the adapter from a folder (the config came from ``SurmConfig.from_pretrained``),
        the saved file is checked against these targets too (:mod:`.file_checks`)."""
        targets = matched_targets(peft_config, model)
        _check_patterns_match(peft_config, [key for key, _ in targets])
        planned = {key: planned_matrix(peft_config, key, base) for key, base in targets}
        folder = getattr(peft_config, "_source", None)
        if is_loading_from(folder):
            check_saved_adapter(folder, peft_config.placement, peft_config.alpha, planned,
                                peft_config.modules_to_save, model)

    def _create_and_replace(
        self,
        peft_config: SurmConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        knobs = peft_config.knobs_for(current_key)
        structure = peft_config.structure_for(current_key)
        if isinstance(target, SurmLayer):
            target.update_layer(adapter_name, peft_config, knobs, structure=structure)
            return
        new_module = SurmLayer(target, adapter_name, peft_config, knobs, structure=structure)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """PEFT's, but unloading (``new_module`` is ``child``'s own base layer) only puts the base layer
        back: PEFT would copy ``child.weight`` onto it, which an HQQ layer does not have."""
        if isinstance(child, SurmLayer) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SurmConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's key mapping, then a check that every SURM tensor of the checkpoint has a
        counterpart of the same shape: an adapter saved for another base model fails loudly
        (naming the first tensor that does not fit) instead of loading partially."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        prefix = "base_model.model."
        needs_prefix = any(k.startswith(prefix) for k in own)
        pairs = [
            (ckpt_key, key, key if needs_prefix else key.removeprefix(prefix))
            for ckpt_key, key in zip(state_dict, remapped)
            if cls.prefix in key
        ]
        for ckpt_key, key, model_key in pairs:  # what the tensors are, before their shapes
            if ckpt_key.endswith(".surm_signature") and model_key in own:
                try:
                    saved = decode_signature(remapped[key], ckpt_key)
                except ValueError:
                    _remove_adapter(model, adapter_name)
                    raise
                built = decode_signature(own[model_key], model_key)
                if not signatures_agree(saved, built):
                    _remove_adapter(model, adapter_name)
                    module = ckpt_key.removeprefix(prefix).removesuffix(".surm_signature")
                    raise ValueError(signature_mismatch(module, saved, built))
                remapped[key] = own[model_key].clone()  # agreed: keep the full one (older files lack alpha)
        for ckpt_key, key, model_key in pairs:
            if model_key not in own:
                problem = f"checkpoint tensor {ckpt_key!r} has no counterpart in this model"
            elif own[model_key].shape != remapped[key].shape:
                problem = (
                    f"checkpoint tensor {ckpt_key!r} has shape {tuple(remapped[key].shape)} but the model's "
                    f"{model_key!r} has shape {tuple(own[model_key].shape)}"
                )
            else:
                continue
            _remove_adapter(model, adapter_name)
            raise ValueError(misfit(problem))
        return _with_signatures(remapped, own, adapter_name, needs_prefix, prefix)

    def _check_merge_allowed(self) -> None:
        """PEFT's checks, then every SURM layer's: a layer whose quantized weight cannot take a
        merge (torchao) refuses before any layer is merged, so the model stays as it was."""
        super()._check_merge_allowed()
        for name, module in self.model.named_modules():
            if isinstance(module, SurmLayer) and module.surm_matrix:
                problem = quantized.merge_problem(module.get_base_layer())
                if problem:
                    raise ValueError(f"surm: cannot merge into {name}: {problem}.")

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's merge; merges into quantized weights are reported in one warning for the model."""
        with quantized.collected(self._layer_names()):
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        """PEFT's unload (``merge_and_unload``, ``unload``); rounding of merges into quantized weights
        is reported in one warning for the model."""
        with quantized.collected(self._layer_names()):
            return super()._unload_and_optionally_merge(merge, *args, **kwargs)

    def _layer_names(self) -> dict[int, str]:
        return {id(m): name for name, m in self.model.named_modules() if isinstance(m, SurmLayer)}

    def supports_lora_conversion(self, adapter_name: str | None = None) -> bool:
        """Whether PEFT's ``convert_to_lora`` can export ``adapter_name`` (default: the active
        adapters) from every SURM layer; see :mod:`surm.peft.lora_export`."""
        names = [adapter_name] if adapter_name is not None else list(self.active_adapters)
        layers = [m for m in self.model.modules() if isinstance(m, SurmLayer)]
        return bool(layers) and all(m.supports_lora_conversion(a) for m in layers for a in names)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "auto"
    ) -> None:
        """A new adapter ``adapter_name`` whose update is exactly ``sum_i weights[i] * update_i``;
        see :func:`surm.peft.weighted.add_weighted_adapter`."""
        from .weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type=combination_type)


def matched_targets(config: SurmConfig, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, base layer)`` of every module of ``model`` that ``config`` targets, in model
    order, as PEFT will match them. ``target_modules="all-linear"`` is expanded first, as PEFT
    does (every Linear and Conv1D but the output head), in ``config`` itself; modules inside
    adapter layers are skipped. Raises ValueError when nothing matches (naming the layers that
    exist, or the filters that removed every match) and TypeError for a layer SURM cannot
    adapt."""
    _include_all_linear_layers(config, model)
    modules = list(model.named_modules())
    wrapped = tuple(k + "." for k, m in modules if k and isinstance(m, BaseTunerLayer))
    matched, candidates = [], []
    for key, module in modules:
        if not key or key.startswith(wrapped):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if unsupported_reason(base) is None:
            candidates.append(key)
        result = check_target_module_exists(config, key)
        if result and not isinstance(result, _ExcludedModule):
            matched.append((key, base))
    if not matched:
        _explain_filtered_targets(config, [k for k, _ in modules if k and not k.startswith(wrapped)])
        names = sorted({k.rsplit(".", 1)[-1] for k in candidates})
        raise ValueError(
            f"SurmConfig: target_modules={_show(config.target_modules)} matched no module of this "
            f"model. Adaptable layer names here: {', '.join(names) or 'none'} "
            f"(full names such as {', '.join(candidates[:3])})."
        )
    for key, base in matched:
        reason = unsupported_reason(base)
        if reason:
            raise TypeError(f"surm: cannot adapt {key}: {reason}. Leave it out of target_modules.")
    return matched


def planned_matrix(config: SurmConfig, key: str, base: nn.Module) -> structured.StructuredMatrix:
    """The S that ``config`` builds on target ``key`` (base layer ``base``), on the meta device:
    nothing allocated. Raises ValueError naming the module and the fix when its structure does
    not take its knobs, the knobs do not fit its shape, or fused=True meets a quantized weight."""
    n_in, n_out = features(base)
    m, n = (n_out, n_out) if config.placement == "serial" else (n_out, n_in)
    structure, knobs = config.structure_for(key), config.knobs_for(key)
    accepted = structured.knob_names(structure)
    foreign = [k for k in knobs if k not in accepted]
    if foreign:
        raise ValueError(
            f"surm: cannot adapt {key}: its structure is {structure!r} but knob_pattern gives it "
            f"{', '.join(foreign)} (knobs of {structure}: {', '.join(accepted) or 'none'}). Make the "
            f"knob_pattern key that matches {key} fit its structure, or give the module its own key."
        )
    fmt = quantized.weight_format(base)
    if config.fused and config.placement == "parallel" and fmt != "dense":
        stored = type(quantized.stored_weight(base)).__name__
        raise ValueError(
            f"surm: cannot adapt {key} with fused=True: its weight is {fmt} ({stored}), "
            f"and the fused path builds W0 + alpha S from a plain float weight. Leave fused=None (the "
            f"default): on a quantized layer the adapter runs beside the layer's own matmul."
        )
    try:
        return structured.make(structure, m, n, device="meta", **knobs)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"surm: cannot adapt {key} ({type(base).__name__} {n_in}->{n_out}, {config.placement} "
            f"S of shape {m}x{n}): {err}. Set a knob that fits, for this module alone with "
            f"knob_pattern={{'{key.rsplit('.', 1)[-1]}': {{...}}}}."
        ) from None


def _include_all_linear_layers(config: SurmConfig, model: nn.Module) -> None:
    """PEFT's ``all-linear`` expansion, plus the Linear/Conv1D layers already wrapped by a SURM
    adapter (PEFT recognises wrapped layers by a class name containing "Linear", which
    :class:`SurmLayer` does not have, so a second adapter would otherwise match nothing)."""
    target = config.target_modules
    if not (isinstance(target, str) and target.lower() == "all-linear"):
        return
    _maybe_include_all_linear_layers(config, model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, SurmLayer) and module is not head:
            base = module.get_base_layer()
            if base is not head and isinstance(base, (nn.Linear, Conv1D)):
                config.target_modules.add(name)


def _check_patterns_match(config: SurmConfig, keys: list[str]) -> None:
    """A ``knob_pattern`` or ``structure_pattern`` key that matches no targeted module would be
    accepted and ignored (a typo, or a module left out of target_modules): refuse it."""
    from .config import _matches_end

    for field in ("knob_pattern", "structure_pattern"):
        for pattern in getattr(config, field):
            if not any(_matches_end(pattern, key) for key in keys):
                names = sorted({key.rsplit(".", 1)[-1] for key in keys})
                raise ValueError(
                    f"SurmConfig: {field} key {pattern!r} matches none of the {len(keys)} targeted modules "
                    f"(their names: {', '.join(names)}; e.g. {keys[0]}). Fix the key (a regex matched against "
                    f"the end of the module name) or add the module to target_modules."
                )


def _explain_filtered_targets(config: SurmConfig, keys: list[str]) -> None:
    """When target_modules names modules but layers_to_transform / layers_pattern /
    exclude_modules remove every one of them, raise an error that blames those filters."""
    unfiltered = copy.copy(config)
    unfiltered.layers_to_transform = unfiltered.layers_pattern = unfiltered.exclude_modules = None
    named = [k for k in keys if check_target_module_exists(unfiltered, k)]
    if not named:
        return
    filters = {
        field: getattr(config, field)
        for field in ("layers_to_transform", "layers_pattern", "exclude_modules")
        if getattr(config, field) is not None
    }
    shown = ", ".join(f"{field}={_show(value)}" for field, value in filters.items())
    raise ValueError(
        f"SurmConfig: target_modules={_show(config.target_modules)} matched {len(named)} modules "
        f"(such as {', '.join(named[:3])}), but {shown} removed all {len(named)}. Check the layer indices "
        f"(and layers_pattern, the name of the module list that holds the layers, e.g. 'layer' or 'layers') "
        f"or the exclusions."
    )


def _with_signatures(
    remapped: dict[str, torch.Tensor], own: dict[str, torch.Tensor], adapter: str, needs_prefix: bool, prefix: str
) -> dict[str, torch.Tensor]:
    """An adapter saved before surm recorded signatures has none: give its layers the ones the
    config builds (nothing to check against), so that PEFT does not report them missing."""
    marker = f".surm_matrix.{adapter}."
    modules = {key.split(marker)[0] for key in remapped if marker in key}
    for module in modules:
        key = f"{module}.surm_signature.{adapter}"
        model_key = key if needs_prefix else key.removeprefix(prefix)
        if key not in remapped and model_key in own:
            remapped[key] = own[model_key].clone()
    return remapped


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take a half-loaded adapter out again, leaving the model as it was before it was injected:
    its modules, which parameters require grad, and no ``peft_config`` attribute left behind."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, SurmModel):
        return
    before = getattr(tuner, "_before_last_injection", None)
    if before is None or before.adapter_name != adapter_name:
        tuner.delete_adapter(adapter_name)
        return
    before.restore(tuner)


class _Before:
    """A model as it was before adapter ``adapter_name`` was injected: the module object at each
    place, which parameters required grad, whether it had a ``peft_config`` attribute. It holds
    references only (no tensor is copied); :meth:`restore` puts it back."""

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self.modules = dict(model.named_modules())
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.had_peft_config = "peft_config" in vars(model)

    def restore(self, tuner: SurmModel) -> None:
        """Unwrap every module the injection wrapped, drop the adapter from layers that carried
        SURM adapters before, and set requires_grad and ``peft_config`` back."""
        self._put_modules_back()
        name = self.adapter_name
        for module in self.model.modules():
            if isinstance(module, SurmLayer) and name in module.surm_matrix:
                module.delete_adapter(name)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                module.delete_adapter(name, new_active_adapters=[a for a in module.active_adapters if a != name])
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)
        tuner.peft_config.pop(name, None)
        if not self.had_peft_config and "peft_config" in vars(self.model):
            del self.model.peft_config

    def _put_modules_back(self) -> None:
        for key in sorted(self.modules, key=lambda k: k.count(".")):  # parents first
            if not key:
                continue
            parent_key, _, attribute = key.rpartition(".")
            parent = self.model.get_submodule(parent_key)
            if getattr(parent, attribute, None) is not self.modules[key]:
                setattr(parent, attribute, self.modules[key])
