"""``surm bench quantized``: SURM and LoRA training on quantized SmolLM2-135M bases.

For each base format (float32, bfloat16 with float32 adapters, bitsandbytes int8
``Linear8bitLt``, bitsandbytes nf4 ``Linear4bit``, torchao int8 weight-only) every method's model
(SURM circulant and Toeplitz on q,v, SURM circulant on every linear map, LoRA r=8 on q,v) takes
AdamW training steps in interleaved rounds, all models in the same rounds, beside the frozen base
(forward and backward to the input embeddings, no adapter: what every method's step contains).
Reported per (format, method): the median step time, its ratio to LoRA on the same base and to
the same method on the float32 base, the overhead over the frozen base as a multiple of LoRA's
(step − frozen over LoRA's step − frozen), the adapter parameters, the bytes the base weights are
stored in, the peak of allocations during one step, and the merge: the adapter
weights drawn at random (so that the update is far from zero), ``merge_and_unload`` and the
largest change of the logits it causes against the unmerged model, beside the adapter's own
effect on the logits and the rounding surm reports; or "refused" with the reason.

The quantized bases load through transformers' quantization configs; every linear map of the
decoder is quantized, ``lm_head`` (tied to the embeddings) stays float32.
"""

from __future__ import annotations

import copy
import gc
import statistics
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import QUANT_FORMATS
from .adapters import ALL, QV, randomize_adapters
from .memory import peak_alloc_bytes
from .report import machine, markdown_table, write_json
from .timing import interleaved_samples

FORMATS = QUANT_FORMATS
#: the reference method of the ratios
LORA = "lora r=8 q,v"
#: the base alone: forward and backward to the input embeddings, nothing trained
FROZEN = "frozen base"


@dataclass(frozen=True)
class QuantMethod:
    """A method of the benchmark: its label and how to build its adapter config."""

    label: str
    config: Callable[[], Any]


def _surm(structure: str, targets: list[str]) -> Callable[[], Any]:
    def build():
        from surm.peft import SurmConfig

        return SurmConfig(structure=structure, target_modules=targets, task_type="CAUSAL_LM")

    return build


def _lora8(targets: list[str]) -> Callable[[], Any]:
    def build():
        from peft import LoraConfig

        return LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")

    return build


METHODS = (
    QuantMethod(FROZEN, None),
    QuantMethod("surm circulant q,v", _surm("circulant", QV)),
    QuantMethod("surm toeplitz q,v", _surm("toeplitz", QV)),
    QuantMethod("surm circulant all", _surm("circulant", ALL)),
    QuantMethod(LORA, _lora8(QV)),
)


def _quantization_config(fmt: str):
    """transformers' quantization config of a format (``BitsAndBytesConfig`` or ``TorchAoConfig``)."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if fmt == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if fmt == "bnb-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def load_in_format(base: torch.nn.Module, folder: Path, fmt: str) -> torch.nn.Module:
    """A copy of ``base`` (float32, saved in ``folder``) with its decoder's linear maps in ``fmt``,
    loaded from ``folder`` through transformers' quantization config, the way a user loads it
    (``lm_head``, tied to the embeddings, stays float32)."""
    if fmt == "float32":
        return copy.deepcopy(base)
    if fmt == "bfloat16":
        return copy.deepcopy(base).to(torch.bfloat16)
    from transformers import AutoModelForCausalLM

    from .training_step import quiet_transformers

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=_quantization_config(fmt),
                                                    device_map="cpu", dtype=torch.float32)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` is stored in: a tensor subclass (torchao) by its inner tensors, a bitsandbytes
    weight with its quantization statistics (4-bit ``absmax``, int8 row scales ``SCB``)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    stats = [getattr(getattr(t, "quant_state", None), "absmax", None), getattr(t, "SCB", None)]
    return t.numel() * t.element_size() + sum(s.numel() * s.element_size() for s in stats if s is not None)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (tied tensors once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(_tensor_bytes(t) for t in tensors.values())


def _adapter_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Trainee:
    """One (format, method) model in training and its optimizer."""

    fmt: str
    method: QuantMethod
    model: Any
    optimizer: torch.optim.Optimizer | None

    def step(self, ids: torch.Tensor) -> None:
        """One AdamW step of next-token loss on ``ids`` (batch, seq); the frozen base: forward
        and backward only."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.model(input_ids=ids, labels=ids).loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()


