"""The model catalog: names, aliases, local directories, modalities, skeletons and profiles."""

import pytest
import torch

from surm.harness.models import catalog
from surm.harness.models.profiles import EFFICIENTNET, profile_of, transformer_profile
from surm.peft.targets import PARALLEL_TARGETS, SERIAL_TARGETS


def test_every_modality_has_a_default_in_the_catalog():
    for modality, name in catalog.DEFAULTS.items():
        assert catalog.entry(None, modality) is catalog.CATALOG[name]
        assert catalog.CATALOG[name].modality == modality
    assert catalog.entry("smollm2", "causal_lm").name == "smollm2-135m"  # an alias


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama", "efficientnet"])
def test_skeletons_hold_shapes_and_no_weights(name):
    entry = catalog.CATALOG[name]
    model = entry.skeleton()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert entry.pretrained == (name == "efficientnet")  # the tiny ones are random


def test_wrong_modality_and_unknown_names_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="model minilm takes labelled texts, but the data are prompt -> response"):
        catalog.entry("minilm", "causal_lm")
    with pytest.raises(ValueError, match="unknown model 'gpt9': choose minilm, .* or a local transformers"):
        catalog.entry("gpt9", "text")


def test_a_local_directory_takes_its_profile_from_the_model_type(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32, pad_token_id=0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    entry = catalog.entry(str(tmp_path), "text")
    assert entry.profile.head == "score" and entry.profile.block == tuple(PARALLEL_TARGETS["gpt2"])
    assert not entry.packaged and entry.skeleton().score.weight.device.type == "meta"
    assert catalog.entry(str(tmp_path), "causal_lm").profile.head is None
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no transformers config there"):
        catalog.entry(str(tmp_path / "nothing"), "text")


def test_profiles_are_made_from_the_target_tables():
    llama = transformer_profile("llama", head=None)
    assert llama.block == tuple(PARALLEL_TARGETS["llama"]) and llama.lora == ("q_proj", "v_proj")
    assert llama.parallel is None and llama.serial is None  # SURM's own defaults: SERIAL_TARGETS["llama"]
    assert SERIAL_TARGETS["llama"] == ["o_proj", "down_proj"] and llama.ffn_out == "down_proj"
    assert llama.blocks == "layers" and llama.norms == ("input_layernorm", "post_attention_layernorm")
    with pytest.raises(ValueError, match="no adapter targets are known for model type 'nonsense'"):
        transformer_profile("nonsense", head=None)
    assert EFFICIENTNET.convolutional and EFFICIENTNET.head == "_fc"


def test_profile_of_reads_a_model_and_a_peft_model():
    from surm.harness.models import tiny

    model = tiny.model()
    assert profile_of(model) == catalog.CATALOG["tiny-llama"].profile
    with pytest.raises(ValueError, match="no transformers config"):
        profile_of(torch.nn.Linear(2, 2))
