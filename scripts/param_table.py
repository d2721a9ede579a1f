"""Print the README's parameter-count table: every SURM structure on the packaged MiniLM
(query+value, parallel; Houlsby positions, serial) beside PEFT LoRA and bottleneck adapters.

Counts are adapter parameters only (the classification head, trained by every method, is
left out). Run: .venv/bin/python scripts/param_table.py
"""

from __future__ import annotations

import copy

import peft
import torch
from transformers import AutoModelForSequenceClassification

import surm
from surm.models import packaged_text_model_path

PFEIFFER = r".*layer\.\d+\.output\.dense"  # FFN output only, one adapter per block


def count(base, config) -> int:
    model = peft.get_peft_model(copy.deepcopy(base), config)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def main() -> None:
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(packaged_text_model_path()), num_labels=2)
    rows = []
    for r in (1, 4, 8):
        rows.append((f"PEFT LoRA r={r}", "query+value", count(base, peft.LoraConfig(r=r, target_modules=["query", "value"]))))
    rows.append(("PEFT C3A block 64", "query+value", count(base, peft.C3AConfig(block_size=64, target_modules=["query", "value"]))))
    parallel = [
        ("circulant", {}), ("circulant", {"block_size": 128}), ("skew_circulant", {}), ("toeplitz", {}),
        ("symmetric_toeplitz", {}), ("kronecker", {}), ("kronecker", {"terms": 4}), ("ldr", {"rank": 1}),
        ("ldr", {"rank": 2}), ("ldr", {"rank": 4}),
    ]
    for structure, knobs in parallel:
        label = f"SURM {structure}" + "".join(f" {k}={v}" for k, v in knobs.items())
        rows.append((label, "query+value", count(base, surm.SurmConfig(structure=structure, **knobs))))
    for structure, knobs in [("circulant", {}), ("toeplitz", {}), ("kronecker", {}), ("ldr", {"rank": 1})]:
        label = f"SURM {structure} serial" + "".join(f" {k}={v}" for k, v in knobs.items())
        rows.append((label, "Houlsby (2 per block)", count(base, surm.SurmConfig(structure=structure, placement="serial", **knobs))))
    rows.append(("Houlsby bottleneck r=32", "Houlsby (2 per block)",
                 count(base, surm.SurmConfig(structure="low_rank", rank=32, placement="serial"))))
    rows.append(("Pfeiffer bottleneck r=24", "FFN output (1 per block)",
                 count(base, surm.SurmConfig(structure="low_rank", rank=24, placement="serial", target_modules=PFEIFFER))))
    lora8 = rows[2][2]
    print("| method | where | trainable params | vs LoRA r=8 |")
    print("|---|---|---:|---:|")
    for label, where, n in rows:
        print(f"| {label} | {where} | {n:,} | {n / lora8:.3f}x |")


if __name__ == "__main__":
    main()
