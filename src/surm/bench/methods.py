"""The methods the benchmarks compare, as PEFT configs built from short names."""

from __future__ import annotations

from typing import Any

import peft

import surm

#: name -> (kind, keyword arguments); "head" trains nothing inside the encoder (the floor).
BENCH_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "head": ("head", {}),
    "lora_r8": ("lora", {"r": 8}),
    "c3a_b64": ("c3a", {"block_size": 64}),
    "c3a_b384": ("c3a", {"block_size": 384}),
    "circulant": ("surm", {"structure": "circulant"}),
    "skew_circulant": ("surm", {"structure": "skew_circulant"}),
    "toeplitz": ("surm", {"structure": "toeplitz"}),
    "symmetric_toeplitz": ("surm", {"structure": "symmetric_toeplitz"}),
    "kronecker": ("surm", {"structure": "kronecker"}),
    "ldr_r1": ("surm", {"structure": "ldr", "rank": 1}),
    "ldr_r2": ("surm", {"structure": "ldr", "rank": 2}),
}


def peft_config(name: str, target_modules: list[str], modules_to_save: list[str] | None = None) -> peft.PeftConfig | None:
    """The PEFT config of benchmark method ``name`` (None for "head")."""
    kind, kwargs = BENCH_METHODS[name]
    if kind == "head":
        return None
    common = {"target_modules": target_modules, "modules_to_save": modules_to_save}
    if kind == "lora":
        return peft.LoraConfig(lora_alpha=2 * kwargs["r"], **kwargs, **common)
    if kind == "c3a":
        return peft.C3AConfig(**kwargs, **common)
    return surm.SurmConfig(**kwargs, **common)
