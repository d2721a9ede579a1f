"""SURM on quantized base layers: bitsandbytes 8-bit and 4-bit, torchao int8 weight-only, HQQ 4-bit.

For every family and placement: one training step's adapter gradient equals the same adapter's
on a dense layer holding the dequantized weight; a merge either matches the unmerged model
within the format's rounding (measured, printed and asserted) or is refused before anything
changes; never is the adapter dropped without an error. Tiny layers (128 -> 64; bnb 4-bit
quantizes in blocks of 64)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from surm import structured
from surm.peft import SurmConfig
from surm.peft.layer import SurmLayer
from surm.peft.quantized import QuantizedMergeWarning, dequantized, weight_format

bnb = pytest.importorskip("bitsandbytes")

IN, OUT = 128, 64
FORMATS = ["bnb-int8", "bnb-4bit", "torchao-int8", "hqq-4bit"]
#: the formats a merge requantizes into
REQUANTIZED = ["bnb-int8", "bnb-4bit", "hqq-4bit"]
#: what surm.peft.quantized.weight_format calls each
WEIGHT_FORMAT = {"bnb-int8": "bnb-int8", "bnb-4bit": "bnb-4bit", "torchao-int8": "torchao", "hqq-4bit": "hqq"}
PLACEMENTS = ["parallel", "serial"]


class Net(nn.Module):
    """One target layer ``proj`` and a nonlinear loss head, so that gradients depend on the base."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def dense_linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def quantize(fmt: str, linear: nn.Linear) -> nn.Module:
    """``linear`` (float32) in the base format ``fmt``."""
    bias = linear.bias is not None
    if fmt == "bnb-int8":
        q = bnb.nn.Linear8bitLt(IN, OUT, bias=bias, has_fp16_weights=False, threshold=0.0)
        q.load_state_dict(linear.state_dict())
        return q.to("cpu")  # quantizes
    if fmt == "bnb-4bit":
        q = bnb.nn.Linear4bit(IN, OUT, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
        q.load_state_dict(linear.state_dict())
        return q.to("cpu")
    if fmt == "torchao-int8":
        torchao = pytest.importorskip("torchao.quantization")
        q = copy.deepcopy(linear)
        holder = nn.Sequential(q)
        torchao.quantize_(holder, torchao.Int8WeightOnlyConfig())
        return holder[0]
    if fmt == "hqq-4bit":
        hqq = pytest.importorskip("hqq.core.quantize")
        return hqq.HQQLinear(copy.deepcopy(linear), hqq.BaseQuantizeConfig(nbits=4, group_size=64),
                             compute_dtype=torch.float32, device="cpu")
    raise ValueError(fmt)


def dense_copy(q: nn.Module) -> nn.Linear:
    """A plain Linear holding ``q``'s dequantized weight and its bias."""
    d = nn.Linear(IN, OUT, bias=q.bias is not None)
    with torch.no_grad():
        d.weight.copy_(dequantized(q))
        if q.bias is not None:
            d.bias.copy_(q.bias.float())
    return d


def config(structure: str, placement: str, **kw) -> SurmConfig:
    return SurmConfig(structure=structure, placement=placement, target_modules=["proj"], activation="identity",
                      scaling="none", **kw)


def randomize(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every adapter tensor random values (the default init leaves S at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "surm_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def adapter_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss = (model(x) ** 2).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def grid():
    return [(s, p, f) for f in FORMATS for p in PLACEMENTS for s in structured.names()]


@pytest.mark.parametrize("structure,placement,fmt", grid())
def test_gradient_matches_dequantized_dense(structure, placement, fmt):
    q = quantize(fmt, dense_linear())
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(2))
    quant = get_peft_model(Net(q), config(structure, placement))
    dense = get_peft_model(Net(dense_copy(q)), config(structure, placement))
    randomize(quant)
    randomize(dense)
    g_q, g_d = adapter_grads(quant, x), adapter_grads(dense, x)
    assert g_q.keys() == g_d.keys() and g_q
    noise = float((q(x) - dense.base_model.model.proj.base_layer(x)).abs().max())
    worst = max(float((g_q[k] - g_d[k]).abs().max() / g_d[k].abs().max()) for k in g_q)
    print(f"{fmt} {structure} {placement}: base output noise {noise:.2e}, worst relative gradient error {worst:.2e}")
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in g_q.values())
    assert worst < 1e-4


def merge_case(structure: str, placement: str, fmt: str, bias: bool = True):
    q = quantize(fmt, dense_linear(bias=bias))
    model = get_peft_model(Net(q), config(structure, placement))
    randomize(model)
    # an update well above the format's rounding step (about 0.03 for nf4 here), so that a
    # merge that lost it would show
    layer = model.base_model.model.proj
    layer.surm_alpha["default"] = 0.3 / float(layer.surm_matrix["default"].dense().detach().abs().max())
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(3))
    return model, x


