"""surm.harness.methods: the method-string grammar, applying methods to a model, learning-rate defaults."""

import peft
import pytest
import torch
from torch import nn

import surm
from surm.harness import methods
from surm.harness.models import catalog
from surm.harness.models.packaged import plain_pointwise_convs
from surm.harness.models.profiles import EFFICIENTNET as IMAGE
from surm.harness.models.profiles import Profile
from surm.peft import SurmLayer
from tests.peft.tiny_models import bert

TEXT = catalog.CATALOG["minilm"].profile  # MiniLM's (BERT) profile



@pytest.mark.parametrize(
    "text, kind, structure, placement, rank, knobs",
    [
        ("full", "full", None, "parallel", None, {}),
        ("head", "head", None, "parallel", None, {}),
        ("bitfit", "bitfit", None, "parallel", None, {}),
        ("lora:8", "lora", None, "parallel", 8, {}),
        ("lora:4:alpha=16", "lora", None, "parallel", 4, {"alpha": 16}),
        ("houlsby:32", "houlsby", None, "parallel", 32, {}),
        ("pfeiffer:24", "pfeiffer", None, "parallel", 24, {}),
        ("surm:circulant", "surm", "circulant", "parallel", None, {}),
        ("surm:circulant:block_size=128", "surm", "circulant", "parallel", None, {"block_size": 128}),
        ("surm:toeplitz:serial", "surm", "toeplitz", "serial", None, {}),
        ("surm:ldr:rank=2:alpha=0.5", "surm", "ldr", "parallel", None, {"rank": 2, "alpha": 0.5}),
        ("surm:kronecker:factors=((4,6),(6,4))", "surm", "kronecker", "parallel", None, {"factors": ((4, 6), (6, 4))}),
        (" SURM:circulant ", "surm", "circulant", "parallel", None, {}),
        ("c3a:64", "c3a", None, "parallel", None, {"block_size": 64}),
        ("lokr:4", "lokr", None, "parallel", 4, {}),
        ("lokr:4:alpha=8", "lokr", None, "parallel", 4, {"alpha": 8}),
        ("kadaptation:2", "kadaptation", None, "parallel", 2, {}),
        ("fourierft:1000", "fourierft", None, "parallel", None, {"n_frequency": 1000}),
        ("fourierft:1000:alpha=300.0", "fourierft", None, "parallel", None, {"n_frequency": 1000, "alpha": 300.0}),
        ("vera:256", "vera", None, "parallel", 256, {}),
        ("lorafix:8", "lorafix", None, "parallel", 8, {}),
        ("adapterdrop:32", "adapterdrop", None, "parallel", 32, {}),
        ("adapterdrop:32:drop=2", "adapterdrop", None, "parallel", 32, {"drop": 2}),
        ("lntuning", "lntuning", None, "parallel", None, {}),
    ],
)
def test_parse(text, kind, structure, placement, rank, knobs):
    m = methods.parse(text)
    assert (m.kind, m.structure, m.placement, m.rank, dict(m.knobs)) == (kind, structure, placement, rank, knobs)
    assert methods.parse(m.name) == m  # the canonical name round-trips


@pytest.mark.parametrize(
    "text, needle",
    [
        ("adapter", "must start with one of"),
        ("lora", "positive rank"),
        ("lora:0", "positive rank"),
        ("lora:x", "positive rank"),
        ("surm", "name a structure"),
        ("surm:fourier", "unknown structure"),
        ("surm:circulant:sideways", "placement"),
        ("surm:circulant:size=3", "unknown knob"),
        ("full:alpha=2", "takes no knobs"),
        ("lora:8:9", "unexpected"),
        ("c3a", "positive block size"),
        ("c3a:0", "positive block size"),
        ("c3a:64:alpha=2", "c3a takes no knob .alpha."),
        ("lokr", "positive rank"),
        ("vera:0", "positive rank"),
        ("fourierft", "positive number of frequencies"),
        ("fourierft:0", "positive number of frequencies"),
        ("fourierft:100:n_frequency=3", "unknown knob"),
        ("lntuning:alpha=2", "takes no knobs"),
        ("lntuning:4", "unexpected"),
        ("lokr:4:block_size=2", "lokr takes no knob 'block_size'"),
        ("houlsby:8:drop=2", "houlsby takes no knob 'drop'"),
        ("adapterdrop:8:drop=-1", "drop is a number of blocks"),
        ("adapterdrop:8:drop=x", "drop is a number of blocks"),
    ],
)
def test_parse_errors(text, needle):
    with pytest.raises(ValueError, match=needle):
        methods.parse(text)


