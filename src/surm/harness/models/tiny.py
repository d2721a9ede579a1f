"""Tiny random models, built offline in a second, for smoke presets and tests: ``tiny-bert`` (a
random 2-layer BERT with MiniLM's tokenizer) and ``tiny-llama`` (a random 2-layer Llama with a
tiny chat tokenizer; ``surm reproduce llm --preset smoke``, ``surm finetune --model tiny-llama``).

The chat tokenizer is word-level (a few dozen words; any other word is ``<unk>``) with a ChatML
template like SmolLM2's, which adds a default system turn, and pads with its end-of-turn token
``<|im_end|>`` on the right, as SmolLM2's does.
"""

from __future__ import annotations

__all__ = ["CHAT_TEMPLATE", "SPECIAL", "TINY_BERT", "WORDS", "bert_config", "llama_config", "model", "tokenizer"]

# ChatML like SmolLM2's, with a default system turn where the conversation has none.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nbe kind<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "system user assistant be kind write a tale about the fox and hen once upon time there was who ran away "
    "into wood . , ! ? said she he it then end red positive negative"
).split()


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` that pads with its end-of-turn token, as SmolLM2's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama_config(vocab_size: int = len(SPECIAL) + len(WORDS)):
    """The ``LlamaConfig`` of :func:`model`."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)


def model(vocab_size: int = len(SPECIAL) + len(WORDS), seed: int = 0):
    """A random 2-layer ``LlamaForCausalLM`` (hidden 16, 4 query / 2 key-value heads, MLP 32, the
    seven projections of SmolLM2's blocks), float32, eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab_size)).eval()


#: ``tiny-bert``: a 2-layer BERT (hidden 32, 2 heads, FFN 64) for smoke presets and tests.
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)


def bert_config(vocab_size: int = 30522, num_labels: int = 2):
    """The ``BertConfig`` of ``tiny-bert`` (MiniLM's vocabulary size by default)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, num_labels=num_labels, **TINY_BERT)