@pytest.mark.parametrize("structure,placement,fmt", [c for c in grid() if c[2] in REQUANTIZED])
def test_requantized_merge_matches_unmerged_within_rounding(structure, placement, fmt):
    model, x = merge_case(structure, placement, fmt, bias=placement == "parallel")
    surm_layer = model.base_model.model.proj
    with torch.no_grad():
        with model.disable_adapter():
            frozen = model(x)
        unmerged = model(x)
        with pytest.warns(QuantizedMergeWarning, match=r"merged into 1 quantized layer.*proj"):
            base = model.merge_and_unload()
        merged = base(x)
    layer = base.proj
    assert weight_format(layer) == WEIGHT_FORMAT[fmt]
    assert type(layer).__name__ in ("Linear8bitLt", "Linear4bit", "HQQLinear")
    rounding = surm_layer.merge_rounding
    assert rounding is not None and rounding.format == WEIGHT_FORMAT[fmt] and rounding.max_update > 0
    error = float((merged - unmerged).abs().max())
    # the stored weight is off the exact merge by at most e per entry, so each output by e * |x|_1
    bound = rounding.max_error * float(x.abs().sum(-1).max()) + 1e-5
    change, merged_change = unmerged - frozen, merged - frozen
    lost = float((merged_change - change).norm() / change.norm())
    print(f"{fmt} {structure} {placement}: {rounding.describe()}; output error {error:.2e} (bound {bound:.2e}), "
          f"update error {lost:.1%}")
    assert error <= bound
    assert lost < 0.5  # the merged model carries the adapter's update


def _weight_bytes(layer: nn.Module) -> list[torch.Tensor]:
    """Everything a quantized weight is stored as (its data and quantization statistics)."""
    if weight_format(layer) == "hqq":
        return [t.clone() for t in (layer.W_q.data, layer.meta["scale"], layer.meta["zero"])]
    w = layer.weight
    tensors = [w.data]
    if weight_format(layer) == "bnb-4bit":
        tensors.append(w.quant_state.absmax)
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("fmt", REQUANTIZED)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_unmerge_restores_the_quantized_weight_bit_for_bit(fmt, placement):
    model, x = merge_case("toeplitz", placement, fmt)
    layer = model.base_model.model.proj
    base = layer.get_base_layer()
    before, bias = _weight_bytes(base), base.bias.detach().clone()
    with torch.no_grad():
        out = model(x)
        with pytest.warns(QuantizedMergeWarning):
            model.merge_adapter()
        assert layer.merged and not torch.equal(_weight_bytes(base)[0], before[0])
        model.unmerge_adapter()
        after = model(x)
    assert not layer.merged and layer.merge_rounding is None
    assert all(torch.equal(a, b) for a, b in zip(_weight_bytes(base), before))
    assert torch.equal(base.bias, bias)
    assert torch.equal(after, out)


def _repacks_in_inference() -> bool:
    return bool(getattr(bnb.functional, "has_avx512bf16", lambda: False)())


@pytest.mark.skipif(not _repacks_in_inference(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_merge_after_an_inference_forward_that_repacked_the_4bit_weight(placement):
    """An eval-mode forward without gradients repacks a 4-bit weight for bitsandbytes' CPU kernel
    (in place); a merge afterwards unpacks a copy, merges within the rounding it reports, and
    unmerge puts the packed weight back."""
    model, x = merge_case("toeplitz", placement, "bnb-4bit")
    model.eval()
    base = model.base_model.model.proj.get_base_layer()
    with torch.no_grad():
        with model.disable_adapter():
            frozen = model(x)
        unmerged = model(x)
    assert base.weight.quant_state.packing_format_for_cpu
    packed = base.weight.data.clone()
    with torch.no_grad():
        with pytest.warns(QuantizedMergeWarning):
            model.merge_adapter()
        merged = model(x)
        rounding = model.base_model.model.proj.merge_rounding
        model.unmerge_adapter()
        after = model(x)
    bound = rounding.max_error * float(x.abs().sum(-1).max()) + 1e-5
    lost = float(((merged - frozen) - (unmerged - frozen)).norm() / (unmerged - frozen).norm())
    print(f"repacked nf4 {placement}: {rounding.describe()}; output error {(merged - unmerged).abs().max():.2e} "
          f"(bound {bound:.2e}), update error {lost:.1%}")
    assert float((merged - unmerged).abs().max()) <= bound and lost < 0.5
    assert base.weight.quant_state.packing_format_for_cpu and torch.equal(base.weight.data, packed)
    assert torch.equal(after, unmerged)


def test_merges_one_call_at_a_time_equal_one_call():
    """Each requantizing merge starts from the saved original weight: no rounding piles up."""
    def build():
        q = quantize("bnb-4bit", dense_linear())
        model = get_peft_model(Net(q), config("circulant", "parallel"))
        model.add_adapter("b", config("low_rank", "parallel"))
        randomize(model)
        return model

    one, two = build(), build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedMergeWarning)
        one.base_model.merge_adapter(["default", "b"])
        two.base_model.merge_adapter(["default"])
        two.base_model.merge_adapter(["b"])
    a, b = one.base_model.model.proj.get_base_layer(), two.base_model.model.proj.get_base_layer()
    assert torch.equal(a.weight.data, b.weight.data)
    assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)


