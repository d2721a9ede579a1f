"""surm.harness.methods: PEFT's structured and frugal methods and the other baselines as method strings
(lokr, kadaptation, fourierft, vera, lorafix, adapterdrop, lntuning): their PEFT configs, their
trainable parameters counted from the layer shapes, and one training step each."""

import peft
import pytest
import torch
from torch import nn

from surm.harness import methods, runs
from surm.harness.models import catalog
from surm.harness.models.profiles import EFFICIENTNET as IMAGE
from surm.harness.models.profiles import Profile
from surm.harness.runs import RunSpec
from surm.harness.threads import torch_threads
from surm.peft import SurmConfig
from tests.peft.tiny_models import bert

TEXT = catalog.CATALOG["minilm"].profile  # MiniLM's (BERT) profile


# The tiny BERT of tests/peft/tiny_models.py: hidden 24, FFN 48, 2 layers, a 3-way head.
HIDDEN, FFN, LAYERS, HEAD = 24, 48, 2, 24 * 3 + 3
QV = LAYERS * 2  # the LoRA positions: query and value of every layer, all 24 x 24
HOULSBY_4 = LAYERS * 2 * (2 * HIDDEN * 4 + 4 + HIDDEN)  # houlsby:4: down + up + inner bias + bias, two per block


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _lokr(out_features, in_features, r, split):
    """LoKr's parameters on one Linear layer: PEFT splits each width into a near-square
    ``(small, large)`` pair (``split``), trains w1 (out_small x in_small) in full and w2
    (out_large x in_large) as w2_a @ w2_b of rank r, or in full once 2 r >= its larger side."""
    (a, b), (c, d) = split[out_features], split[in_features]
    w2 = b * d if 2 * r >= max(b, d) else r * (b + d)
    return a * c + w2


SPLIT = {24: (4, 6), 48: (6, 8), 8: (2, 4), 12: (3, 4), 16: (4, 4)}