def test_labels_are_readable():
    assert methods.parse("lora:8").label == "LoRA r=8"
    assert methods.parse("surm:toeplitz:serial").label == "SURM toeplitz (serial)"
    assert methods.parse("surm:ldr:rank=2").label == "SURM ldr rank=2"
    assert methods.parse("head").label == "head only"
    assert methods.parse("c3a:64").label == "C3A block_size=64" and methods.parse("c3a:64").name == "c3a:64"
    assert methods.parse("lokr:4").label == "LoKr r=4"
    assert methods.parse("kadaptation:4").label == "KAdaptation r=4"
    assert methods.parse("fourierft:1000").label == "FourierFT n=1000"
    assert methods.parse("fourierft:1000:alpha=300").label == "FourierFT n=1000 alpha=300"
    assert methods.parse("fourierft:1000:alpha=300").name == "fourierft:1000:alpha=300"
    assert methods.parse("vera:256").label == "VeRA r=256"
    assert methods.parse("lorafix:8").label == "LoRA-FIX r=8"
    assert methods.parse("adapterdrop:32:drop=2").label == "AdapterDrop r=32 drop=2"
    assert methods.parse("lntuning").label == "LN tuning"


def test_parse_takes_a_method_as_it_is():
    method = methods.parse("surm:circulant")
    assert methods.parse(method) is method and str(method) == "surm:circulant"
    assert method.family == "circulant" and methods.parse("lora:8").family == "lora"


def test_default_lr_lookup_chain(monkeypatch):
    import dataclasses

    # SURM takes surm.recommended_lr of its config unless a profile names it
    assert methods.default_lr("surm:circulant") == surm.recommended_lr(surm.SurmConfig(structure="circulant"))
    assert methods.default_lr("surm:kronecker:serial") == surm.recommended_lr(
        surm.SurmConfig(structure="kronecker", placement="serial"))
    assert methods.default_lr("surm:toeplitz:scaling=none") == surm.recommended_lr(
        surm.SurmConfig(structure="toeplitz", scaling="none"))
    assert methods.default_lr("surm:kronecker", Profile(head=None, lr={"surm:kronecker": 0.123})) == 0.123
    assert methods.default_lr("surm:circulant", Profile(head=None, lr={"surm:parallel": 0.456})) == 0.456
    assert methods.default_lr("lora:1") == methods.KINDS["lora"].lr
    profile = Profile(head="classifier", lr={"lora": 0.5})
    assert methods.default_lr("lora:8", profile) == 0.5
    assert methods.default_lr("head", profile) == methods.KINDS["head"].lr
    # a kind without a rate of its own takes the rate of the kind it falls back on
    assert methods.default_lr("kadaptation:4") == methods.KINDS["lokr"].lr
    for kind in ("full", "head", "bitfit", "lora:1", "houlsby:2", "pfeiffer:2", "surm:ldr", "surm:circulant:serial"):
        assert methods.default_lr(kind) > 0
    monkeypatch.setitem(methods.KINDS, "c3a", dataclasses.replace(methods.KINDS["c3a"], lr=None))
    with pytest.raises(ValueError, match="no default learning rate for c3a:64 .* give one"):
        methods.default_lr("c3a:64")


def test_every_kind_is_one_record_the_grammar_and_labels_follow():
    for name, kind in methods.KINDS.items():
        assert kind.name == name and set(kind.knobs) <= set(methods.KNOBS)
        assert kind.grammar in methods.GRAMMAR
        assert (kind.build is None) == (kind.trains is not None)  # an adapter, or which parameters train
    assert methods.parse("fourierft:768:alpha=100").label == "FourierFT n=768 alpha=100"
    assert methods.parse("c3a:64:targets=all").label == "C3A block_size=64 targets=all"
    assert methods.parse("lora:8").label == "LoRA r=8" and methods.parse("lntuning").label == "LN tuning"


def test_the_parsers_placements_are_the_tuners():
    from surm.harness.methods.grammar import PLACEMENTS

    assert PLACEMENTS == surm.peft.PLACEMENTS


def test_profiles_come_from_the_catalog_and_the_target_tables():
    from surm.peft.targets import PARALLEL_TARGETS, lora_default_targets

    assert TEXT.head == "classifier" and TEXT.lora == tuple(lora_default_targets("bert"))
    assert TEXT.block == tuple(PARALLEL_TARGETS["bert"]) and TEXT.parallel is None and TEXT.serial is None
    assert catalog.CATALOG["efficientnet"].profile is IMAGE and IMAGE.convolutional


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_head_bitfit_set_requires_grad():
    model, _, _ = bert(torch.float32)
    n_all = sum(p.numel() for p in model.parameters())
    assert methods.count_trainable(methods.apply(model, "full")) == n_all
    methods.apply(model, "head")
    assert _trainable(model) == {"classifier.weight", "classifier.bias"}
    methods.apply(model, "bitfit")
    names = _trainable(model)
    assert "classifier.weight" in names and all(n.endswith("bias") or n.startswith("classifier") for n in names)
    assert any("attention.self.query.bias" in n for n in names)
    assert methods.count_trainable(model, exclude_head="classifier") == sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("bias") and not n.startswith("classifier")
    )


