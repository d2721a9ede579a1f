"""End-to-end MiniLM training steps and merged inference, every method in one process."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import peft
import torch

from surm.harness import methods as surm_methods
from surm.harness.methods import Method
from surm.harness.models import catalog

from .memory import PeakResidentGrowth, resident_mib, saved_tensor_bytes
from .timing import interleaved_medians

#: MiniLM's profile (the catalog's): the classifier trains beside the adapters.
TRAINING = catalog.CATALOG["minilm"].profile
#: The same positions without a head to save: merged, the model is the base architecture.
INFERENCE = dataclasses.replace(TRAINING, head=None)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' logging (its load report) and progress bars inside the block."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
        if hub_bars_off:
            disable_progress_bars()


def _minilm(num_labels: int = 2):
    from surm.harness.models import load_text_classifier

    with quiet_transformers():
        model, _ = load_text_classifier(num_labels)
    return model


def bench_training_steps(
    methods: Sequence[Method], seq_lens=(64, 128), batch: int = 32, repeats: int = 10, clock: str = "wall"
) -> list[dict[str, Any]]:
    """Median seconds of one AdamW training step (forward, loss, backward, step) per method
    and sequence length, with ratios to the ``head`` floor and to ``lora:8``."""
    torch.manual_seed(0)
    base = _minilm()
    base.train()
    models = {m.name: surm_methods.apply(copy.deepcopy(base), m, TRAINING).train() for m in methods}
    optimizers = {m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                  for m, model in models.items()}
    records = []
    for seq_len in seq_lens:
        inputs = _random_batch(seq_len, batch)

        def loss_of(model):
            return model(**inputs).loss

        def step(m):
            def run():
                optimizers[m].zero_grad(set_to_none=True)
                loss_of(models[m]).backward()
                optimizers[m].step()

            return run

        times = interleaved_medians({m: step(m) for m in models}, repeats=repeats, warmup=1, clock=clock)
        for m, model in models.items():
            trainable = [p for p in model.parameters() if p.requires_grad]
            saved = saved_tensor_bytes(lambda: loss_of(model), exclude=list(model.parameters()))
            optimizers[m].zero_grad(set_to_none=True)
            state_bytes = sum(p.numel() * p.element_size() for p in trainable) * 3  # grad + Adam moments
            records.append({
                "seq_len": seq_len, "batch": batch, "method": m, "median_s": times[m], "median_s_ms": 1e3 * times[m],
                "vs_floor": times[m] / times["head"] if "head" in times else float("nan"),
                "vs_lora": times[m] / times["lora:8"] if "lora:8" in times else float("nan"),
                "trainable": surm_methods.count_trainable(model, exclude_head=TRAINING.head),
                "activation_bytes": saved,
                "training_memory_bytes": saved + state_bytes,
                "training_memory_mb": (saved + state_bytes) / 2**20,
            })
    return records


def _random_batch(seq_len: int, batch: int) -> dict[str, torch.Tensor]:
    """The training steps' batch: token ids, a full attention mask, binary labels (seeded by seq_len)."""
    g = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(1000, 20000, (batch, seq_len), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def resident_growth_of_steps(method: str, seq_len: int, batch: int = 32, steps: int = 2) -> dict[str, float]:
    """In this process: MiniLM with ``method`` (a method string), then ``steps`` AdamW training
    steps. ``peak_mib``: the peak resident size during the steps above the size before them
    (gradients, AdamW moments, activations, workspaces and what the allocator keeps);
    ``held_mib``: the resident size after them (gradients set to None) above that start."""
    torch.manual_seed(0)
    model = surm_methods.apply(_minilm(), surm_methods.parse(method), TRAINING).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = _random_batch(seq_len, batch)
    with PeakResidentGrowth() as peak:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            model(**inputs).loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak_mib": peak.growth_mib, "held_mib": resident_mib() - peak.start_mib}


def bench_resident_growth(
    methods: Sequence[Method], seq_lens=(64, 128), batch: int = 32, processes: int = 3, steps: int = 2,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Median over ``processes`` fresh Python processes (rounds interleaved over the methods) of
    :func:`resident_growth_of_steps`, per method and sequence length: resident memory is a
    property of the process, so each measurement gets a process of its own. ``threads``: torch
    threads in each (None: torch's default)."""
    samples: dict[tuple[int, str], list[dict[str, float]]] = {}
    for _ in range(processes):
        for seq_len in seq_lens:
            for m in methods:
                samples.setdefault((seq_len, m.name), []).append(_in_fresh_process(m.name, seq_len, batch, steps,
                                                                                    threads))
    return [{
        "seq_len": seq_len, "batch": batch, "method": name, "processes": processes, "steps": steps,
        "peak_rss_growth_mib": statistics.median(r["peak_mib"] for r in runs),
        "held_rss_growth_mib": statistics.median(r["held_mib"] for r in runs),
        "peak_rss_growth_runs_mib": [r["peak_mib"] for r in runs],
    } for (seq_len, name), runs in samples.items()]


def _in_fresh_process(method: str, seq_len: int, batch: int, steps: int, threads: int | None) -> dict[str, float]:
    """:func:`resident_growth_of_steps` in a new Python process (this interpreter, same path)."""
    code = (
        "import json, sys, torch\n"
        "from surm.bench.training_step import resident_growth_of_steps\n"
        f"if {threads!r}: torch.set_num_threads({threads!r})\n"
        f"print(json.dumps(resident_growth_of_steps({method!r}, {seq_len}, {batch}, {steps})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"resident memory of {method} at {seq_len} tokens: the measuring process failed:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_merged_inference(
    methods: Sequence[Method], seq_len: int = 64, batch: int = 32, repeats: int = 10, clock: str = "wall"
) -> list[dict[str, Any]]:
    """Median eval forward time of each adapter method after ``merge_and_unload``, against the
    base model. Methods without an adapter (head, full, BitFit) are the base here and left
    out; an adapter that cannot merge (a serial one with a nonlinear activation) is skipped
    with a note."""
    torch.manual_seed(0)
    base = _minilm().eval()
    ids = torch.randint(1000, 20000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    models = {"base": base}
    for m in methods:
        model = surm_methods.apply(copy.deepcopy(base), m, INFERENCE)
        if not isinstance(model, peft.PeftModel):
            continue
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.01)
        try:
            models[m.name] = model.merge_and_unload().eval()
        except ValueError as exc:
            print(f"skip {m.name} in merged inference: {exc}")

    def forward(model):
        def run():
            with torch.inference_mode():
                model(input_ids=ids)

        return run

    times = interleaved_medians({m: forward(model) for m, model in models.items()}, repeats=repeats, warmup=1,
                                clock=clock)
    return [{"method": m, "median_s": t, "median_s_ms": 1e3 * t, "vs_base": t / times["base"]}
            for m, t in times.items()]