def test_merge_warns_once_for_the_whole_model():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = quantize("bnb-4bit", dense_linear(0))
            self.b = quantize("bnb-4bit", dense_linear(1))

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = get_peft_model(Two(), SurmConfig(structure="circulant", target_modules=["a", "b"]))
    randomize(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_and_unload()
    mine = [w for w in caught if issubclass(w.category, QuantizedMergeWarning)]
    assert len(mine) == 1 and "merged into 2 quantized layer(s) (bnb-4bit)" in str(mine[0].message)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_torchao_merge_is_refused_and_changes_nothing(placement):
    model, x = merge_case("circulant", placement, "torchao-int8")
    layer = model.base_model.model.proj
    weight = layer.get_base_layer().weight
    with torch.no_grad():
        out = model(x)
    for merge in (model.merge_adapter, model.merge_and_unload, layer.merge):
        with pytest.raises(ValueError, match="torchao-quantized Int8Tensor.*dense copy of the base"):
            merge()
    assert not layer.merged and layer.get_base_layer().weight is weight
    assert isinstance(model.base_model.model.proj, SurmLayer)
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_torchao_default_path_is_not_fused():
    """The fused path builds W0 + alpha S: a torchao weight cannot take the addition, so the layer
    must not choose it (this crashed with NotImplementedError for aten.add)."""
    model, x = merge_case("circulant", "parallel", "torchao-int8")
    layer = model.base_model.model.proj
    assert not layer._can_fuse("default")
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in layer.surm_matrix["default"].parameters())


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_true_on_a_quantized_layer_is_refused(fmt):
    q = quantize(fmt, dense_linear())
    with pytest.raises(ValueError, match=r"fused=True.*Leave fused=None"):
        get_peft_model(Net(q), config("circulant", "parallel", fused=True))


@pytest.mark.parametrize("direction", ["4bit->dense", "dense->4bit", "8bit->dense", "hqq->dense", "dense->hqq"])
def test_adapter_saved_on_one_base_loads_on_the_other(direction, tmp_path):
    source_fmt, target_fmt = direction.split("->")
    fmt_of = {"4bit": "bnb-4bit", "8bit": "bnb-int8", "hqq": "hqq-4bit", "dense": None}
    linear = dense_linear()

    def base(fmt):
        return Net(copy.deepcopy(linear) if fmt is None else quantize(fmt, copy.deepcopy(linear)))

    trained = get_peft_model(base(fmt_of[source_fmt]), config("toeplitz", "parallel"))
    randomize(trained)
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(fmt_of[target_fmt]), tmp_path)
    saved = {k: v for k, v in trained.state_dict().items() if "surm_" in k}
    own = loaded.state_dict()
    assert saved and all(torch.equal(own[k], v) for k, v in saved.items())
    x = torch.randn(2, IN)
    with torch.no_grad():
        with loaded.disable_adapter():
            frozen = loaded(x)
        adapted = loaded(x)
        S = loaded.base_model.model.proj.surm_matrix["default"]
        expected = torch.nn.functional.linear(x, S.dense())
    torch.testing.assert_close(adapted - frozen, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_batch_on_a_quantized_base_matches_each_adapter_alone(fmt):
    model = get_peft_model(Net(quantize(fmt, dense_linear())), config("circulant", "parallel"))
    model.add_adapter("b", config("toeplitz", "serial"))
    randomize(model)
    model.eval()
    x = torch.randn(3, IN)
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "b", "__base__"])
        alone = []
        for name in ("default", "b"):
            model.set_adapter(name)
            alone.append(model(x))
        with model.disable_adapter():
            alone.append(model(x))
    for row, expected in enumerate(alone):
        torch.testing.assert_close(mixed[row], expected[row], atol=1e-5, rtol=1e-5)


def test_hqq_quantized_llama_trains_and_merges_and_unloads():
    """A whole model quantized by hqq's own AutoHQQHFModel (transformers 5.25 cannot load with
    HqqConfig): SURM on q,v trains, and merge_and_unload leaves plain HQQLinear layers whose logits
    match the adapter model's within the rounding."""
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    from surm.harness.models import tiny

    model = tiny.model()
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=4, group_size=64),
                                  compute_dtype=torch.float32, device="cpu")
    peft_model = get_peft_model(model, SurmConfig(structure="circulant", target_modules=["q_proj", "v_proj"],
                                                  init="random"))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trained) == 4 and all(p.grad is not None and p.grad.abs().max() > 0 for p in trained)
    with torch.no_grad():
        with peft_model.disable_adapter():
            frozen = peft_model(input_ids=ids).logits
        adapted = peft_model(input_ids=ids).logits
        with pytest.warns(QuantizedMergeWarning, match=r"merged into 4 quantized layer\(s\) \(hqq\)"):
            merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    attention = merged_model.model.layers[0].self_attn
    assert type(attention.q_proj).__name__ == type(attention.v_proj).__name__ == "HQQLinear"
    error, effect = float((merged - adapted).abs().max()), float((adapted - frozen).abs().max())
    print(f"hqq tiny Llama: merged logits off by {error:.3g}, the adapter moves them {effect:.3g}")
    assert error < effect
