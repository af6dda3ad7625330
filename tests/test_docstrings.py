"""Project rule: every public class and function of the method packages has a docstring naming the paper and its
official code (checked here as: the docstring contains a link)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

PACKAGES = ("peft_ext.tuners", "peft_ext.optim", "peft_ext.callbacks", "peft_ext.presets", "peft_ext.init")


def _modules(package_name: str):
    package = importlib.import_module(package_name)
    yield package
    for info in pkgutil.walk_packages(package.__path__, package_name + "."):
        yield importlib.import_module(info.name)


@pytest.mark.parametrize("package_name", PACKAGES)
def test_public_docstrings_link_paper_and_code(package_name):
    offenders = []
    for module in _modules(package_name):
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                if "http" not in (inspect.getdoc(obj) or ""):
                    offenders.append(f"{module.__name__}.{name}")
    assert not offenders, (
        "public classes/functions whose docstring names no paper / official code link (add the arXiv URL and the "
        "official code URL, or 'no public code'):\n  " + "\n  ".join(offenders)
    )
