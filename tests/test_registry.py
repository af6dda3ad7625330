"""The registry: PeftType members, unique prefixes, idempotent import, autoload, model card, README table."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_ext
from peft_ext import registry

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_is_a_peft_type_with_its_classes_and_prefix():
    specs = peft_ext.list_methods()
    assert {"dylora", "nola"} <= {s.name for s in specs}
    for spec in specs:
        member = PeftType[spec.name.upper()]
        assert member.value == spec.name.upper() and member in list(PeftType)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is spec.config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[member] is spec.model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == spec.prefix == f"{spec.name}_"
        assert spec.config_cls().peft_type == member
        assert spec.paper_url.startswith("https://") and spec.paper_title
        assert spec.config_cls.__doc__ and spec.paper_url in (spec.config_cls.__doc__ + spec.model_cls.__doc__)


def test_prefixes_are_unique_across_all_of_peft():
    ours = {spec.prefix for spec in peft_ext.list_methods()}
    others = [p for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if str(t.value).lower() + "_" not in ours]
    assert not ours & set(others)


def test_duplicate_prefix_is_refused(monkeypatch):
    from peft_ext.tuners.dylora import DyLoraConfig, DyLoraModel

    monkeypatch.setitem(PEFT_TYPE_TO_PREFIX_MAPPING, PeftType.VERA, "clash_")

    class ClashModel(DyLoraModel):
        prefix = "clash_"

    spec = registry.MethodSpec("clash", DyLoraConfig, ClashModel, "t", "https://x", "")
    with pytest.raises(ValueError, match="already used"):
        registry.register(spec)
    assert "clash" not in {s.name for s in peft_ext.list_methods()}


def test_a_name_peft_already_uses_is_refused():
    from peft import VeraConfig
    from peft.tuners.vera import VeraModel

    class VeraLike(VeraModel):
        prefix = "vera_"

    spec = registry.MethodSpec("vera", peft_ext.DyLoraConfig, VeraLike, "t", "https://x", "")
    with pytest.raises(ValueError, match="PEFT already has a method 'VERA'"):
        registry.register(spec)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.VERA] is VeraConfig


def test_inconsistent_model_prefix_is_refused():
    from peft_ext.tuners.dylora import DyLoraConfig, DyLoraModel

    spec = registry.MethodSpec("other", DyLoraConfig, DyLoraModel, "t", "https://x", "")
    with pytest.raises(ValueError, match="prefix must be 'other_'"):
        registry.register(spec)


def test_importing_again_is_harmless():
    before = [s.name for s in peft_ext.list_methods()]
    for spec in peft_ext.list_methods():
        assert registry.register(spec) is spec
    importlib.reload(registry)
    assert [s.name for s in registry.list_methods()] == before
    assert len([m for m in PeftType if m.value == "DYLORA"]) == 1


def test_get_method_by_name_type_or_config():
    spec = peft_ext.get_method("dylora")
    assert peft_ext.get_method("DYLORA") is spec and peft_ext.get_method(peft_ext.DyLoraConfig()) is spec
    with pytest.raises(KeyError, match="not a peft-ext method"):
        peft_ext.get_method("nope")


def _run(code: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PEFT_EXT_NO_AUTOLOAD", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_autoload_registers_when_peft_is_imported():
    code = "import sys, peft; from peft.utils import PeftType; print('peft_ext' in sys.modules, PeftType.DYLORA)"
    assert _run(code) == (
        "True PeftType.DYLORA"
    )


def test_processes_that_never_import_peft_do_not_pay():
    assert _run("import sys; print(sorted(m for m in ('peft', 'peft_ext', 'torch') if m in sys.modules))") == "[]"


def test_saved_adapter_card_has_tags_and_cites_the_paper(tmp_path):
    from peft import get_peft_model

    from conftest import tiny_llama

    for spec in peft_ext.list_methods():
        out = tmp_path / spec.name
        model = get_peft_model(tiny_llama(), spec.config_cls(**spec.example_kwargs, target_modules=["q_proj"]))
        model.save_pretrained(out)
        card = (out / "README.md").read_text()
        front = card.split("---")[1]
        assert "peft-ext" in front and f"- {spec.name}" in front and "library_name: peft" in front
        assert spec.paper_url in card and spec.paper_title in card and card.count("## peft-ext") == 1
        model.save_pretrained(out)  # saving again keeps one peft-ext section
        assert (out / "README.md").read_text().count("## peft-ext") == 1


def test_readme_method_table_matches_the_registry():
    """The table is generated (scripts/gen_docs.py; tests/test_docs.py checks it is current): one row per method."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- methods:start -->")[1].split("<!-- methods:end -->")[0]
    rows = [line for line in table.strip().splitlines()[2:] if line.startswith("|")]
    names = [re.search(r"`(\w+)`", row.split("|")[1]).group(1) for row in rows]
    assert names == [spec.name for spec in peft_ext.list_methods()]
    for row, spec in zip(rows, peft_ext.list_methods()):
        assert spec.paper_url in row and spec.config_cls.__name__ in row


def test_every_spec_declares_buildable_examples_and_bench_variants():
    """The conformance suite, the CLI and scripts/bench_overhead.py build these; a broken one breaks them all."""
    for spec in peft_ext.list_methods():
        spec.config_cls(**spec.example_kwargs, target_modules=["q_proj"])
        for entry in spec.bench_variants:
            assert len(entry) in (2, 3) and isinstance(entry[0], str) and isinstance(entry[1], dict), entry
            spec.config_cls(**{**spec.example_kwargs, **entry[1]}, target_modules=["q_proj"])
        assert spec.overhead_target is None or spec.overhead_target >= 1.0
        if spec.train_callback is not None:
            assert callable(spec.train_callback)
