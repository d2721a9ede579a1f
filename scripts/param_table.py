"""Print the README's parameter-count table for the packaged MiniLM (all-MiniLM-L6-v2):
every SURM family at its default targets (every linear map of each block, parallel) and on
query+value, serial SURM at the Houlsby positions, and the baselines (PEFT LoRA, C3A,
FourierFT, VeRA, LoKr, LoRA-FIX, LN tuning, BitFit, bottleneck adapters).

Every row is built as training builds it, ``surm.harness.methods.apply(model, method, TEXT)``, and
counted with ``methods.count_trainable(..., exclude_head="classifier")``: adapter (or bias,
or norm) parameters only; the classification head, trained by every method, is left out.
The model is built on the ``meta`` device (shapes only, no weights, no compute).

Run: .venv/bin/python scripts/param_table.py
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from surm.harness import methods
from surm.harness.models import catalog, packaged_text_model_path

TEXT = catalog.CATALOG["minilm"].profile  # MiniLM's (BERT) profile


QV = "query+value"
ALL = "every map (6 per block)"
HOULSBY = "Houlsby (2 per block)"
REFERENCE = "lora:8"

#: (method string, label, where): the table's rows, in order.
ROWS: list[tuple[str, str, str]] = [
    # SURM, parallel, at its default targets: every linear map of each block
    ("surm:circulant", "SURM circulant", ALL),
    ("surm:circulant:block_size=128", "SURM circulant block_size=128", ALL),
    ("surm:skew_circulant", "SURM skew_circulant", ALL),
    ("surm:toeplitz", "SURM toeplitz", ALL),
    ("surm:symmetric_toeplitz", "SURM symmetric_toeplitz", ALL),
    ("surm:kronecker", "SURM kronecker", ALL),
    ("surm:kronecker:terms=4", "SURM kronecker terms=4", ALL),
    ("surm:ldr:rank=1", "SURM ldr rank=1", ALL),
    ("surm:ldr:rank=2", "SURM ldr rank=2", ALL),
    ("surm:ldr:rank=4", "SURM ldr rank=4", ALL),
    ("surm:circulant_product", "SURM circulant_product", ALL),
    ("surm:skew_circulant_product", "SURM skew_circulant_product", ALL),
    ("surm:toeplitz_product", "SURM toeplitz_product", ALL),
    # SURM, parallel, on the LoRA family's targets
    ("surm:circulant:targets=qv", "SURM circulant", QV),
    ("surm:skew_circulant:targets=qv", "SURM skew_circulant", QV),
    ("surm:toeplitz:targets=qv", "SURM toeplitz", QV),
    ("surm:symmetric_toeplitz:targets=qv", "SURM symmetric_toeplitz", QV),
    ("surm:ldr:rank=1:targets=qv", "SURM ldr rank=1", QV),
    # SURM, serial (adapter positions, no bottleneck)
    ("surm:circulant:serial", "SURM circulant serial", HOULSBY),
    ("surm:toeplitz:serial", "SURM toeplitz serial", HOULSBY),
    ("surm:kronecker:serial", "SURM kronecker serial", HOULSBY),
    ("surm:ldr:serial:rank=1", "SURM ldr serial rank=1", HOULSBY),
    # the LoRA family and the other PEFT baselines
    ("lora:1", "PEFT LoRA r=1", QV),
    ("lora:8", "PEFT LoRA r=8", QV),
    ("lora:1:targets=all", "PEFT LoRA r=1", ALL),
    ("lora:2:targets=all", "PEFT LoRA r=2", ALL),
    ("lorafix:8", "LoRA-FIX r=8 (A frozen)", QV),
    ("c3a:64", "PEFT C3A block 64", QV),
    ("c3a:384:targets=all", "PEFT C3A block 384", ALL),
    ("fourierft:768:targets=all", "PEFT FourierFT n=768", ALL),
    ("vera:192:targets=all", "PEFT VeRA r=192", ALL),
    ("lokr:8:targets=all", "PEFT LoKr r=8", ALL),
    ("lntuning", "PEFT LN tuning", "every LayerNorm"),
    ("bitfit", "BitFit", "every bias"),
    # bottleneck adapters
    ("houlsby:32", "Houlsby bottleneck r=32", HOULSBY),
    ("adapterdrop:32", "AdapterDrop r=32", "Houlsby, top 3 blocks"),
    ("pfeiffer:24", "Pfeiffer bottleneck r=24", "FFN output (1 per block)"),
]


def base_model(device: str = "meta") -> torch.nn.Module:
    """The packaged MiniLM with a fresh 2-label head; on ``meta`` only its shapes."""
    config = AutoConfig.from_pretrained(str(packaged_text_model_path()), num_labels=2)
    with torch.device(device):
        return AutoModelForSequenceClassification.from_config(config)


def count(method: str, device: str = "meta") -> int:
    """Trainable parameters of ``method`` on the packaged MiniLM, the head left out."""
    model = methods.apply(base_model(device), method, TEXT)
    return methods.count_trainable(model, exclude_head="classifier")


def table(device: str = "meta") -> list[tuple[str, str, int]]:
    """(label, where, trainable params) for every row of :data:`ROWS`."""
    return [(label, where, count(method, device)) for method, label, where in ROWS]


def main() -> None:
    rows = table()
    reference = dict(zip((m for m, _, _ in ROWS), (n for _, _, n in rows)))[REFERENCE]
    print("| method | where | trainable params | vs LoRA r=8 |")
    print("|---|---|---:|---:|")
    for label, where, n in rows:
        print(f"| {label} | {where} | {n:,} | {n / reference:.3f}x |")


if __name__ == "__main__":
    main()
