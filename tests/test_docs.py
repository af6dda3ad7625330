"""The docs are checked against the code: generated tables up to date, a page per registered method, config calls in
the pages naming only fields that exist, local links resolving, and the README kept a front page."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

import peft_ext

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_regions_are_up_to_date():
    """README's methods table, each method page's field table and the recipe keys equal what the code generates."""
    stale = [str(path.relative_to(ROOT)) for path, text in _gen_docs().expected_files().items()
             if path.read_text(encoding="utf-8") != text]
    assert not stale, f"run `python scripts/gen_docs.py`; stale: {stale}"


def test_every_registered_method_has_a_page_and_only_those():
    pages = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")}
    names = {spec.name for spec in peft_ext.list_methods()}
    assert names <= pages, f"missing pages: {sorted(names - pages)}"
    assert pages <= names, f"pages of no registered method: {sorted(pages - names)}"


def test_each_method_page_names_its_paper_and_code():
    for spec in peft_ext.list_methods():
        text = (ROOT / "docs" / "methods" / f"{spec.name}.md").read_text(encoding="utf-8")
        assert spec.paper_url in text, spec.name
        assert (spec.code_url in text) if spec.code_url else ("No public code" in text), spec.name


def _config_classes() -> dict:
    import peft

    classes = {spec.config_cls.__name__: spec.config_cls for spec in peft_ext.list_methods()}
    classes.update({name: getattr(peft, name) for name in dir(peft) if name.endswith("Config") and
                    dataclasses.is_dataclass(getattr(peft, name))})
    return classes


def _named_arguments(args_text: str) -> list[str]:
    """Keyword names (``r=8``) and bare names (``r, lora_alpha`` in prose) of one call's argument text."""
    names, depth, current = [], 0, ""
    for ch in args_text + ",":
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            m = re.match(r"\s*([A-Za-z_]\w*)\s*(=|$)", current)
            if m:
                names.append(m.group(1))
            current = ""
        else:
            current += ch
    return names


def _calls(text: str, name: str):
    """Argument texts of every ``name(...)`` in ``text`` (balanced parentheses, across lines)."""
    for m in re.finditer(rf"\b{name}\(", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield text[m.end(): i - 1]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_calls_in_docs_name_existing_fields(path):
    text = path.read_text(encoding="utf-8")
    bad = []
    for name, cls in _config_classes().items():
        fields = {f.name for f in dataclasses.fields(cls)}
        for args in _calls(text, name):
            bad += [f"{name}({arg}=...)" for arg in _named_arguments(args) if arg not in fields]
    assert not bad, f"{path.name} names config fields that do not exist: {bad}"


def test_the_field_check_catches_a_wrong_field():
    assert _named_arguments("r=8, lora_alpah=16, target_modules=['q', 'v']") == ["r", "lora_alpah", "target_modules"]
    assert _named_arguments("r, lora_alpha, ...") == ["r", "lora_alpha"]
    assert list(_calls("DyLoraConfig(r=8, x=f(1, 2))", "DyLoraConfig")) == ["r=8, x=f(1, 2)"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{path.name} links to missing files: {missing}"


def test_readme_is_a_front_page():
    """A front page (PEFT's is ~190 lines, TRL's ~230): the methods table, each recipe with its measured result and
    the reproduction tables the issues ask for; everything else (full tables, options, budgets) lives in docs/."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300


def test_python_snippets_in_docs_parse():
    """Every ```python block of the docs is valid Python (a renamed argument or a typo breaks a reader's copy)."""
    bad = []
    for path in DOCS:
        for block in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
            try:
                ast.parse(block)
            except SyntaxError as exc:
                bad.append(f"{path.name}: {exc}")
    assert not bad, bad


def test_nothing_points_outside_the_repository():
    offenders = []
    sources = list(ROOT.glob("peft_ext/**/*.py")) + list(ROOT.glob("tests/*.py")) + list(ROOT.glob("scripts/*.py"))
    for path in sources + DOCS:
        if path.name == "test_docs.py":
            continue
        if "../shared" in path.read_text(encoding="utf-8"):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
