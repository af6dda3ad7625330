"""Pushing peft-ext adapters to the Hugging Face Hub with their model card intact.

``transformers``' ``push_to_hub`` on a PeftModel replaces PEFT's model card (tags, base model and, for peft-ext
adapters, the method section citing the paper). ``push_to_hub`` here saves the adapter with ``save_pretrained`` into
a temporary folder and uploads that folder as it is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi


def push_to_hub(
    model,
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload peft-ext adapter",
    revision: Optional[str] = None,
    api: Optional[HfApi] = None,
    **save_kwargs,
):
    """Upload the adapter of ``model`` (a ``PeftModel``) with its model card to the Hub repository ``repo_id``.

    Works for every method of peft-ext (each card cites its paper: see ``peft_ext.list_methods()``) and for plain PEFT
    adapters. ``save_kwargs`` go to ``save_pretrained`` (e.g. ``selected_adapters``). Returns the commit info.
    """
    _check_repo_id(repo_id)
    if not hasattr(model, "save_pretrained") or not hasattr(model, "peft_config"):
        raise TypeError(f"push_to_hub: model must be a PeftModel; got {type(model).__name__}.")
    with tempfile.TemporaryDirectory(prefix="peft-ext-push-") as folder:
        model.save_pretrained(folder, **save_kwargs)
        return push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message,
                           revision=revision, api=api)


def push_folder(
    folder,
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload peft-ext adapter",
    revision: Optional[str] = None,
    api: Optional[HfApi] = None,
):
    """Upload an adapter folder written by ``save_pretrained`` (adapter, config, model card) to ``repo_id`` as is.

    Used by ``push_to_hub`` and the ``peft-ext push`` command; works for every peft-ext method (see
    ``peft_ext.list_methods()`` for the papers).
    """
    _check_repo_id(repo_id)
    if not (Path(folder) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"push: {folder} has no adapter_config.json; pass a folder written by save_pretrained.")
    api = api or HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision, repo_type="model"
    )


def _check_repo_id(repo_id) -> None:
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"push: repo_id must look like 'user/name' or 'name'; got {repo_id!r}.")
