"""``surm bench adapters``: many adapters on one SmolLM2-135M, rows of a batch mixed across them.

For each count N of distinct adapters, every method's model carries N adapters (random
weights: a trained adapter costs the same) and runs a batch of ``max(N, min_rows)`` short
prompts, row i through adapter ``i mod N``, in interleaved rounds:

- ``single``: the same batch through one active adapter (the reference: what one adapter costs);
- ``mixed``: ``adapter_names=[...]``, the rows through their own adapters;

each as a prefill forward and as a short greedy ``generate``. Reported: tokens/s, the mixed /
single throughput ratio, resident bytes per adapter (RSS growth while adding the N adapters,
over N, beside the adapters' tensor bytes). Separately, the time to load N saved adapters with
:func:`surm.peft.load_adapters` against N calls of PEFT's ``load_adapter``.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .report import machine, markdown_table, write_json
from .timing import interleaved_samples

#: adapter counts N of the full run
COUNTS = (1, 4, 16, 64, 256, 1024)
#: the batch has at least this many rows, so small N still fill a batch
MIN_ROWS = 16
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class BenchMethod:
    """A method of the benchmark: a label, how to build one adapter's config, the largest N it
    runs at (LoRA on every map at N=1024 would hold 10 GB of adapters)."""

    label: str
    config: Callable[[], Any]
    max_count: int = max(COUNTS)


def _surm(structure: str, targets: list[str], **knobs: Any) -> Callable[[], Any]:
    def build():
        from surm.peft import SurmConfig

        return SurmConfig(structure=structure, target_modules=targets, task_type="CAUSAL_LM", **knobs)

    return build


def _lora(rank: int, targets: list[str]) -> Callable[[], Any]:
    def build():
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM")

    return build


METHODS = {
    m.label: m
    for m in (
        BenchMethod("surm circulant q,v", _surm("circulant", QV)),
        BenchMethod("surm toeplitz q,v", _surm("toeplitz", QV)),
        BenchMethod("surm kronecker q,v", _surm("kronecker", QV)),
        BenchMethod("surm ldr r=1 q,v", _surm("ldr", QV, rank=1)),
        BenchMethod("surm circulant all", _surm("circulant", ALL), max_count=256),
        BenchMethod("lora r=8 q,v", _lora(8, QV)),
        BenchMethod("lora r=8 all", _lora(8, ALL), max_count=64),
    )
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def randomize_adapters(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every adapter tensor drawn at random (LoRA's B and SURM's zero init would make the update 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "surm_" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * 0.02)


def build(base: torch.nn.Module, method: BenchMethod, count: int) -> tuple[Any, dict[str, float]]:
    """``base`` (copied) with ``count`` adapters ``a0 ...`` of ``method``; its memory record."""
    import copy

    import peft

    model = copy.deepcopy(base)
    gc.collect()
    before = _rss_bytes()
    peft_model = peft.get_peft_model(model, method.config(), adapter_name="a0")
    for i in range(1, count):
        peft_model.add_adapter(f"a{i}", method.config())
    randomize_adapters(peft_model, torch.Generator().manual_seed(count))
    gc.collect()
    grown = _rss_bytes() - before
    tensor_bytes = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters()
                       if "lora_" in n or "surm_" in n)
    peft_model.set_adapter("a0")
    peft_model.eval()
    return peft_model, {"rss_per_adapter": grown / count, "tensor_bytes_per_adapter": tensor_bytes / count}


def _calls(model: Any, ids: torch.Tensor, names: list[str], new_tokens: int) -> dict[str, Callable[[], object]]:
    pad = {"pad_token_id": 0, "do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}

    def run(fn):
        def call():
            with torch.inference_mode():
                return fn()
        return call

    return {
        "prefill single": run(lambda: model(input_ids=ids)),
        "prefill mixed": run(lambda: model(input_ids=ids, adapter_names=names)),
        "generate single": run(lambda: model.generate(input_ids=ids, **pad)),
        "generate mixed": run(lambda: model.generate(input_ids=ids, adapter_names=names, **pad)),
    }


def throughput(
    base: torch.nn.Module, methods: Sequence[BenchMethod], counts: Sequence[int], *, prompt_tokens: int,
    new_tokens: int, repeats: int, clock: str,
) -> list[dict[str, Any]]:
    """One record per (N, method): tokens/s of each call, mixed / single ratios, memory."""
    records = []
    for count in counts:
        rows = max(count, MIN_ROWS)
        vocab = min(1000, base.config.vocab_size)
        ids = torch.randint(1, vocab, (rows, prompt_tokens), generator=torch.Generator().manual_seed(0))
        names = [f"a{i % count}" for i in range(rows)]
        runnable = [m for m in methods if count <= m.max_count]
        models, memory, fns = {}, {}, {}
        for method in runnable:
            models[method.label], memory[method.label] = build(base, method, count)
            for call, fn in _calls(models[method.label], ids, names, new_tokens).items():
                fns[(method.label, call)] = fn
        samples = interleaved_samples(fns, repeats, warmup=1, clocks=(clock,))
        tokens = {"prefill": rows * prompt_tokens, "generate": rows * new_tokens}
        for method in runnable:
            record = {"adapters": count, "rows": rows, "method": method.label, **memory[method.label]}
            for call in ("prefill single", "prefill mixed", "generate single", "generate mixed"):
                seconds = statistics.median(samples[(method.label, call)][clock])
                record[call.replace(" ", "_") + "_tok_s"] = tokens[call.split()[0]] / seconds
            for kind in ("prefill", "generate"):
                record[f"{kind}_ratio"] = record[f"{kind}_mixed_tok_s"] / record[f"{kind}_single_tok_s"]
            records.append(record)
            print(_row(record), flush=True)
        del models, fns
        gc.collect()
    return records


def _row(r: dict[str, Any]) -> str:
    return (f"N={r['adapters']:5d} {r['method']:22s} prefill {r['prefill_mixed_tok_s']:8.1f} tok/s "
            f"(x{r['prefill_ratio']:.2f} of one adapter)  generate {r['generate_mixed_tok_s']:7.1f} tok/s "
            f"(x{r['generate_ratio']:.2f})  {r['rss_per_adapter'] / 1e3:8.1f} kB/adapter resident")


def loading(base: torch.nn.Module, method: BenchMethod, count: int, *, peft_budget_s: float) -> dict[str, Any]:
    """Seconds to put ``count`` saved adapters of ``method`` on a model that has one: with
    :func:`surm.peft.load_adapters`, and with one ``load_adapter`` call each (stopped after
    ``peft_budget_s`` seconds, its per-call median then extrapolated; the record says so)."""
    import copy

    import peft

    from surm.peft import load_adapters

    with tempfile.TemporaryDirectory() as tmp:
        model = peft.get_peft_model(copy.deepcopy(base), method.config())  # "default": saved at the top
        generator = torch.Generator().manual_seed(1)
        folders = {}
        for i in range(count + 1):
            randomize_adapters(model, generator)
            folders[f"a{i}"] = Path(tmp) / f"a{i}"
            model.save_pretrained(folders[f"a{i}"])
        del model
        first = {k: v for k, v in folders.items() if k != "a0"}

        fast = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders["a0"], adapter_name="a0")
        start = time.perf_counter()
        load_adapters(fast, first)
        ours = time.perf_counter() - start
        del fast
        gc.collect()

        slow = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders["a0"], adapter_name="a0")
        per_call, start = [], time.perf_counter()
        for name, folder in first.items():
            t0 = time.perf_counter()
            slow.load_adapter(folder, adapter_name=name)
            per_call.append(time.perf_counter() - t0)
            if time.perf_counter() - start > peft_budget_s:
                break
        done = len(per_call)
        theirs = sum(per_call) if done == count else sum(per_call) + (count - done) * per_call[-1]
    return {"method": method.label, "adapters": count, "load_adapters_s": ours, "peft_load_adapter_s": theirs,
            "peft_calls_timed": done, "peft_extrapolated": done < count, "speedup": theirs / ours,
            "peft_first_call_s": per_call[0], "peft_last_call_s": per_call[-1]}


_COLUMNS = [
    ("N", "adapters", "d"), ("rows", "rows", "d"), ("method", "method", ""),
    ("prefill tok/s", "prefill_mixed_tok_s", ".1f"), ("vs one adapter", "prefill_ratio", ".2f"),
    ("generate tok/s", "generate_mixed_tok_s", ".1f"), ("vs one adapter ", "generate_ratio", ".2f"),
    ("kB resident / adapter", lambda r: r["rss_per_adapter"] / 1e3, ".1f"),
    ("kB tensors / adapter", lambda r: r["tensor_bytes_per_adapter"] / 1e3, ".1f"),
]
_LOAD_COLUMNS = [
    ("method", "method", ""), ("N", "adapters", "d"), ("load_adapters s", "load_adapters_s", ".2f"),
    ("PEFT load_adapter x N s", "peft_load_adapter_s", ".1f"), ("calls timed", "peft_calls_timed", "d"),
    ("speed-up", "speedup", ".1f"),
]


def run(
    methods: Sequence[str] | None = None, counts: Sequence[int] | None = None, *, prompt_tokens: int = 4,
    new_tokens: int = 3, repeats: int = 3, clock: str = "cpu", out: Path, quick: bool = False,
    load_count: int | None = None, peft_budget_s: float = 300.0,
) -> dict[str, Any]:
    """The benchmark; prints two Markdown tables and writes ``adapters.json`` into ``out``."""
    chosen = [METHODS[m] for m in (methods or METHODS)]
    if quick:
        from surm.harness.models import tiny

        base = tiny.model()
        counts, repeats, load_count, peft_budget_s = counts or (1, 4), 1, load_count or 4, 30.0
    else:
        from surm.harness.models.packaged import load_causal_lm

        base = load_causal_lm("smollm2-135m")[0]
    base.eval()
    counts = tuple(counts or COUNTS)
    records = throughput(base, chosen, counts, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                         repeats=repeats, clock=clock)
    load_method = next((m for m in chosen if m.label.startswith("surm")), None)
    loads = []
    if load_method is not None:
        loads.append(loading(base, load_method, load_count or max(counts), peft_budget_s=peft_budget_s))
    print("\n" + markdown_table(records, _COLUMNS))
    if loads:
        print("\n" + markdown_table(loads, _LOAD_COLUMNS))
    result = {"machine": machine(), "clock": clock, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "repeats": repeats, "throughput": records, "loading": loads}
    write_json(Path(out) / "adapters.json", result)
    return result
