"""A user's own data: CSV / JSON Lines files and datasets saved on disk, their splits, and the
errors that name the file, the row and what is wrong."""

import csv
import json

import numpy as np
import pytest

from surm.harness import data


def _csv(path, rows, fields):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _reviews(n=60):
    return [{"text": f"review number {i} {'good' if i % 3 else 'bad'}", "label": "pos" if i % 3 else "neg"}
            for i in range(n)]


def test_a_labelled_csv_is_cut_80_10_10_by_class_without_overlap(tmp_path):
    name = _csv(tmp_path / "reviews.csv", _reviews(), ["text", "label"])
    assert data.modality(name) == "text" and data.short_name(name) == "reviews"
    splits = data.load(name)
    assert splits.label_names == ["neg", "pos"]
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (48, 6, 6)
    ids = [set(s.ids.tolist()) for s in (splits.train, splits.validation, splits.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for split in (splits.validation, splits.test):  # 20 of the 60 are "neg": 2 of each held-out 6
        assert np.bincount(split.labels).tolist() == [2, 4]
    assert splits.train.inputs[0].startswith("review number")
    assert data.load(name, split_seed=1).test.ids.tolist() != splits.test.ids.tolist()
    assert data.load(name, seed=3, train_fraction=0.5).train.ids.tolist() != \
        data.load(name, seed=4, train_fraction=0.5).train.ids.tolist()


def test_a_split_column_places_the_rows_and_validation_is_cut_from_train(tmp_path):
    rows = [{**r, "split": "test" if i >= 50 else "train"} for i, r in enumerate(_reviews())]
    name = _jsonl(tmp_path / "reviews.jsonl", rows)
    splits = data.load(name)
    assert sorted(splits.test.ids.tolist()) == list(range(50, 60))
    assert len(splits.validation) == 5 and len(splits.train) == 45
    numeric = _jsonl(tmp_path / "stars.jsonl", [{"text": f"t{i}", "label": i % 3 + 1} for i in range(30)])
    assert data.load(numeric).label_names == ["1", "2", "3"]


def test_prompt_response_and_chat_files_keep_groups_whole(tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}", "group": f"doc {i // 3}"} for i in range(60)]
    name = _jsonl(tmp_path / "qa.jsonl", rows)
    assert data.modality(name) == "causal_lm"
    splits = data.load_instructions(name)
    groups = [set(s.groups) for s in (splits.train, splits.validation, splits.test)]
    assert groups[0] and groups[1] and groups[2] and not (groups[0] & groups[1] or groups[0] & groups[2])
    assert splits.train.prompts[0].startswith("question") and splits.train.systems is None
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "be brief"},
                                                          {"role": "user", "content": f"hi {i}"},
                                                          {"role": "assistant", "content": f"hello {i}"}]}
                                           for i in range(20)])
    chats = data.load_instructions(chat)
    assert chats.train.systems[0] == "be brief" and chats.train.responses[0].startswith("hello")
    assert len(chats.train) + len(chats.validation) + len(chats.test) == 20


def test_a_dataset_saved_on_disk_is_read_by_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _reviews(40)
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:30]),
                                  "test": datasets.Dataset.from_list(rows[30:])})
    saved.save_to_disk(str(tmp_path / "saved"))
    splits = data.load(str(tmp_path / "saved"))
    assert len(splits.test) == 10 and len(splits.train) + len(splits.validation) == 30
    assert data.content_digest(str(tmp_path / "saved")) is not None


def test_the_content_digest_follows_the_file(tmp_path):
    name = _csv(tmp_path / "r.csv", _reviews(), ["text", "label"])
    before = data.content_digest(name)
    _csv(tmp_path / "r.csv", _reviews(61), ["text", "label"])
    assert data.content_digest(name) != before and data.content_digest("rotten_tomatoes") is None
    assert len(data.load(name).train) + len(data.load(name).validation) + len(data.load(name).test) == 61


@pytest.mark.parametrize("rows, message", [
    ([{"sentence": "x", "label": 1}], "columns label, sentence; a user's data set needs text and label"),
    ([{"text": "fine", "label": "a"}, {"text": "", "label": "b"}], r"row 2: text is ''; every row needs a non-empty"),
    ([{"text": "fine", "label": "a"}, {"text": "ok", "label": None}], "row 2: no label"),
    ([{"prompt": "p", "response": ""}], "row 1: response is ''"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]}], r"roles \['user', 'assistant', 'user'\]; supported"),
    ([{"messages": "not json"}], "messages is text that is not JSON"),
    ([{"text": "a", "label": "x", "split": "dev"}], "split 'dev'; it must be one of train, validation, test"),
])
def test_bad_files_name_the_row_and_the_problem(tmp_path, rows, message):
    name = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        data.load_instructions(name) if data.files.load_rows(name).modality == "causal_lm" else data.load(name)


def test_unreadable_and_missing_files(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        data.modality(str(broken))
    with pytest.raises(ValueError, match="no such file or folder"):
        data.modality(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="unknown data set 'imdb'.*or a user's data"):
        data.modality("imdb")
    tiny = _csv(tmp_path / "tiny.csv", _reviews(3), ["text", "label"])
    with pytest.raises(ValueError, match="split is empty"):
        data.load(tiny)
