"""Causal-LM training and evaluation (surm.harness.training.causal_lm) on the tiny random Llama: batches, the loss on
response tokens only, perplexity against a hand computation, training through surm.harness.training.train."""

import math

import numpy as np
import pytest
import torch

from surm.harness import methods
from surm.harness.data import InstructionSplit, InstructionSplits
from surm.harness.data.chat import IGNORE_INDEX
from surm.harness.models import tiny
from surm.harness.training import TrainConfig, train
from surm.harness.training.causal_lm import (
    InstructionBatcher,
    causal_lm_loss,
    eval_steps,
    evaluate_lm,
    finetune_lm,
    generate,
    response_token_losses,
)

PROMPTS = ["write a tale about the fox", "write a tale about the hen and the fox", "a red fox ?", "once upon a time"]
RESPONSES = ["once upon a time there was a fox . the end", "the hen ran away into the wood !",
             "it said : red", "there was a hen who ran away , said she ."]


def _split(n: int = 4) -> InstructionSplit:
    return InstructionSplit(prompts=PROMPTS[:n], responses=RESPONSES[:n], groups=[f"g{i}" for i in range(n)],
                            ids=np.arange(n))


def _splits() -> InstructionSplits:
    return InstructionSplits(name="toy", task="causal_lm", train=_split(), validation=_split(3), test=_split(2))


@pytest.fixture
def batcher():
    return InstructionBatcher(tiny.tokenizer(), max_length=48)


def test_batches_pad_right_and_label_only_the_response(batcher):
    split = _split()
    (inputs, labels), = batcher.batches(split, [np.arange(4)])
    assert labels is None and set(inputs) == {"input_ids", "attention_mask", "labels"}
    encoded = batcher.encode(split)
    for row, example in enumerate(encoded):
        n = len(example["input_ids"])
        assert inputs["attention_mask"][row].tolist() == [1] * n + [0] * (inputs["input_ids"].shape[1] - n)
        assert (inputs["labels"][row, n:] == IGNORE_INDEX).all()
        labelled = inputs["labels"][row, :n] != IGNORE_INDEX
        response = batcher.tokenizer(RESPONSES[row])["input_ids"] + [batcher.tokenizer.eos_token_id]
        assert labelled.tolist() == [False] * (n - len(response)) + [True] * len(response)  # the prompt: none
        assert inputs["labels"][row, n - len(response) : n].tolist() == response  # the words, then <|im_end|>


def test_training_batches_cover_the_epoch_and_split_across_ranks(batcher):
    split = _split()
    whole = batcher.train_batches(split, 2, np.random.default_rng(0))
    assert sorted(np.concatenate(whole).tolist()) == [0, 1, 2, 3]
    shards = [InstructionBatcher(batcher.tokenizer, 48, rank=r, world_size=2).train_batches(
        split, 2, np.random.default_rng(0)) for r in (0, 1)]
    for full, rank0, rank1 in zip(whole, *shards):
        assert sorted([*rank0, *rank1]) == sorted(full) and len(rank0) == len(rank1) == 1
    with pytest.raises(ValueError, match="rank"):
        InstructionBatcher(batcher.tokenizer, 48, rank=2, world_size=2)
    with pytest.raises(TypeError, match="prompt -> response"):
        batcher.encode(object())


def test_response_token_losses_shift_and_skip_ignored_labels():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1], [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]])
    total, n = response_token_losses(logits, labels)
    logp = logits.log_softmax(-1)
    by_hand = -(logp[0, 1, 3] + logp[0, 2, 1] + logp[1, 0, 2])
    assert n == 3 and total.item() == pytest.approx(by_hand.item(), rel=1e-6)
    with pytest.raises(ValueError, match="differ"):
        response_token_losses(logits, labels[:, :3])


