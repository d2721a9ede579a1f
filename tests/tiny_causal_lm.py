"""A tiny chat tokenizer and a tiny random Llama, built offline, for the causal-LM tests
(the package's own :mod:`surm.tiny_llama`, the ``tiny-llama`` model)."""

from __future__ import annotations

from surm.tiny_llama import CHAT_TEMPLATE, SPECIAL, WORDS, model, tokenizer

__all__ = ["CHAT_TEMPLATE", "SPECIAL", "WORDS", "model", "tokenizer"]
