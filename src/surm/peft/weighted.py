"""Weighted combinations of SURM adapters (``SurmModel.add_weighted_adapter``).

``model.add_weighted_adapter(["a", "b"], [0.7, -0.3], "mix")`` adds an adapter ``mix`` whose
update in every adapted layer is exactly ``0.7 * update_a - 0.3 * update_b``; ``mix`` is then
an ordinary adapter (``set_adapter``, ``merge``, ``save_pretrained``/``from_pretrained``).

Parallel updates are ``alpha_i * S_i x``. With ``c_i = w_i * alpha_i / alpha`` (``alpha``: the
new adapter's, that of the first adapter):

- ``combination_type="linear"`` (the default for circulant, skew_circulant, toeplitz,
  symmetric_toeplitz, whose matrix is linear in its parameter ``weight``): one matrix of the
  same size, ``weight = sum_i c_i weight_i``;
- ``combination_type="cat"`` (the default for the bilinear kronecker, ldr and low_rank, as
  LoRA's ``cat``): the terms are concatenated, the weights folded into one factor:
  kronecker ``A = [c_i A_i]``, ``B = [B_i]`` (``terms`` adds up), ldr ``G = [c_i G_i]``,
  ``H = [H_i]`` (``rank`` adds up), low_rank ``B = [c_i B_i]``, ``A = [A_i]`` (``rank`` adds up).

Both are exact. Serial adapters combine only with ``activation="identity"``, where the update
``alpha S h + beta`` is linear: the same rules, plus ``beta = sum_i w_i beta_i`` (and, for the
low_rank bottleneck ``alpha B (A h + c) + beta``, ``c = [c_i]``). With a nonlinearity a weighted
sum of adapters is not the weighted sum of their updates, so that is refused.

All adapters must share the placement and, in each layer, the structure and the knobs that fix
the matrix's layout (circulant ``block_size``, kronecker ``factors``); a mismatch is refused
naming the adapters, the layer and the knob. Adapters with per-module structures
(``structure_pattern``, as ``surm.plan`` writes) combine layer by layer, each layer by its
family's rule ("auto"; an explicit ``combination_type`` must fit every layer's family), as long
as the adapters agree on the family of every layer they share; the new adapter's
``structure_pattern`` names the layers whose family is not its ``structure``. A layer that only
some of the adapters adapt gets the sum of those. The new adapter's :class:`SurmConfig` carries
per-module knobs (e.g. the grown ``rank``/``terms``) in ``knob_pattern`` where they differ from
its defaults, so it saves and loads like any other adapter. ``modules_to_save`` copies cannot be summed: at most
one of the adapters may hold a trained copy of a module, which the new adapter then gets
unchanged (the weights apply to the SURM updates only).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils.other import ModulesToSaveWrapper

from surm import structured

from .config import SurmConfig
from .layer import SurmLayer

if TYPE_CHECKING:
    from .model import SurmModel

COMBINATION_TYPES = ("auto", "linear", "cat")

#: bilinear families: the knob that grows under "cat" and, per parameter, (concat dim, whether
#: the weights are folded into it)
_CAT_RULES: dict[str, tuple[str, dict[str, tuple[int, bool]]]] = {
    "kronecker": ("terms", {"A": (0, True), "B": (0, False)}),
    "ldr": ("rank", {"G": (0, True), "H": (0, False)}),
    "low_rank": ("rank", {"A": (0, False), "B": (1, True)}),
}
_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def add_weighted_adapter(
    tuner: SurmModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "auto",
) -> None:
    """Add ``adapter_name`` with update ``sum_i weights[i] * update(adapters[i])`` (see the module
    docstring). Raises ValueError, changing nothing, when the adapters cannot be combined."""
    adapters, weights = _check_arguments(tuner, adapters, weights, adapter_name, combination_type)
    configs = [tuner.peft_config[a] for a in adapters]
    placement = configs[0].placement
    if not any(cfg.structure_pattern for cfg in configs):
        _require_same(adapters, configs, "structure")  # with structure_pattern: per layer, below
    _require_same(adapters, configs, "placement")
    if placement == "serial":
        for a, cfg in zip(adapters, configs):
            if cfg.activation != "identity":
                raise ValueError(
                    f"surm: cannot combine serial adapter {a!r}: its activation {cfg.activation!r} is not linear, "
                    f"so a weighted sum of adapters is not the weighted sum of their updates. Only serial "
                    f"adapters with activation='identity' (and parallel ones) combine."
                )

    layers = _layers(tuner, adapters)
    families = {name: _family(name, layer, adapters) for name, layer in layers.items()}
    methods = {name: _resolve_method(family, combination_type) for name, family in families.items()}
    grows = {name: None if methods[name] == "linear" else _CAT_RULES[families[name]][0] for name in layers}
    expected = {name: _expected_knobs(name, layer, adapters, grows[name]) for name, layer in layers.items()}
    sources = _modules_to_save_sources(tuner, adapters)

    config = _new_config(tuner, adapters, configs, layers, families, expected, grows)
    active = list(tuner.active_adapters)
    tuner.peft_config[adapter_name] = config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
        _check_injected(tuner, adapter_name, families, expected)
    except Exception:
        _discard(tuner, adapter_name, active)
        raise
    with torch.no_grad():
        for name, layer in layers.items():
            _fill(layer, adapters, weights, adapter_name, methods[name])
        for wrapper, source in sources:
            if adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())


# -- checks ------------------------------------------------------------------------------
def _check_arguments(tuner, adapters, weights, adapter_name, combination_type) -> tuple[list[str], list[float]]:
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(f"surm: adapters must be a non-empty list of adapter names, got {adapters!r}")
    adapters = list(adapters)
    for a in adapters:
        if a not in tuner.peft_config:
            raise ValueError(f"surm: adapter {a!r} does not exist; adapters: {sorted(tuner.peft_config)}")
        if not isinstance(tuner.peft_config[a], SurmConfig):
            raise ValueError(f"surm: adapter {a!r} is not a SURM adapter")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(adapters):
        raise ValueError(
            f"surm: weights must be a list with one number per adapter ({len(adapters)}), got {weights!r}"
        )
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"surm: weights must be finite numbers, got {weights!r}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"surm: adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"surm: an adapter named {adapter_name!r} already exists; choose another name")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"surm: combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r} (SURM "
            f"combinations are exact: 'linear' for the linear families, 'cat' for the bilinear ones)"
        )
    return adapters, [float(w) for w in weights]


def _require_same(adapters: list[str], configs: list[SurmConfig], field: str) -> None:
    first = getattr(configs[0], field)
    for a, cfg in zip(adapters[1:], configs[1:]):
        if getattr(cfg, field) != first:
            raise ValueError(
                f"surm: cannot combine adapters {adapters[0]!r} ({field}={first!r}) and {a!r} "
                f"({field}={getattr(cfg, field)!r}): all adapters must share {field}"
            )


def _resolve_method(structure: str, combination_type: str) -> str:
    linear = issubclass(structured.get(structure), structured.LinearStructuredMatrix)
    if not linear and structure not in _CAT_RULES:
        raise ValueError(
            f"surm: add_weighted_adapter cannot combine {structure!r} adapters: a weighted sum of product forms "
            f"is not a product form of the same size. Merge them into the base weight instead "
            f"(merge_and_unload), or combine adapters of a direct family (circulant, toeplitz, ...)."
        )
    if combination_type == "auto":
        return "linear" if linear else "cat"
    if combination_type == "linear" and not linear:
        raise ValueError(
            f"surm: combination_type='linear' needs a structure linear in its parameters; {structure!r} is "
            f"bilinear (a weighted sum of its factors is not the weighted sum of the matrices). Use "
            f"combination_type='cat' (exact; the terms/rank add up) or 'auto'."
        )
    if combination_type == "cat" and linear:
        raise ValueError(
            f"surm: combination_type='cat' is for the bilinear structures (kronecker, ldr, low_rank); "
            f"{structure!r} is linear in its parameter, so use combination_type='linear' (exact, same size) "
            f"or 'auto'."
        )
    return combination_type


def _layers(tuner: SurmModel, adapters: list[str]) -> dict[str, SurmLayer]:
    layers = {
        name: m
        for name, m in tuner.model.named_modules()
        if isinstance(m, SurmLayer) and any(a in m.surm_matrix for a in adapters)
    }
    if not layers:
        raise ValueError(f"surm: no layer of the model holds any of the adapters {adapters}")
    return layers


def _family(name: str, layer: SurmLayer, adapters: list[str]) -> str:
    """The structure all adapters share in this layer (adapters with ``structure_pattern`` may
    differ between layers, never within one); refuses adapters of different families here."""
    present = [a for a in adapters if a in layer.surm_matrix]
    ref = layer.surm_matrix[present[0]].name
    for a in present[1:]:
        family = layer.surm_matrix[a].name
        if family != ref:
            raise ValueError(
                f"surm: cannot combine adapters {present[0]!r} ({ref}) and {a!r} ({family}) at {name}: all "
                f"adapters must share the structure in every layer they both adapt (a weighted sum of a {ref} "
                f"and a {family} matrix is neither)"
            )
    return ref


def _expected_knobs(name: str, layer: SurmLayer, adapters: list[str], grow: str | None) -> dict[str, Any]:
    """The knobs of the combined matrix in this layer; refuses layout knobs that differ."""
    present = [a for a in adapters if a in layer.surm_matrix]
    ref = present[0]
    ref_knobs = layer.surm_matrix[ref].knobs()
    for a in present[1:]:
        knobs = layer.surm_matrix[a].knobs()
        for key, value in ref_knobs.items():
            if key != grow and knobs[key] != value:
                raise ValueError(
                    f"surm: cannot combine adapters {ref!r} and {a!r}: they differ in {key} at {name} "
                    f"({value!r} vs {knobs[key]!r}); {key} fixes the matrix's layout, so it must be the same "
                    f"in every adapter combined"
                )
    expected = dict(ref_knobs)
    if grow is not None:
        expected[grow] = sum(layer.surm_matrix[a].knobs()[grow] for a in present)
    return expected


def _modules_to_save_sources(tuner: SurmModel, adapters: list[str]) -> list[tuple[ModulesToSaveWrapper, str]]:
    sources = []
    for name, module in tuner.model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        holders = sorted({a for a in adapters if a in module.modules_to_save})
        if len(holders) > 1:
            raise ValueError(
                f"surm: adapters {holders} each hold a trained copy of {name} (modules_to_save); copies of a "
                f"module cannot be summed. Combine adapters of which at most one saves {name}."
            )
        if holders:
            sources.append((module, holders[0]))
    return sources


# -- the new config ----------------------------------------------------------------------
def _new_config(
    tuner: SurmModel,
    adapters: list[str],
    configs: list[SurmConfig],
    layers: dict[str, SurmLayer],
    families: dict[str, str],
    expected: dict[str, dict[str, Any]],
    grows: dict[str, str | None],
) -> SurmConfig:
    first = configs[0]
    fields: dict[str, Any] = {"alpha": first.alpha if first.alpha != 0 else 1.0}
    own = [name for name in layers if families[name] == first.structure and grows[name] is not None]
    if own:  # the most common grown size is the default, the others go to knob_pattern
        grow = grows[own[0]]
        fields[grow] = Counter(expected[name][grow] for name in own).most_common(1)[0][0]
    knob_pattern = dict(first.knob_pattern)
    nullable = {key for k in expected.values() for key, v in k.items() if v is None}
    for key in nullable:  # a knob left at None (circulant block_size) cannot be set per module
        fields[key] = None
        knob_pattern = {}
    modules_to_save = []
    for cfg in configs:
        modules_to_save += [m for m in (cfg.modules_to_save or []) if m not in modules_to_save]
    fields["modules_to_save"] = modules_to_save or None
    fields.update(_targeting(tuner, configs, set(layers)))

    config = dataclasses.replace(first, **fields, knob_pattern=knob_pattern)
    explicit_knobs, explicit_structures = {}, {}
    for name, layer in layers.items():
        m, n = layer.adapter_shape(first.placement)
        structure, knobs = config.structure_for(name), config.knobs_for(name)
        try:
            built = (structure, structured.make(structure, m, n, device="meta", **knobs).knobs())
        except (TypeError, ValueError):
            built = None  # the inherited patterns do not build this layer: it is named explicitly
        if built != (families[name], expected[name]):
            explicit_knobs[re.escape(name)] = {k: v for k, v in expected[name].items() if v is not None}
            if structure != families[name]:
                explicit_structures[re.escape(name)] = families[name]
    if explicit_knobs or explicit_structures:
        # first in the dicts (the first matching key wins), replacing an inherited equal key
        knob_pattern = {**explicit_knobs, **{k: v for k, v in knob_pattern.items() if k not in explicit_knobs}}
        structure_pattern = {
            **explicit_structures,
            **{k: v for k, v in config.structure_pattern.items() if k not in explicit_structures},
        }
        config = dataclasses.replace(config, knob_pattern=knob_pattern, structure_pattern=structure_pattern)
    return config


def _targeting(tuner: SurmModel, configs: list[SurmConfig], names: set[str]) -> dict[str, Any]:
    """The inputs' targeting if they share one that selects exactly ``names``; otherwise the
    module names themselves."""
    first = {f: getattr(configs[0], f) for f in _TARGETING}
    if all({f: getattr(cfg, f) for f in _TARGETING} == first for cfg in configs[1:]):
        if _selects(tuner, configs[0], names):
            return first
    plain = {"exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}
    for targets in (set(names), "|".join(re.escape(n) for n in sorted(names))):
        candidate = dataclasses.replace(configs[0], target_modules=targets, knob_pattern={}, **plain)
        if _selects(tuner, candidate, names):
            return {"target_modules": targets, **plain}
    raise RuntimeError(f"surm: could not build target_modules selecting exactly {sorted(names)}")  # pragma: no cover


def _selects(tuner: SurmModel, config: SurmConfig, names: set[str]) -> bool:
    """Whether ``config`` targets exactly the modules ``names`` of the model."""
    wrapped = tuple(
        k + "." for k, m in tuner.model.named_modules() if k and isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))
    )
    selected = set()
    for key, _ in tuner.model.named_modules():
        if not key or key.startswith(wrapped):
            continue
        result = check_target_module_exists(config, key)
        if result and not isinstance(result, _ExcludedModule):
            selected.add(key)
    return selected == names


# -- injection and filling -----------------------------------------------------------------
def _check_injected(
    tuner: SurmModel, adapter_name: str, families: dict[str, str], expected: dict[str, dict[str, Any]]
) -> None:
    got = {
        name: (m.surm_matrix[adapter_name].name, m.surm_matrix[adapter_name].knobs())
        for name, m in tuner.model.named_modules()
        if isinstance(m, SurmLayer) and adapter_name in m.surm_matrix
    }
    expected = {name: (families[name], knobs) for name, knobs in expected.items()}
    if got != expected:  # pragma: no cover - the config was built to give exactly this
        raise RuntimeError(f"surm: the combined adapter's layers came out as {got}, expected {expected}")


def _discard(tuner: SurmModel, adapter_name: str, active: list[str]) -> None:
    """Remove a half-added adapter and restore the active adapters."""
    if any(isinstance(m, SurmLayer) and adapter_name in m.surm_matrix for m in tuner.model.modules()):
        tuner.delete_adapter(adapter_name)
        tuner.set_adapter(active)
    else:
        tuner.peft_config.pop(adapter_name, None)


def _fill(layer: SurmLayer, adapters: list[str], weights: list[float], new: str, method: str) -> None:
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.surm_matrix]
    alpha = layer.surm_alpha[new]
    coef = [w * layer.surm_alpha[a] / alpha for a, w in present]
    S = layer.surm_matrix[new]
    # the inputs' dtype (PEFT may have raised half-precision adapters to float32)
    dtype = next(layer.surm_matrix[present[0][0]].parameters()).dtype
    S.to(dtype)
    for store in (layer.surm_bias, layer.surm_inner_bias):
        if new in store:
            store[new].data = store[new].data.to(dtype)
    if method == "linear":
        S.weight.copy_(sum(c * layer.surm_matrix[a].weight for c, (a, _) in zip(coef, present)))
    else:
        for param, (dim, folded) in _CAT_RULES[S.name][1].items():
            parts = [
                getattr(layer.surm_matrix[a], param) * (c if folded else 1.0) for c, (a, _) in zip(coef, present)
            ]
            getattr(S, param).copy_(torch.cat(parts, dim=dim))
    if new in layer.surm_bias:  # serial, identity activation
        scale = layer.surm_bias_scale[new]
        layer.surm_bias[new].copy_(sum(w * layer.surm_bias_scale[a] / scale * layer.surm_bias[a] for a, w in present))
        if new in layer.surm_inner_bias:  # the bottleneck's inner bias c, concatenated as A
            layer.surm_inner_bias[new].copy_(torch.cat([layer.surm_inner_bias[a] for a, _ in present]))
