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
                     report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, max_length=16,
                     bf16=False)  # TRL's default bf16=True wraps model.forward in bf16 autocast, left on after train()
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
        assert torch.equal(reloaded(ids).logits, model(ids).logits)  # the reload is the trained model


def test_sft_trainer_default_bf16_autocast_trains_the_float32_adapter(tmp_path):
    """Under TRL's default (bf16 autocast on CPU) the adapter stays float32 and trains; the
    trained model's forward stays wrapped in autocast, so it differs from its reload by bf16
    rounding only."""
    torch.manual_seed(0)
    data = Dataset.from_dict({"text": [" ".join(tiny.WORDS[i:i + 6]) for i in range(8)]})
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, max_length=16)
    assert args.bf16
    trainer = SFTTrainer(model=tiny.model(), args=args, train_dataset=data, processing_class=tiny.tokenizer(),
                         peft_config=SurmConfig(target_modules="all-linear", init="random", fused=False))
    model = trainer.model
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    trainer.train()
    trained = {k: v for k, v in model.named_parameters() if v.requires_grad}
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert any(not torch.equal(before[k], v) for k, v in trained.items())
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny.model(), tmp_path / "adapter").eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        gap = (model.eval()(ids).logits - reloaded(ids).logits).abs().max()
    assert 0 < gap < 0.05


def test_sft_trainer_trains_surm_on_a_4bit_base_with_gradient_checkpointing(tmp_path):
    """docs/trl.md's quantized variant at tiny size: a bitsandbytes nf4 base loaded through
    transformers, TRL's default gradient checkpointing on; the adapter trains and the 4-bit
    weights stay as they were."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny.model().save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    data = Dataset.from_dict({"text": [" ".join(tiny.WORDS[i:i + 6]) for i in range(8)]})
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, max_length=16, bf16=False)
    assert args.gradient_checkpointing  # TRL's default
    trainer = SFTTrainer(model=base, args=args, train_dataset=data, processing_class=tiny.tokenizer(),
                         peft_config=SurmConfig(target_modules="all-linear", init="random"))
    model = trainer.model
    four_bit = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(four_bit) == 14  # the seven maps of both blocks
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    trainer.train()
    assert all(block.gradient_checkpointing for block in model.get_base_model().model.layers)
    trained = {k: v for k, v in model.named_parameters() if v.requires_grad}
    assert trained.keys() == before.keys() and all("surm_" in k for k in trained)
    assert all(not torch.equal(before[k], v) for k, v in trained.items())
    assert all(torch.equal(m.weight.data, four_bit[n]) for n, m in model.named_modules() if n in four_bit)
