"""Bad input: clear errors naming the field; corrupted files; saves that fail midway leave old files intact."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import LLAMA_TARGETS, make_config, method_params, randomize_adapter, tiny_llama


@pytest.mark.parametrize("spec", method_params())
def test_target_modules_matching_nothing(spec):
    with pytest.raises(ValueError, match=r"target_modules=.*matched no module.*allowed"):
        get_peft_model(tiny_llama(), make_config(spec, ["no_such_layer"]))


@pytest.mark.parametrize("spec", method_params())
def test_unsupported_layer_type_is_named(spec):
    with pytest.raises(TypeError, match="Embedding is not supported"):
        get_peft_model(tiny_llama(), make_config(spec, ["embed_tokens"]))


@pytest.fixture
def saved(tmp_path):
    spec = method_params()[0].values[0]
    model = get_peft_model(tiny_llama(), make_config(spec, LLAMA_TARGETS))
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_safetensors"])
def test_damaged_adapter_file_gives_a_clear_error(saved, damage):
    _, path = saved
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(os.urandom(len(data)))
    else:
        weights.unlink()
        (path / "adapter_model.bin").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="truncated, corrupted or not a safetensors file"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_save_failing_midway_leaves_previous_files_intact(saved, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    import peft.peft_model

    def half_write_then_fail(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_write_then_fail)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".peft-ext-save-")], "staging folder left"
    PeftModel.from_pretrained(tiny_llama(), path)  # still loads


def test_save_into_a_file_path_is_refused(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(ValueError, match="must be a folder"):
        model.save_pretrained(target)
