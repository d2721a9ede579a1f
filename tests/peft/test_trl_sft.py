"""TRL's SFTTrainer(peft_config=SurmConfig(...)) trains a SURM adapter on the tiny Llama."""

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from surm.harness.models import tiny  # noqa: E402
from surm.peft import SurmConfig  # noqa: E402


def test_sft_trainer_trains_and_reloads_a_surm_adapter(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny.tokenizer()
    base = tiny.model()
    data = Dataset.from_dict({"text": [" ".join(tiny.WORDS[i:i + 6]) for i in range(8)]})
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, max_length=16)
    trainer = SFTTrainer(model=base, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=SurmConfig(target_modules="all-linear", init="random", fused=False))
    model = trainer.model
    assert isinstance(model, PeftModel)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    assert trainable and all("surm" in k for k in trainable)
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters() if k in trainable)
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters() if k not in trainable)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 6, 7]])
    model.eval()
    reloaded = PeftModel.from_pretrained(tiny.model(), tmp_path / "adapter").eval()
    saved = {k: v for k, v in model.named_parameters() if k in trainable}
    loaded = {k: v for k, v in reloaded.named_parameters() if "surm" in k}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        effect = (reloaded(ids).logits - tiny.model()(ids).logits).abs().max()
        assert effect > 0.05
