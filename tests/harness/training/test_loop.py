"""surm.harness.training: batching, metrics, the loop, memory and progress (``surm finetune``:
tests/commands/test_finetune.py)."""

import io
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from surm.harness.data import DatasetSplits, Split
from surm.harness.models import packaged_text_model_path
from surm.harness.training import loop as train


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(packaged_text_model_path()), local_files_only=True)


def _split(texts, labels):
    return Split(inputs=list(texts), labels=np.asarray(labels, dtype=np.int64), ids=np.arange(len(labels)))


def test_text_batches_pad_to_the_longest_and_group_by_length(tokenizer):
    texts = ["a"] * 20 + ["a much longer sentence with many more words in it"] * 20
    split = _split(texts, [0, 1] * 20)
    batcher = train.TextBatcher(tokenizer, max_length=8)
    rng = np.random.default_rng(0)
    index_batches = batcher.train_batches(split, 4, rng)
    assert sorted(np.concatenate(index_batches).tolist()) == list(range(40))  # each example once
    lengths = [len(s) for s in batcher.encode(split)]
    assert max(lengths) == 8  # truncated at max_length
    for rows, (inputs, labels) in zip(index_batches, batcher.batches(split, index_batches)):
        assert inputs["input_ids"].shape[1] == max(lengths[i] for i in rows)
        assert len({lengths[i] for i in rows}) == 1  # grouped: short and long never share a batch here
        assert (inputs["attention_mask"].sum(1) == torch.tensor([lengths[i] for i in rows])).all()
        assert labels.tolist() == split.labels[rows].tolist()
    assert sorted(np.concatenate(batcher.eval_batches(split, 7)).tolist()) == list(range(40))


def test_scores_match_sklearn():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 5, 200), rng.integers(0, 4, 200)
    s = train.scores(labels, preds)
    assert s["accuracy"] == pytest.approx(np.mean(labels == preds))
    assert s["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))


class _VectorBatcher:
    """Batches of a float array split: inputs (B, d)."""

    def batches(self, split, index_batches):
        for rows in index_batches:
            yield torch.as_tensor(split.inputs[rows]), torch.as_tensor(split.labels[rows])

    def train_batches(self, split, batch_size, rng):
        order = rng.permutation(len(split))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def eval_batches(self, split, batch_size):
        return [np.arange(i, min(i + batch_size, len(split))) for i in range(0, len(split), batch_size)]


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 4)).astype(np.float32) + 3 * np.eye(3, 4, dtype=np.float32)[labels]
    return Split(inputs=x, labels=labels.astype(np.int64), ids=np.arange(n))


def test_finetune_learns_a_separable_problem_and_reports_everything():
    splits = DatasetSplits("blobs", "vector", ["a", "b", "c"], _blobs(256, 0), _blobs(64, 1), _blobs(64, 2))
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    config = train.TrainConfig(lr=3e-2, epochs=3, batch_size=16, progress=False)
    result = train.finetune(model, _VectorBatcher(), splits, config)
    assert result["train"]["steps"] == 48
    assert result["train"]["losses"][-1] < 0.5 * result["train"]["losses"][0]
    assert result["test"]["accuracy"] > 0.9 and result["validation"]["n"] == 64
    assert result["train_seconds"] > 0 and np.isfinite(result["peak_memory_mb"])
    assert result["memory_measure"] and result["config"]["lr"] == 3e-2
    json.dumps(result)  # JSON-able


def test_schedule_warms_up_then_decays_to_zero():
    splits = DatasetSplits("blobs", "vector", ["a", "b", "c"], _blobs(160, 0), _blobs(8, 1), _blobs(8, 2))
    model = nn.Linear(4, 3)
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        train.train(model, _VectorBatcher(), splits.train, train.TrainConfig(lr=1.0, epochs=10, batch_size=16,
                                                                             warmup_ratio=0.1, progress=False))
    assert len(seen) == 100
    assert seen[0] < seen[5] < seen[9] <= 1.0  # warm-up over 10 steps
    assert seen[10] == pytest.approx(1.0) and seen[-1] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(seen[10:], seen[11:]))


