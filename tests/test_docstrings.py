"""Project rule: each method names its paper and official code once, in its config class docstring (its docs page
``docs/methods/<name>.md`` is checked by tests/test_docs.py); every other public class and function has a docstring
saying what it does, without repeating the links."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import peft_ext

PACKAGES = ("peft_ext.tuners", "peft_ext.optim", "peft_ext.callbacks", "peft_ext.presets", "peft_ext.init")


def _modules(package_name: str):
    package = importlib.import_module(package_name)
    yield package
    for info in pkgutil.walk_packages(package.__path__, package_name + "."):
        yield importlib.import_module(info.name)


@pytest.mark.parametrize("spec", peft_ext.list_methods(), ids=lambda spec: spec.name)
def test_config_docstring_links_paper_and_code(spec):
    doc = " ".join((inspect.getdoc(spec.config_cls) or "").split())  # line breaks count as spaces
    name = spec.config_cls.__name__
    assert spec.paper_url and spec.paper_url in doc, f"{name}'s docstring must name the paper {spec.paper_url}"
    if spec.code_url:
        assert spec.code_url in doc, f"{name}'s docstring must name the official code {spec.code_url}"
    else:
        assert "no public code" in doc.lower(), f"{name}'s docstring must say there is no public code"


@pytest.mark.parametrize("package_name", PACKAGES)
def test_public_objects_have_docstrings(package_name):
    offenders = []
    for module in _modules(package_name):
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip():
                offenders.append(f"{module.__name__}.{name}")
    assert not offenders, "public classes/functions without a docstring:\n  " + "\n  ".join(offenders)


def test_method_links_are_not_repeated_outside_the_config():
    # A link belongs in the config docstring (and the docs page); repeated in every docstring it drifts. Class and
    # function docstrings elsewhere in the method packages must not repeat a registered method's paper or code URL.
    urls = {url for spec in peft_ext.list_methods() for url in (spec.paper_url, spec.code_url) if url}
    configs = {spec.config_cls for spec in peft_ext.list_methods()}
    offenders = []
    for package_name in PACKAGES:
        for module in _modules(package_name):
            for name, obj in vars(module).items():
                if getattr(obj, "__module__", None) != module.__name__ or obj in configs:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    docs = [obj.__doc__ or ""]
                    if inspect.isclass(obj):
                        docs += [m.__doc__ or "" for m in vars(obj).values() if inspect.isfunction(m)]
                    if any(url in doc for url in urls for doc in docs):
                        offenders.append(f"{module.__name__}.{name}")
    assert not offenders, "docstrings that repeat a method's paper/code URL (keep it in the config docstring):\n  " + (
        "\n  ".join(sorted(set(offenders))))