@pytest.mark.parametrize(
    "method, config_class, adapter_params",
    [
        ("lokr:2", peft.LoKrConfig, QV * (4 * 4 + 2 * (6 + 6))),  # w1 4x4 kron (6x2 @ 2x6)
        ("lokr:3", peft.LoKrConfig, QV * (4 * 4 + 6 * 6)),  # 2r >= 6: w2 is a full 6x6
        ("kadaptation:2", peft.LoKrConfig, QV * (4 * 4 + 2 * (6 + 6))),
        ("fourierft:10", peft.FourierFTConfig, QV * 10),  # n_frequency per layer
        ("vera:4", peft.VeraConfig, QV * (4 + HIDDEN)),  # lambda_d (r) and lambda_b (out); A, B frozen, shared
        ("lorafix:2", peft.LoraConfig, QV * 2 * HIDDEN),  # B (out x r) only; A frozen
        ("adapterdrop:4", SurmConfig, HOULSBY_4 * 1 // LAYERS),  # drops 1 block of 2
        ("adapterdrop:4:drop=0", SurmConfig, HOULSBY_4),
        ("lntuning", peft.LNTuningConfig, 2 * HIDDEN * (2 * LAYERS + 1)),  # weight + bias; 2 per block + embeddings
    ],
)
def test_trainable_parameters_follow_the_layer_shapes(method, config_class, adapter_params):
    model, _, run = bert(torch.float32)
    config = methods.peft_config(method, model=model)
    assert type(config) is config_class and config.modules_to_save == ["classifier"]
    wrapped = methods.apply(model, method)
    assert isinstance(wrapped, peft.PeftModel) and type(wrapped.peft_config["default"]) is config_class
    assert methods.count_trainable(wrapped, exclude_head="classifier") == adapter_params
    assert methods.count_trainable(wrapped) == adapter_params + HEAD
    head = [n for n in _trainable(wrapped) if "classifier" in n]
    assert head and all("modules_to_save" in n for n in head)
    assert run(wrapped).shape == (2, 3)


def test_lokr_formula_matches_peft_factors():
    assert _lokr(24, 24, 2, SPLIT) == 4 * 4 + 2 * 12
    from peft.tuners.lokr.layer import factorization

    assert all(factorization(n) == pair for n, pair in SPLIT.items())
    assert factorization(384) == (16, 24)  # MiniLM: 16*16 + 48 r per layer for r < 12


def test_configs_target_the_profile():
    lokr = methods.peft_config("lokr:4", TEXT)
    assert lokr.target_modules == {"query", "value"} and lokr.r == 4 and lokr.alpha == 4  # scale alpha / r = 1
    assert not lokr.decompose_both
    assert methods.peft_config("lokr:4:alpha=8", TEXT).alpha == 8
    assert methods.peft_config("kadaptation:4", TEXT).to_dict() == lokr.to_dict()  # the same adapter, by another name
    fourier = methods.peft_config("fourierft:100", TEXT)
    assert fourier.n_frequency == 100 and fourier.scaling == 150.0 and fourier.target_modules == {"query", "value"}
    assert methods.peft_config("fourierft:100:alpha=300", TEXT).scaling == 300.0
    vera = methods.peft_config("vera:8", TEXT)
    assert vera.r == 8 and vera.target_modules == {"query", "value"}
    lorafix = methods.peft_config("lorafix:8", TEXT)
    assert isinstance(lorafix, peft.LoraConfig) and lorafix.r == 8 and lorafix.lora_alpha == 8
    assert methods.peft_config("lntuning", TEXT).target_modules == ["LayerNorm"]
    assert methods.peft_config("lntuning", IMAGE).target_modules == IMAGE.norms
    drop = methods.peft_config("adapterdrop:8:drop=3", TEXT)
    assert drop.structure == "low_rank" and drop.placement == "serial" and drop.rank == 8
    assert drop.activation == "relu" and drop.exclude_modules == r"(.*\.)?layer\.(0|1|2)\..*"


def test_lorafix_freezes_every_lora_a_at_its_init():
    model, _, _ = bert(torch.float32)
    wrapped = methods.apply(model, "lorafix:2")
    a = {n: p for n, p in wrapped.named_parameters() if ".lora_A." in n}
    b = {n for n, p in wrapped.named_parameters() if ".lora_B." in n}
    assert len(a) == len(b) == QV and not any(p.requires_grad for p in a.values()) and b <= _trainable(wrapped)
    assert all(p.abs().sum() > 0 for p in a.values())  # random, not zero
    lora = methods.apply(bert(torch.float32)[0], "lora:2")
    assert methods.count_trainable(wrapped, "classifier") * 2 == methods.count_trainable(lora, "classifier")


def test_vera_shares_one_pair_of_frozen_projections_across_shapes():
    model, _, run = bert(torch.float32)
    profile = Profile(head="classifier", lora=("query", "intermediate.dense"))  # 24 -> 24 and 24 -> 48
    wrapped = methods.apply(model, "vera:4", profile)
    assert methods.count_trainable(wrapped, "classifier") == LAYERS * ((4 + HIDDEN) + (4 + FFN))
    assert wrapped.base_model.vera_A["default"].shape == (4, HIDDEN)  # r x the largest input width
    assert wrapped.base_model.vera_B["default"].shape == (FFN, 4)  # the largest output width x r
    assert not any("vera_A" in n or "vera_B" in n for n in _trainable(wrapped))
    assert run(wrapped).shape == (2, 3)


def test_adapterdrop_keeps_the_upper_blocks():
    model, _, run = bert(torch.float32)
    assert methods.count_blocks(model, TEXT) == LAYERS
    wrapped = methods.apply(model, "adapterdrop:4")
    adapted = {n.split(".surm_")[0] for n in _trainable(wrapped) if ".surm_" in n}
    assert adapted and all(".layer.1." in n for n in adapted)
    with pytest.raises(ValueError, match="drop=2 leaves no block of 2"):
        methods.apply(bert(torch.float32)[0], "adapterdrop:4:drop=2")
    with pytest.raises(ValueError, match="pass the model, or give drop=K"):
        methods.peft_config("adapterdrop:4", TEXT)
    with pytest.raises(ValueError, match="names no blocks"):
        methods.peft_config("adapterdrop:4:drop=1", Profile(head="classifier", blocks=None))
    with pytest.raises(ValueError, match="one module list called 'blocks'"):
        methods.count_blocks(model, Profile(head="classifier", blocks="blocks"))


def test_lr_falls_back_to_the_method_it_varies():
    assert methods.parse("adapterdrop:8").lr_keys == ("adapterdrop", "houlsby")
    assert methods.default_lr("adapterdrop:8") == methods.default_lr("houlsby:8")
    assert methods.parse("kadaptation:8").lr_keys == ("kadaptation", "lokr")


@pytest.mark.parametrize("method", ["lokr:2", "kadaptation:2", "fourierft:10", "vera:4", "lorafix:2",
                                    "adapterdrop:4", "lntuning"])
def test_one_step_changes_only_trainable_parameters(method):
    torch.manual_seed(0)
    model, inputs, _ = bert(torch.float32)
    wrapped = methods.apply(model, method)
    trainable = _trainable(wrapped)
    before = {n: t.detach().clone() for n, t in wrapped.state_dict().items()}
    params = dict(wrapped.named_parameters())
    optimizer = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=1e-2)
    wrapped.train()
    loss = nn.functional.cross_entropy(wrapped(**inputs).logits, torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    after = wrapped.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable  # buffers (VeRA's A, B) and frozen weights did not move
    assert any("classifier" not in n for n in changed)  # the adapter moved, not only the head
    assert all(params[n].grad is None for n in params if n not in trainable)


# --------------------------------------------------------------------------- the image profile


class _BlockNet(nn.Module):
    """EfficientNet's layout in miniature: a stem, ``_blocks`` of 1x1 expand / project
    convolutions with BatchNorms, a 1x1 head convolution and ``_fc``."""

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self._blocks = nn.ModuleList(nn.ModuleDict({
            "_expand_conv": nn.Conv2d(8, 12, 1, bias=False), "_bn0": nn.BatchNorm2d(12),
            "_project_conv": nn.Conv2d(12, 8, 1, bias=False), "_bn2": nn.BatchNorm2d(8),
        }) for _ in range(2))
        self._conv_head, self._bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self._fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self._bn0(self._conv_stem(x))
        for block in self._blocks:
            h = h + block["_bn2"](block["_project_conv"](torch.relu(block["_bn0"](block["_expand_conv"](h)))))
        return self._fc(self._bn1(self._conv_head(h)).mean((2, 3)))


def test_image_profile():
    x = torch.randn(2, 3, 5, 5)
    lntuning = methods.apply(_BlockNet(), "lntuning", IMAGE)
    assert methods.count_trainable(lntuning, "_fc") == 2 * (8 + 2 * (12 + 8) + 16)  # every BatchNorm's weight and bias
    lokr = methods.apply(_BlockNet(), "lokr:1", IMAGE)
    per_block = _lokr(12, 8, 1, SPLIT) + _lokr(8, 12, 1, SPLIT)
    assert methods.count_trainable(lokr, "_fc") == 2 * per_block + _lokr(16, 8, 1, SPLIT)
    lorafix = methods.apply(_BlockNet(), "lorafix:2", IMAGE)
    assert methods.count_trainable(lorafix, "_fc") == 2 * 2 * (12 + 8) + 2 * 16
    drop = methods.apply(_BlockNet(), "adapterdrop:2", IMAGE)  # drops block 0; the head conv keeps its own
    adapted = {n.split(".surm_")[0].removeprefix("base_model.model.") for n in _trainable(drop) if ".surm_" in n}
    assert adapted == {"_blocks.1._expand_conv", "_blocks.1._project_conv", "_conv_head"}
    for model in (lntuning, lokr, lorafix, drop):
        assert model(x).shape == (2, 3)
    for method, name in (("c3a:4", "C3A"), ("fourierft:10", "FourierFT"), ("vera:2", "VeRA")):
        with pytest.raises(ValueError, match=f"PEFT's {name} adapts Linear layers only"):
            methods.peft_config(method, IMAGE)


# --------------------------------------------------------------------------- the experiment machinery


@pytest.mark.parametrize("method", ["lokr:2", "kadaptation:2", "fourierft:20", "vera:4", "lorafix:2",
                                    "adapterdrop:4", "lntuning"])
def test_a_run_trains_each_method(method):
    spec = RunSpec("rotten_tomatoes", method, lr=1e-2, model="tiny-bert", train_fraction=0.002, n_eval=8,
                   batch_size=8)
    with torch_threads(1):
        record, model, _ = runs.execute(spec, progress=False)
    assert record.train["steps"] > 0 and record.test["n"] == 8
    assert record.label == methods.parse(method).label
    assert 0 < record.adapter_params < record.trainable_params == methods.count_trainable(model)