@pytest.mark.parametrize(
    "method, expected_adapter_params",
    [
        ("lora:2", 2 * 2 * (24 + 24) * 2),  # 2 layers x (query, value) x r (m + n)
        # every linear map of the 2 blocks: 4 of 24 x 24, FFN in 48 x 24 and out 24 x 48
        ("surm:circulant", 2 * (4 * 24 + 2 * 48)),
        ("surm:toeplitz", 2 * (4 * 47 + 2 * 71)),
        ("surm:circulant:targets=qv", 2 * 2 * 24),
        ("lora:2:targets=all", 2 * 2 * (4 * 48 + 2 * 72)),
        ("surm:circulant:serial", 2 * 2 * (24 + 24)),  # Houlsby positions: S (24) + beta (24)
        ("houlsby:4", 2 * 2 * (2 * 24 * 4 + 4 + 24)),
        ("pfeiffer:4", 2 * 1 * (2 * 24 * 4 + 4 + 24)),
    ],
)
def test_adapter_methods_count_and_train_the_head(method, expected_adapter_params):
    model, inputs, run = bert(torch.float32)
    wrapped = methods.apply(model, method)
    assert isinstance(wrapped, peft.PeftModel)
    assert methods.count_trainable(wrapped, exclude_head="classifier") == expected_adapter_params
    head = [n for n in _trainable(wrapped) if "classifier" in n]
    assert head and all("modules_to_save" in n for n in head)
    assert run(wrapped).shape == (2, 3)


def test_c3a_goes_where_lora_goes():
    model, _, run = bert(torch.float32)
    config = methods.peft_config("c3a:8", TEXT)
    assert isinstance(config, peft.C3AConfig) and config.block_size == 8
    assert config.target_modules == {"query", "value"} and config.modules_to_save == ["classifier"]
    wrapped = methods.apply(model, "c3a:8")
    # 2 layers x (query, value) x (24 / 8)^2 blocks of 8
    assert methods.count_trainable(wrapped, exclude_head="classifier") == 2 * 2 * 9 * 8
    assert run(wrapped).shape == (2, 3)


def test_peft_config_without_a_head_saves_no_module():
    profile = Profile(head=None, parallel=["hidden"], lora=["hidden"])
    assert methods.peft_config("lora:2", profile).modules_to_save is None
    assert methods.peft_config("surm:circulant", profile).modules_to_save is None
    assert methods.peft_config("head", profile) is None


def test_surm_knobs_reach_the_layers():
    model, _, _ = bert(torch.float32)
    wrapped = methods.apply(model, "surm:circulant:block_size=8:alpha=0.5:targets=qv:scaling=none")
    layers = [m for m in wrapped.modules() if isinstance(m, SurmLayer)]
    assert len(layers) == 4 and all(layer.surm_alpha["default"] == 0.5 for layer in layers)
    assert all(layer.surm_matrix["default"].num_params == 24 * 24 // 8 for layer in layers)
    scaled = methods.apply(bert(torch.float32)[0], "surm:circulant:alpha=0.5:targets=qv")
    assert all(layer.surm_alpha["default"] == pytest.approx(0.5 / 24 ** 0.5)
               for layer in scaled.modules() if isinstance(layer, SurmLayer))


def test_bottleneck_adapters_keep_alpha_alone():
    for method in ("houlsby:4", "pfeiffer:4", "adapterdrop:4:drop=1"):
        assert methods.peft_config(method, TEXT).scaling == "none"


@pytest.mark.parametrize("text, match", [
    ("lora:2:targets=everything", "targets must be one of"),
    ("surm:circulant:serial:targets=all", "targets is for parallel"),
    ("lora:2:scaling=none", "lora takes no knob 'scaling'; its knobs: alpha, dropout, targets"),
    ("houlsby:4:targets=all", "houlsby takes no knob 'targets'"),
])
def test_targets_and_scaling_knob_errors(text, match):
    with pytest.raises(ValueError, match=match):
        methods.parse(text)


class _SamePadConv(nn.Conv2d):
    """A Conv2d subclass with another positional signature, as EfficientNet's."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _SamePadConv(3, 8, 3)
        self._expand_conv = _SamePadConv(8, 12, 1, bias=False)
        self._project_conv = _SamePadConv(12, 8, 1)
        self._fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self._project_conv(torch.relu(self._expand_conv(self.stem(x))))
        return self._fc(h.mean((2, 3)))


def test_plain_pointwise_convs_keeps_outputs_and_lets_lora_in():
    net = _Net().eval()
    x = torch.randn(2, 3, 9, 9)
    before = net(x)
    plain_pointwise_convs(net)
    assert type(net._expand_conv) is nn.Conv2d and type(net._project_conv) is nn.Conv2d
    assert type(net.stem) is _SamePadConv  # not pointwise: untouched
    torch.testing.assert_close(net(x), before)
    for method in ("lora:2", "surm:circulant", "surm:toeplitz:serial"):
        model = methods.apply(plain_pointwise_convs(_Net()), method, IMAGE)
        assert methods.count_trainable(model, exclude_head="_fc") > 0
        assert model(x).shape == (2, 3)


def test_apply_takes_a_peft_config_as_it_is():
    model, _, run = bert(torch.float32)
    config = peft.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    wrapped = methods.apply(model, config)
    assert isinstance(wrapped, peft.PeftModel) and wrapped.peft_config["default"] is config
    assert methods.count_trainable(wrapped, exclude_head="classifier") == 2 * 2 * (24 + 24)
