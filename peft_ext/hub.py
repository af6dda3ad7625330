"""Pushing peft-ext adapters to the Hugging Face Hub with their model card intact.

``transformers``' ``push_to_hub`` on a PeftModel replaces PEFT's model card (tags, base model and, for peft-ext
adapters, the method section citing the paper). ``push_to_hub`` here saves the adapter with ``save_pretrained`` into
a temporary folder and uploads that folder as it is.
"""

from __future__ import annotations

import tempfile
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
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"push_to_hub: repo_id must look like 'user/name' or 'name'; got {repo_id!r}.")
    if not hasattr(model, "save_pretrained") or not hasattr(model, "peft_config"):
        raise TypeError(f"push_to_hub: model must be a PeftModel; got {type(model).__name__}.")
    api = api or HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="peft-ext-push-") as folder:
        model.save_pretrained(folder, **save_kwargs)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, repo_type="model"
        )
