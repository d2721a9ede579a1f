"""End-to-end MiniLM training steps and merged inference, every method in one process."""

from __future__ import annotations

import copy
from typing import Any

import peft
import torch

from .methods import peft_config
from .timing import interleaved_medians, saved_tensor_bytes

TARGETS = ["query", "value"]


def _minilm(num_labels: int = 2):
    from surm.models import load_text_classifier

    model, _ = load_text_classifier(num_labels)
    return model


def _trainable_model(name: str, base: torch.nn.Module) -> torch.nn.Module:
    config = peft_config(name, TARGETS, modules_to_save=["classifier"])
    model = copy.deepcopy(base)
    if config is None:  # head only: the floor every method pays
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model
    return peft.get_peft_model(model, config)


def bench_training_steps(methods: list[str], seq_lens=(64, 128), batch: int = 32, repeats: int = 10) -> list[dict[str, Any]]:
    """Median seconds of one AdamW training step (forward, loss, backward, step) per method
    and sequence length, with ratios to the head-only floor and to PEFT LoRA r=8."""
    torch.manual_seed(0)
    base = _minilm()
    base.train()
    models = {m: _trainable_model(m, base).train() for m in methods}
    optimizers = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-4) for m in methods}
    records = []
    for seq_len in seq_lens:
        g = torch.Generator().manual_seed(seq_len)
        ids = torch.randint(1000, 20000, (batch, seq_len), generator=g)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 2, (batch,), generator=g)

        def loss_of(model):
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss

        def step(m):
            def run():
                optimizers[m].zero_grad(set_to_none=True)
                loss_of(models[m]).backward()
                optimizers[m].step()

            return run

        times = interleaved_medians({m: step(m) for m in methods}, repeats=repeats, warmup=1)
        for m in methods:
            model = models[m]
            trainable = [p for p in model.parameters() if p.requires_grad]
            saved = saved_tensor_bytes(lambda: loss_of(model), exclude=list(model.parameters()))
            optimizers[m].zero_grad(set_to_none=True)
            state_bytes = sum(p.numel() * p.element_size() for p in trainable) * 3  # grad + Adam moments
            records.append({
                "seq_len": seq_len, "batch": batch, "method": m, "median_s": times[m], "median_s_ms": 1e3 * times[m],
                "vs_floor": times[m] / times["head"] if "head" in times else float("nan"),
                "vs_lora": times[m] / times["lora_r8"] if "lora_r8" in times else float("nan"),
                "trainable": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n),
                "activation_bytes": saved,
                "training_memory_bytes": saved + state_bytes,
                "training_memory_mb": (saved + state_bytes) / 2**20,
            })
    return records


def bench_merged_inference(methods: list[str], seq_len: int = 64, batch: int = 32, repeats: int = 10) -> list[dict[str, Any]]:
    """Median eval forward time of each method after merge_and_unload, against the base model."""
    torch.manual_seed(0)
    base = _minilm().eval()
    ids = torch.randint(1000, 20000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    models = {"base": base}
    for m in methods:
        config = peft_config(m, TARGETS)
        if config is None:
            continue
        model = peft.get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.01)
        models[m] = model.merge_and_unload().eval()

    def forward(model):
        def run():
            with torch.inference_mode():
                model(input_ids=ids)

        return run

    times = interleaved_medians({m: forward(model) for m, model in models.items()}, repeats=repeats, warmup=1)
    return [{"method": m, "median_s": t, "median_s_ms": 1e3 * t, "vs_base": t / times["base"]} for m, t in times.items()]
