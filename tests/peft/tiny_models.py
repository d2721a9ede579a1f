"""Tiny randomly initialised models of every kind the PEFT tests cover, with matching inputs.

Each factory returns ``(model, inputs, output_fn)``: ``output_fn(model)`` runs the model on
the inputs and returns one tensor to compare.
"""

from __future__ import annotations

import torch
from torch import nn


def _logits(inputs):
    return lambda model: model(**inputs).logits


def bert(dtype=torch.float64):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, num_labels=3, max_position_embeddings=32)
    model = BertForSequenceClassification(cfg).to(dtype).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    return model, inputs, _logits(inputs)


def vit(dtype=torch.float64):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=48, num_labels=5)
    model = ViTForImageClassification(cfg).to(dtype).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16, dtype=dtype)}
    return model, inputs, _logits(inputs)


def gpt2(dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(dtype).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 6))}
    return model, inputs, _logits(inputs)


def llama(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 6))}
    return model, inputs, _logits(inputs)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.fc2 = nn.Linear(12, 9, bias=False)
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class PointwiseCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = self.project(torch.relu(self.expand(h)))
        return self.head(h.mean((2, 3)))


def mlp(dtype=torch.float64):
    model = MLP().to(dtype).eval()
    x = torch.randn(4, 10, dtype=dtype)
    return model, {"x": x}, lambda m: m(x)


def cnn(dtype=torch.float64):
    model = PointwiseCNN().to(dtype).eval()
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    return model, {"x": x}, lambda m: m(x)


#: name -> (factory, parallel targets, serial targets, modules_to_save)
MODELS = {
    "bert": (bert, None, None, ["classifier"]),
    "vit": (vit, None, None, ["classifier"]),
    "gpt2": (gpt2, None, None, None),
    "llama": (llama, None, None, None),
    "mlp": (mlp, ["fc1", "fc2"], ["fc1", "fc2"], ["head"]),
    "cnn": (cnn, ["expand", "project"], ["expand", "project"], ["head"]),
}