class _Headed(nn.Module):
    """A body and a module called ``classifier`` (as in transformers' sequence classifiers)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(torch.tanh(self.body(x)))


@pytest.mark.parametrize("lr, head_lr", [(0.0, 0.05), (0.05, 0.0)])
def test_head_lr_trains_the_head_at_its_own_rate(lr, head_lr):
    splits = DatasetSplits("blobs", "vector", ["a", "b", "c"], _blobs(64, 0), _blobs(8, 1), _blobs(8, 2))
    model = _Headed()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = train.TrainConfig(lr=lr, head_lr=head_lr, head="classifier", epochs=2, batch_size=16, progress=False,
                               weight_decay=0.0)
    train.train(model, _VectorBatcher(), splits.train, config)
    for name, p in model.named_parameters():
        rate = head_lr if name.startswith("classifier.") else lr
        assert torch.equal(p, before[name]) == (rate == 0.0), name  # moved exactly where its rate is non-zero


def test_head_lr_errors_name_the_fix():
    splits = DatasetSplits("blobs", "vector", ["a", "b", "c"], _blobs(16, 0), _blobs(8, 1), _blobs(8, 2))
    with pytest.raises(ValueError, match="needs TrainConfig.head"):
        train.train(_Headed(), _VectorBatcher(), splits.train, train.TrainConfig(head_lr=0.1, progress=False))
    with pytest.raises(ValueError, match="no trainable parameter lies in a module named 'fc'"):
        train.train(_Headed(), _VectorBatcher(), splits.train,
                    train.TrainConfig(head_lr=0.1, head="fc", progress=False))


def test_min_steps_and_fractional_epochs():
    config = train.TrainConfig(batch_size=16, epochs=0.5)
    assert train.num_steps(100, config) == 4
    config.min_steps = 30
    assert train.num_steps(100, config) == 30


def test_diverging_training_raises():
    splits = DatasetSplits("blobs", "vector", ["a", "b", "c"], _blobs(64, 0), _blobs(8, 1), _blobs(8, 2))
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged"):
        train.train(model, _VectorBatcher(), splits.train, train.TrainConfig(progress=False))


def test_memory_tracker_sees_an_allocation():
    import mmap
    import time

    size = 64 * 2**20
    # fresh pages from the kernel: a malloc'd block could reuse heap pages that earlier tests
    # left resident, and then the resident set would not grow
    with train.MemoryTracker() as memory:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1  # touch every page
        time.sleep(0.1)
    block.close()
    assert memory.growth_mb > 32 and "RSS" in memory.how


class _SlowBatcher(_VectorBatcher):
    """Batches that take a while, as real ones do: a bar that redraws on time would redraw."""

    def batches(self, split, index_batches):
        import time

        for batch in super().batches(split, index_batches):
            time.sleep(0.01)
            yield batch


def test_progress_off_a_terminal_is_about_one_line_per_run(monkeypatch):
    splits = DatasetSplits("blobs", "vector", ["a", "b", "c"], _blobs(320, 0), _blobs(8, 1), _blobs(8, 2))
    stderr = io.StringIO()  # not a terminal, like a log file or a pipe
    monkeypatch.setattr("sys.stderr", stderr)
    config = train.TrainConfig(lr=1e-2, epochs=2, batch_size=8, progress=True)
    result = train.finetune(nn.Linear(4, 3), _SlowBatcher(), splits, config)
    assert result["train"]["steps"] == 80
    written = stderr.getvalue()
    draws = [d for d in written.replace("\r", "\n").splitlines() if d.strip()]
    assert 1 <= len(draws) <= 3, draws  # the opening state and the final one, not one per step
    assert "80/80" in draws[-1] and "loss=" in draws[-1] and written.endswith("\n")  # the final state stays
