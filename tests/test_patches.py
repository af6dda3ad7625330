"""peft_ext.patches: the only module that changes PEFT, every change limited to peft-ext's adapters, and the pinned
PEFT's signatures of what it wraps recorded (a PEFT release that changes one fails here first)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peft import LoraConfig, PeftModel, RandLoraConfig, get_peft_model

import peft_ext
from peft_ext import patches
from peft_ext.presets import RandLoraPaperConfig, randlora_preset
from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _resolve(key: str):
    module, qualname = key.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("key", sorted(patches.PATCHED))
def test_patched_originals_keep_the_pinned_signature(key):
    """The wrappers pass arguments through by the pinned signature; a PEFT release that changes it must be
    re-checked."""
    original = patches.ORIGINALS[key]
    assert patches.signature_text(original) == patches.PATCHED[key], (
        f"PEFT changed the signature of {key}; check the wrapper in peft_ext/patches.py, then record the new one."
    )
    installed = _resolve(key)
    assert installed is not original and installed.__wrapped__ is original  # the wrapper is what PEFT now calls


def test_every_wrapped_callable_is_recorded():
    assert set(patches.ORIGINALS) == set(patches.PATCHED)


# One fresh interpreter without the autoload: a plain LoRA adapter's round trip (save, card, special forward args,
# error of a truncated file), a snapshot of PEFT, `import peft_ext`, the round trip again, and what changed in PEFT.
_SCRIPT = textwrap.dedent(
    """
    import hashlib, inspect, json, os, sys, tempfile
    import torch
    import peft, peft.tuners, peft.peft_model, peft.mapping
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners import randlora
    from transformers import LlamaConfig, LlamaForCausalLM
    assert "peft_ext" not in sys.modules

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()

    def lora_round_trip():
        torch.manual_seed(0)
        model = get_peft_model(base(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        out = {"special": sorted(model.special_peft_forward_args)}
        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        out["files"] = {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
                        for n in sorted(os.listdir(folder))}
        weights = os.path.join(folder, "adapter_model.safetensors")
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
        try:
            PeftModel.from_pretrained(base(), folder)
            out["error"] = None
        except Exception as exc:
            out["error"] = [type(exc).__module__, type(exc).__name__, str(exc).replace(folder, "<dir>")]
        return out

    def snapshot():
        mods = {n: m for n, m in sys.modules.items() if n == "peft" or n.startswith("peft.")}
        out = {}
        for name, mod in mods.items():
            for attr, value in list(vars(mod).items()):
                out[f"{name}:{attr}"] = id(value)
                if inspect.isclass(value) and value.__module__ == name:
                    for cattr, cvalue in list(vars(value).items()):
                        out[f"{name}:{attr}.{cattr}"] = id(cvalue)
        from peft import mapping
        from peft.utils.peft_types import PeftType
        for table in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
                      "PEFT_TYPE_TO_MIXED_MODEL_MAPPING"):
            for k, v in getattr(mapping, table, {}).items():
                out[f"{table}[{getattr(k, 'value', k)}]"] = id(v)
        for member in PeftType.__members__:
            out[f"PeftType.{member}"] = 0
        return out

    without = lora_round_trip()
    before = snapshot()
    import peft_ext
    after = snapshot()
    with_ext = lora_round_trip()
    old_modules = {k.split(":")[0] for k in before if ":" in k}
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    added = sorted(k for k in after if k not in before and (":" not in k or k.split(":")[0] in old_modules))
    print(json.dumps({"changed": changed, "added": added, "without": without, "with": with_ext}))
    """
)


@pytest.fixture(scope="module")
def fresh_process():
    env = {**os.environ, "PEFT_EXT_NO_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_peft_ext_changes_only_what_patches_documents(fresh_process):
    methods = {spec.name.upper() for spec in peft_ext.list_methods()}
    expected_changed = {
        "peft.peft_model:PeftModel.__init__",
        "peft.peft_model:PeftModel.save_pretrained",
        "peft.peft_model:PeftModel.create_or_update_model_card",
        "peft.peft_model:load_peft_weights",
        "PEFT_TYPE_TO_CONFIG_MAPPING[RANDLORA]",
    }
    changed = set(fresh_process["changed"])
    assert changed == expected_changed, f"undocumented change(s) to PEFT: {sorted(changed ^ expected_changed)}"
    added = set(fresh_process["added"])
    # new: the peft types of peft-ext's methods (enum members and table entries), RandLoRA's own inject_adapter (it
    # inherited BaseTuner's), the two patch markers
    allowed_added = {"peft.peft_model:PeftModel._peft_ext_patched",
                     "peft.tuners.randlora.model:RandLoraModel._peft_ext_patched",
                     "peft.tuners.randlora.model:RandLoraModel.inject_adapter"}
    for m in methods:
        allowed_added |= {f"PeftType.{m}", f"peft.utils.peft_types:PeftType.{m}"}
        tables = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
                  "PEFT_TYPE_TO_MIXED_MODEL_MAPPING")
        allowed_added |= {f"{table}[{m}]" for table in tables}
    unexpected = added - allowed_added
    assert not unexpected, f"undocumented addition(s) to PEFT: {sorted(unexpected)}"
    assert {f"PeftType.{m}" for m in methods} <= added


def test_plain_lora_adapter_behaves_exactly_as_without_peft_ext(fresh_process):
    without, with_ext = fresh_process["without"], fresh_process["with"]
    assert with_ext["special"] == without["special"]
    assert set(with_ext["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert with_ext["files"] == without["files"]  # adapter, config and PEFT's own card, byte for byte
    assert without["error"] is not None and with_ext["error"] == without["error"]  # PEFT's own error, unchanged


def test_peft_ext_adapter_gets_the_clear_truncation_error(tmp_path):
    model = get_peft_model(tiny_llama(), peft_ext.DyLoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"truncated, corrupted or not a safetensors file.*Save the adapter again"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_routed_call_args_only_for_peft_ext_adapters():
    routed = next(s for s in peft_ext.list_methods() if s.model_cls.call_args)
    ext = get_peft_model(tiny_llama(), routed.config_cls(**{**routed.example_kwargs, "target_modules": ["q_proj"]}))
    plain = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert set(routed.model_cls.call_args) <= ext.special_peft_forward_args
    assert not set(routed.model_cls.call_args) & plain.special_peft_forward_args


def test_randlora_config_class_follows_the_saved_file(tmp_path):
    """Upstream RandLoRA loads as PEFT's own RandLoraConfig; only a paper-scaled one as RandLoraPaperConfig."""
    plain_dir, paper_dir = tmp_path / "plain", tmp_path / "paper"
    get_peft_model(tiny_llama(), RandLoraConfig(r=8, target_modules=["q_proj"])).save_pretrained(plain_dir)
    get_peft_model(tiny_llama(), randlora_preset(r=8, target_modules=["q_proj"])).save_pretrained(paper_dir)
    plain = PeftModel.from_pretrained(tiny_llama(), plain_dir)
    paper = PeftModel.from_pretrained(tiny_llama(), paper_dir)
    assert type(plain.peft_config["default"]) is RandLoraConfig
    assert type(paper.peft_config["default"]) is RandLoraPaperConfig and paper.peft_config["default"].paper_scaling
    layer = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == RandLoraConfig().randlora_alpha / 8  # upstream α/r, untouched
    assert "paper_scaling" not in json.loads((plain_dir / "adapter_config.json").read_text())
