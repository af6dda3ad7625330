"""push_to_hub with the Hub client mocked: which files go up, the base model's Hub id in config and card, and that
the card survives."""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import ModelCard
from peft import get_peft_model

import peft_ext
from conftest import LLAMA_TARGETS, make_config, method_params, tiny_llama


@pytest.mark.parametrize("spec", method_params())
def test_push_uploads_adapter_and_card(spec):
    model = get_peft_model(tiny_llama(), make_config(spec, LLAMA_TARGETS))
    uploaded = {}

    def upload_folder(*, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploaded.update({p.name: p.read_bytes() for p in folder.iterdir()})
        return "commit-info"

    api = mock.Mock()
    api.upload_folder.side_effect = upload_folder
    base = "hf-internal-testing/tiny-random-LlamaForCausalLM"  # the random tiny Llama has no Hub id of its own
    assert peft_ext.push_to_hub(model, "someone/my-adapter", base_model=base, api=api, private=True) == "commit-info"
    api.create_repo.assert_called_once_with(
        repo_id="someone/my-adapter", private=True, exist_ok=True, repo_type="model")
    assert set(uploaded) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.base_model == base and card.data.library_name == "peft"
    assert {"peft-ext", spec.name, f"base_model:adapter:{base}"} <= set(card.data.tags)
    assert spec.paper_url in card.text and re.search(r'from_pretrained\((base, )?"someone/my-adapter"\)', card.text)
    config = json.loads(uploaded["adapter_config.json"])
    assert config["peft_type"] == spec.name.upper() and config["base_model_name_or_path"] == base


def test_push_refuses_a_base_model_without_hub_id():
    model = get_peft_model(tiny_llama(), peft_ext.DyLoraConfig(target_modules=["q_proj"]))
    api = mock.Mock()
    with pytest.raises(ValueError, match=r"no known Hugging Face Hub id; pass --base-model ID"):
        peft_ext.push_to_hub(model, "someone/my-adapter", api=api)
    with pytest.raises(ValueError, match=r"--base-model must be a Hub model id"):
        peft_ext.push_to_hub(model, "someone/my-adapter", base_model="/local/folder", api=api)
    api.upload_folder.assert_not_called()


def test_push_rejects_bad_repo_id_and_non_peft_model():
    model = get_peft_model(tiny_llama(), peft_ext.DyLoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="repo_id"):
        peft_ext.push_to_hub(model, "a/b/c", api=mock.Mock())
    with pytest.raises(TypeError, match="PeftModel"):
        peft_ext.push_to_hub(tiny_llama(), "a/b", api=mock.Mock())
