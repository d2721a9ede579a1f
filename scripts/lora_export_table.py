"""Print the table of docs/lora_export.md: how well a LoRA export holds a SURM update, by rank.

Every structure gets a parallel SURM adapter with random parameters (``init="random"``) on the
packaged MiniLM's ``query`` (384x384) and ``intermediate.dense`` (1536x384) layers, all 6
blocks. The adapter is exported once with PEFT's ``convert_to_lora`` at full rank (384): its
factors are ``B = U diag(s)``, ``A = V^T`` from the SVD of ``dW = alpha S``, so their first r
columns / rows are exactly what ``convert_to_lora(model, r)`` returns (the best rank-r
approximation, Eckart-Young). The table gives the relative Frobenius error
``||dW - B[:, :r] A[:r]||_F / ||dW||_F``, averaged over the 6 layers of each shape, and the
smallest rank that keeps 90% / 99% of ``||dW||_F^2``. PEFT's SVD runs in float32, hence the
~1e-6 floor at full rank. No network; about a minute on 2 idle CPU cores.

Run: .venv/bin/python scripts/lora_export_table.py
"""

from __future__ import annotations

import copy
import time

import peft
import torch
from transformers import AutoModel

import surm
from surm.harness.models import packaged_text_model_path
from surm.peft import SurmLayer
from surm.peft.lora_export import convert_to_lora

RANKS = (1, 4, 16, 64, 384)  # 384 = min(out, in) of both shapes: the full rank
FAMILIES = [
    ("circulant", {}),
    ("skew_circulant", {}),
    ("toeplitz", {}),
    ("symmetric_toeplitz", {}),
    ("kronecker", {}),
    ("ldr", {"rank": 1}),
    ("low_rank", {"rank": 8}),
]
TARGETS = ["query", "intermediate.dense"]


def energy_rank(s: torch.Tensor, share: float) -> int:
    """The smallest k whose top-k singular values ``s`` hold ``share`` of the squared sum."""
    s2 = s.double() ** 2
    return int(torch.searchsorted(torch.cumsum(s2, 0), share * s2.sum()).item()) + 1


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    base = AutoModel.from_pretrained(str(packaged_text_model_path())).eval()
    print("| structure | layer (out x in) | SURM params | " + " | ".join(f"r={r}" for r in RANKS)
          + " | rank for 90% / 99% energy |")
    print("|---|---|---:|" + "---:|" * len(RANKS) + "---:|")
    start = time.time()
    for structure, knobs in FAMILIES:
        config = surm.SurmConfig(structure=structure, target_modules=TARGETS, init="random", **knobs)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        _, state_dict = convert_to_lora(model, max(RANKS))
        rows = {}
        for name, layer in model.named_modules():
            if not isinstance(layer, SurmLayer):
                continue
            delta = layer.get_delta_weight("default").double()
            A = state_dict[f"{name}.lora_A.weight"].double()
            B = state_dict[f"{name}.lora_B.weight"].double()
            errors = [float((delta - B[:, :r] @ A[:r]).norm() / delta.norm()) for r in RANKS]
            s = B.norm(dim=0)  # the singular values of dW (U has orthonormal columns)
            shape = (layer.out_features, layer.in_features)
            rows.setdefault(shape, []).append((errors, energy_rank(s, 0.90), energy_rank(s, 0.99), layer))
        for shape, entries in rows.items():
            params = entries[0][3].surm_matrix["default"].num_params
            cells = [sum(e[0][i] for e in entries) / len(entries) for i in range(len(RANKS))]
            r90, r99 = max(e[1] for e in entries), max(e[2] for e in entries)
            label = structure + "".join(f" {k}={v}" for k, v in knobs.items())
            print(f"| {label} | {shape[0]}x{shape[1]} | {params:,} | "
                  + " | ".join(_fmt(c) for c in cells) + f" | {r90} / {r99} |")
    lora = " / ".join(f"r={r}: {r * 768:,} / {r * 1920:,}" for r in RANKS)
    print(f"\nLoRA parameters per layer (384x384 / 1536x384): {lora}")
    print(f"({time.time() - start:.0f} s)")


def _fmt(value: float) -> str:
    return f"{value:.0e}" if value < 1e-3 else f"{value:.3f}"


if __name__ == "__main__":
    main()
