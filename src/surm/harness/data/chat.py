r"""Prompt -> response pairs as causal-LM batches, through the model's chat template.

An example is a one-turn conversation rendered by ``tokenizer.apply_chat_template`` (the
template adds its own system turn where it has one; SmolLM2's does), cut in two. With
SmolLM2's ChatML::

    prompt part, labels -100:
        <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
    response part, labels = input_ids:
        {response}<|im_end|>\n

The prompt part is the rendering with ``add_generation_prompt=True``, so its tokens are exactly
those a generation call starts from; the response part is the rest of the whole conversation's
rendering, the template's end of turn included, so the model learns to stop. The two parts are
tokenised separately, without added special tokens, so no token straddles the border.

Labels are -100 on the prompt and on padding, found by position, never by token id: SmolLM2
pads with ``<|im_end|>``, the token that ends every response, and there it keeps its label.
Models shift the labels themselves (``labels[t]`` is the target of the logits at ``t - 1``),
so ``model(**batch).loss`` is the mean cross-entropy over the response tokens of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["IGNORE_INDEX", "collate", "encode_batch", "encode_example", "prompt_token_counts"]

#: The label ``torch.nn.functional.cross_entropy`` (and transformers' losses) skip.
IGNORE_INDEX = -100


def encode_example(tokenizer, prompt: str, response: str, max_length: int,
                   system: str | None = None) -> dict[str, list[int]]:
    """Token ids and labels of one example: ``{"input_ids": [...], "labels": [...]}``.

    ``labels`` is ``IGNORE_INDEX`` on the prompt part and the token id on the response part.
    A sequence longer than ``max_length`` loses the end of its response (then it has no
    end-of-turn token); the prompt is never cut.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        system: a system turn to put first; None leaves it to the template.

    Raises:
        ValueError: the prompt part alone takes ``max_length`` tokens or more, or the template
            renders the prompt differently once the answer follows it.
    """
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": prompt})
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not whole.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the prompt differently once an answer follows it, so the prompt "
            f"tokens cannot be told from the answer's: {prompt_text[-80:]!r} is not a prefix of "
            f"{whole[: len(prompt_text) + 20][-100:]!r}"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(whole[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"the prompt takes {len(prompt_ids)} tokens with the chat template, which leaves no room for the "
            f"response within max_length={max_length}; raise max_length or shorten the prompt "
            f"(it starts {prompt[:60]!r})"
        )
    response_ids = response_ids[:room]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def collate(examples: Sequence[dict[str, list[int]]], pad_token_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad :func:`encode_example` outputs to the longest one.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each int64 ``(B, T)``. Padding
    (``pad_token_id``, mask 0, label -100) goes on the right for training, or on the left
    (``padding_side="left"``) where generation continues the rows.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
    }
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        where = slice(0, n) if padding_side == "right" else slice(length - n, length)
        batch["input_ids"][row, where] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        batch["attention_mask"][row, where] = 1
        batch["labels"][row, where] = torch.as_tensor(example["labels"], dtype=torch.long)
    return batch


def encode_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                 padding_side: str | None = None, system: str | None = None) -> dict[str, torch.Tensor]:
    """:func:`encode_example` on each pair, then :func:`collate`: a batch for
    ``model(**batch).loss``. Pads with the tokenizer's pad token (its end-of-sequence token
    where it has none) on ``padding_side`` (None: the tokenizer's side)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token to pad with")
    examples = [encode_example(tokenizer, p, r, max_length, system) for p, r in zip(prompts, responses)]
    return collate(examples, pad_id, padding_side or tokenizer.padding_side)


def prompt_token_counts(tokenizer, split, system: str | None = None):
    """int64 ``(N,)``: the tokens of each prompt of ``split`` (an ``InstructionSplit``) as
    :func:`encode_example` renders it, the chat template's turns and the generation prompt
    included (a per-example system turn where the split has them)."""
    import numpy as np

    systems = getattr(split, "systems", None) or [system] * len(split.prompts)
    texts = []
    for prompt, own in zip(split.prompts, systems):
        messages = [] if own is None else [{"role": "system", "content": own}]
        messages.append({"role": "user", "content": prompt})
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    if not texts:
        return np.zeros(0, dtype=np.int64)
    return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]], dtype=np.int64)
