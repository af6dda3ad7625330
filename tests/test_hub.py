"""push_to_hub with the Hub client mocked: which files go up, and that the card survives."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
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
    assert peft_ext.push_to_hub(model, "someone/my-adapter", api=api, private=True) == "commit-info"
    api.create_repo.assert_called_once_with(repo_id="someone/my-adapter", private=True, exist_ok=True, repo_type="model")
    assert set(uploaded) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = uploaded["README.md"].decode()
    assert "peft-ext" in card and f"- {spec.name}" in card and spec.paper_url in card and "library_name: peft" in card
    assert f'"peft_type": "{spec.name.upper()}"' in uploaded["adapter_config.json"].decode()


def test_push_rejects_bad_repo_id_and_non_peft_model():
    model = get_peft_model(tiny_llama(), peft_ext.DyLoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="repo_id"):
        peft_ext.push_to_hub(model, "a/b/c", api=mock.Mock())
    with pytest.raises(TypeError, match="PeftModel"):
        peft_ext.push_to_hub(tiny_llama(), "a/b", api=mock.Mock())