def build_trainee(base_in_format: torch.nn.Module, fmt: str, method: QuantMethod) -> Trainee:
    import peft

    if method.config is None:  # the frozen base: the backward reaches the input embeddings
        base_in_format.requires_grad_(False).train()
        base_in_format.enable_input_require_grads()
        return Trainee(fmt, method, base_in_format, None)
    model = peft.get_peft_model(base_in_format, method.config()).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Trainee(fmt, method, model, torch.optim.AdamW(trainable, lr=1e-4))


def merge_result(model: Any, fmt: str, ids: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Draw the adapter at random, then ``merge_and_unload``: the largest change of the logits
    of ``ids`` it causes, the adapter's own effect on them and the rounding surm reports (SURM
    layers' ``merge_rounding``), or ``merge: "refused"`` with the reason. Consumes ``model``.

    The logits are taken in training mode (the model has no dropout): in eval mode without
    gradients bitsandbytes repacks 4-bit weights for its CPU kernel on AVX512-BF16 CPUs, which
    fails on layers whose output width is not a multiple of 32 (the tiny Llama's of ``--quick``)."""
    from surm.peft.layer import SurmLayer
    from surm.peft.quantized import QuantizedMergeWarning

    randomize_adapters(model, torch.Generator().manual_seed(seed))
    surm_layers = [m for m in model.modules() if isinstance(m, SurmLayer)]
    with torch.no_grad():
        with model.disable_adapter():
            frozen = model(input_ids=ids).logits
        unmerged = model(input_ids=ids).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", QuantizedMergeWarning)
            try:
                merged_model = model.merge_and_unload()
            except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
                return {"merge": "refused", "reason": str(err)}
        merged = merged_model(input_ids=ids).logits
    roundings = [layer.merge_rounding for layer in surm_layers if layer.merge_rounding is not None]
    reported = [str(w.message) for w in caught if issubclass(w.category, QuantizedMergeWarning)]
    return {
        "merge": {"float32": "exact", "bfloat16": "rounded to bfloat16"}.get(fmt, "requantized"),
        "logits_merge_error": float((merged - unmerged).abs().max()),
        "logits_adapter_effect": float((unmerged - frozen).abs().max()),
        "surm_weight_rounding": max((r.max_error for r in roundings), default=None),
        "surm_warning": reported[0] if reported else None,
    }


def _record(trainee: Trainee, seconds: float, peak: int | None, weights: int) -> dict[str, Any]:
    return {"format": trainee.fmt, "method": trainee.method.label, "step_s": seconds, "step_ms": 1e3 * seconds,
            "adapter_parameters": _adapter_parameters(trainee.model), "weight_bytes": weights,
            "step_peak_bytes": peak}


def _add_ratios(records: list[dict[str, Any]]) -> None:
    """``vs_lora``: over LoRA's step on the same base; ``vs_float32``: over the same method's on
    float32; ``overhead_vs_lora``: the step's time over the frozen base's, as a multiple of LoRA's
    (below 1: cheaper than LoRA on top of the base)."""
    times = {(r["format"], r["method"]): r["step_s"] for r in records}
    for r in records:
        lora, dense = times.get((r["format"], LORA)), times.get(("float32", r["method"]))
        frozen = times.get((r["format"], FROZEN))
        r["vs_lora"] = r["step_s"] / lora if lora else None
        r["vs_float32"] = r["step_s"] / dense if dense else None
        trained = r["method"] != FROZEN and lora is not None and frozen is not None and lora > frozen
        r["overhead_vs_lora"] = (r["step_s"] - frozen) / (lora - frozen) if trained else None


def measure(
    base: torch.nn.Module, formats: Sequence[str], *, steps: int, repeats: int, batch: int, seq_len: int,
    clock: str,
) -> list[dict[str, Any]]:
    """One record per (format, method): step time (median over ``repeats`` interleaved rounds of
    ``steps`` steps each, after one warm-up round), ratios, sizes and the merge."""
    vocab = min(1000, base.config.vocab_size)
    ids = torch.randint(1, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    trainees, weights = [], {}
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        for fmt in formats:
            for method in METHODS:
                quantized_base = load_in_format(base, Path(folder), fmt)
                weights[(fmt, method.label)] = weight_bytes(quantized_base)
                trainees.append(build_trainee(quantized_base, fmt, method))
                print(f"built {fmt} {method.label}", flush=True)

    def rounds_of(trainee: Trainee) -> Callable[[], None]:
        def run():
            for _ in range(steps):
                trainee.step(ids)
        return run

    fns = {(t.fmt, t.method.label): rounds_of(t) for t in trainees}
    samples = interleaved_samples(fns, repeats, warmup=1, clocks=(clock,))
    records = []
    for trainee in trainees:
        key = (trainee.fmt, trainee.method.label)
        seconds = statistics.median(samples[key][clock]) / steps
        peak = peak_alloc_bytes(lambda t=trainee: t.step(ids))
        records.append(_record(trainee, seconds, peak, weights[key]))
    _add_ratios(records)
    for record, trainee in zip(records, trainees):
        frozen = trainee.method.label == FROZEN
        record.update({"merge": "-"} if frozen else merge_result(trainee.model, trainee.fmt, ids[:1]))
        print(_line(record), flush=True)
    del trainees, fns
    gc.collect()
    return records


def _line(r: dict[str, Any]) -> str:
    return (f"{r['format']:13s} {r['method']:20s} step {r['step_ms']:8.1f} ms (x{r['vs_lora']:.2f} LoRA, "
            f"overhead x{_or_dash('overhead_vs_lora')(r)} LoRA's) "
            f"merge {r['merge']}")


def _merge_cell(r: dict[str, Any]) -> str:
    if r["merge"] in ("refused", "-"):
        return r["merge"]
    error, effect = r["logits_merge_error"], r["logits_adapter_effect"]
    return f"{r['merge']}: logits off by {error:.2g} (adapter moves them {effect:.2g})"


def _rounding_cell(r: dict[str, Any]) -> str:
    rounding = r.get("surm_weight_rounding")
    return "-" if rounding is None else format(rounding, ".2g")


def _or_dash(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: "-" if r[key] is None else f"{r[key]:.2f}"


def _mb(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: None if r[key] is None else r[key] / 2**20


_COLUMNS = [
    ("base", "format", ""), ("method", "method", ""), ("adapter params", "adapter_parameters", "d"),
    ("step ms", "step_ms", ".0f"), ("x LoRA (same base)", "vs_lora", ".2f"),
    ("x float32 (same method)", "vs_float32", ".2f"), ("overhead x LoRA's", _or_dash("overhead_vs_lora"), ""),
    ("weights MB", _mb("weight_bytes"), ".1f"),
    ("step peak MB", _mb("step_peak_bytes"), ".1f"), ("surm weight rounding", _rounding_cell, ""),
    ("merge", _merge_cell, ""),
]


def refusals(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per distinct refusal: the methods and bases it hit, and the reason."""
    reasons: dict[str, list[str]] = {}
    for r in records:
        if r["merge"] == "refused":
            reasons.setdefault(r["reason"], []).append(f"{r['method']} on {r['format']}")
    return [f"refused ({', '.join(where)}): {reason}" for reason, where in reasons.items()]


def run(
    formats: Sequence[str] | None = None, *, steps: int = 2, repeats: int = 3, batch: int = 2, seq_len: int = 128,
    clock: str = "cpu", out: Path, quick: bool = False,
) -> dict[str, Any]:
    """The benchmark; prints a Markdown table and writes ``quantized.json`` into ``out``."""
    formats = tuple(formats or FORMATS)
    if quick:
        from surm.harness.models import tiny

        base, model_name = tiny.model(), "tiny-llama (random)"
        steps, repeats, seq_len = 1, 1, min(seq_len, 16)
    else:
        from surm.harness.models.packaged import load_causal_lm

        base, model_name = load_causal_lm("smollm2-135m")[0], "SmolLM2-135M-Instruct"
    with warnings.catch_warnings():
        # bitsandbytes' int8 matmul says so on every call: its CPU path computes in float16
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        records = measure(base, formats, steps=steps, repeats=repeats, batch=batch, seq_len=seq_len, clock=clock)
    print("\n" + markdown_table(records, _COLUMNS))
    for line in refusals(records):
        print(f"\n{line}")
    result = {"machine": machine(), "model": model_name, "clock": clock, "steps": steps, "repeats": repeats,
              "batch": batch, "seq_len": seq_len, "results": records}
    write_json(Path(out) / "quantized.json", result)
    return result