def test_perplexity_is_exp_of_the_mean_response_token_loss_by_hand(batcher):
    model = tiny.model()
    split = _split()
    got = evaluate_lm(model, batcher, split, batch_size=3)  # padded batches of unequal lengths
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in batcher.encode(split):  # one unpadded example at a time
            ids = torch.tensor([example["input_ids"]])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            for t, label in enumerate(example["labels"]):
                if label != IGNORE_INDEX:
                    total -= logp[t - 1, label].item()
                    tokens += 1
    assert got["tokens"] == tokens and got["n"] == 4
    assert got["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_the_prompt_does_not_enter_the_loss(batcher):
    """Changing the system turn (prompt side) changes the inputs, not which tokens are scored."""
    model = tiny.model()
    split = _split()
    other = InstructionBatcher(batcher.tokenizer, 48, system="be kind and red")
    a, b = evaluate_lm(model, batcher, split), evaluate_lm(model, other, split)
    assert a["tokens"] == b["tokens"] and a["loss"] != b["loss"]


def test_train_with_the_causal_loss_lowers_it_and_calls_back(batcher):
    model = methods.apply(tiny.model(), "surm:circulant")
    split = _split()
    before = evaluate_lm(model, batcher, split)["loss"]
    seen = []
    history = train(model, batcher, split, TrainConfig(lr=1e-1, epochs=0, min_steps=12, batch_size=2, progress=False),
                    loss_fn=causal_lm_loss, on_step=seen.append)
    assert history["steps"] == 12 and seen == list(range(1, 13)) and model.training
    assert evaluate_lm(model, batcher, split)["loss"] < before - 0.05


def test_eval_steps_spread_and_end_at_the_last_step():
    assert eval_steps(24, 4) == [6, 12, 18, 24]
    assert eval_steps(3, 5) == [1, 2, 3]
    assert eval_steps(10, 0) == []


def test_finetune_lm_records_curve_times_and_memory(batcher):
    model = methods.apply(tiny.model(), "lora:2")
    config = TrainConfig(lr=3e-3, epochs=0, min_steps=4, batch_size=2, eval_batch_size=2, progress=False)
    result = finetune_lm(model, batcher, _splits(), config, eval_points=2)
    assert [p["step"] for p in result["curve"]] == [0, 2, 4]
    assert result["curve"][-1]["loss"] == pytest.approx(result["validation"]["loss"])
    assert result["test"]["n"] == 2 and result["steps"] == 4
    assert 0 < result["seconds_per_step"] and 0 < result["cpu_seconds_per_step"]
    assert result["peak_memory_mb"] > 0 and result["memory_measure"]


def test_lm_head_stays_frozen_and_every_projection_is_adapted():
    model = methods.apply(tiny.model(), "surm:circulant")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert sum(f".{proj}." in n for n in trainable) == 2  # one adapter in each of the 2 blocks
    lora = methods.apply(tiny.model(), "lora:2")
    assert {n.split(".")[-4] for n, p in lora.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}


def test_generate_is_greedy_and_returns_new_text_only():
    model, tok = tiny.model(), tiny.tokenizer()
    first = generate(model, tok, ["write a tale"], max_new_tokens=4)
    assert first == generate(model, tok, ["write a tale"], max_new_tokens=4)
    assert len(first) == 1 and "write a tale" not in first[0]


def test_the_choice_is_the_most_likely_first_response_token_by_hand():
    from surm.harness.training.causal_lm import choose

    # two rows; row 0's response starts at position 2 (predicted at 1), row 1's at 3 (predicted at 2)
    labels = torch.tensor([[-100, -100, 5, 2], [-100, -100, -100, 6]])
    logits = torch.zeros(2, 4, 8)
    logits[0, 1, 5], logits[0, 1, 6] = 1.0, 3.0  # row 0 prefers token 6 where it matters
    logits[0, 2, 5] = 9.0  # a later position never counts
    logits[1, 2, 5], logits[1, 2, 6] = 2.0, -1.0  # row 1 prefers token 5
    assert choose(logits, labels, torch.tensor([5, 6])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="no response token"):
        choose(logits, torch.full((2, 4), -100), torch.tensor([5, 6]))


def test_choice_accuracy_on_a_split_with_choices():
    tokenizer = tiny.tokenizer()
    model = tiny.model(vocab_size=len(tokenizer))
    split = InstructionSplit(prompts=["a red fox ?"] * 4, responses=["positive", "negative", "positive", "negative"],
                             groups=["g0", "g1", "g2", "g3"], ids=np.arange(4), choices=["negative", "positive"])
    batcher = InstructionBatcher(tokenizer, max_length=32)
    metrics = evaluate_lm(model, batcher, split)
    # the same prompt everywhere: the model makes one choice, right for exactly half of the rows
    assert metrics["accuracy"] == 0.5 and metrics["n"] == 4
    bad = InstructionSplit(prompts=["a"], responses=["once upon"], groups=["g"], ids=np.arange(1),
                           choices=["once upon", "the end"])
    with pytest.raises(ValueError, match="2 tokens of this tokenizer"):
        evaluate_lm(model, batcher, bad)


@pytest.mark.parametrize("method", ["surm:circulant", "lora:2", None])
def test_scored_logits_give_the_models_own_loss_and_gradients(method):
    from surm.harness.training.causal_lm import scored_logits

    tokenizer = tiny.tokenizer()
    base = tiny.model(vocab_size=len(tokenizer)).double()
    model = methods.apply(base, method) if method else base  # None: full fine-tuning, every weight trains
    batcher = InstructionBatcher(tokenizer, max_length=32)
    split = InstructionSplit(prompts=PROMPTS, responses=RESPONSES, groups=["a", "b", "c", "d"], ids=np.arange(4))
    inputs, _ = next(batcher.batches(split, [np.arange(4)]))
    logits, targets = scored_logits(model, inputs)
    assert logits.shape == (len(targets), len(tokenizer))
    assert len(targets) == int((inputs["labels"][:, 1:] != -100).sum())
    fast = causal_lm_loss(model, inputs)
    full = model(**inputs).loss
    assert torch.allclose(fast, full, atol=1e-10)
    (g_fast,) = torch.autograd.grad(fast, [p for p in model.parameters() if p.requires_grad][:1])
    (g_full,) = torch.autograd.grad(model(**inputs).loss, [p for p in model.parameters() if p.requires_grad][:1])
    assert torch.allclose(g_fast, g_full, atol=1e-10)
