"""Pushing adapters to the Hugging Face Hub with a complete model card and the base model's Hub id.

An adapter trained on a local folder records that folder as ``base_model_name_or_path`` (so it loads locally). The
upload instead names the base model's Hub id: the offline models know theirs (``peft_ext.data.models.hub_identity``),
a card written by peft-ext records it, and ``base_model=`` (``peft-ext push --base-model``) sets it; a local base with
no known id is refused. ``stage_upload`` writes the exact files that go up — the config with the Hub id, the card
rendered again with the repository id (``peft_ext.card.render_for_push``), weights and tokenizer files unchanged —
``push_folder`` uploads them with ``huggingface_hub``, ``dry_run`` keeps them in a folder without any network.
``transformers``' own ``push_to_hub`` on a PeftModel would replace the card; ``push_to_hub`` here does not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi

from ._io import atomic_write_text

DRY_RUN_MARKER = ".peft-ext-push"  # marks a folder written by dry_run, which a later dry run may replace


class PushError(ValueError):
    """A push that cannot go ahead: bad repository id, base model without a Hub id, unusable output folder."""


def push_to_hub(
    model,
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload peft-ext adapter",
    revision: Optional[str] = None,
    api=None,
    **save_kwargs,
):
    """Upload the adapter of ``model`` (a ``PeftModel``) with its model card to the Hub repository ``repo_id``.

    Works for every method of peft-ext (each card cites its paper: see ``peft_ext.list_methods()``) and for plain PEFT
    adapters. ``base_model`` is the base model's Hub id when it cannot be known from the model (see ``push_folder``).
    ``save_kwargs`` go to ``save_pretrained`` (e.g. ``selected_adapters``). Returns the commit info.
    """
    _check_repo_id(repo_id)
    if not hasattr(model, "save_pretrained") or not hasattr(model, "peft_config"):
        raise TypeError(f"push_to_hub: model must be a PeftModel; got {type(model).__name__}.")
    with tempfile.TemporaryDirectory(prefix="peft-ext-push-") as folder:
        model.save_pretrained(folder, **save_kwargs)
        return push_folder(folder, repo_id, base_model=base_model, token=token, private=private,
                           commit_message=commit_message, revision=revision, api=api)


def push_folder(
    folder,
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload peft-ext adapter",
    revision: Optional[str] = None,
    api=None,
):
    """Upload an adapter folder written by ``save_pretrained`` to ``repo_id``: the files of ``stage_upload``.

    Used by ``push_to_hub`` and the ``peft-ext push`` command; works for every peft-ext method (see
    ``peft_ext.list_methods()`` for the papers) and for plain PEFT adapters.
    """
    _check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="peft-ext-push-") as staging:
        stage_upload(folder, repo_id, staging, base_model=base_model)
        api = api or HfApi(token=token)
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message,
                                 revision=revision, repo_type="model")


def dry_run(folder, repo_id: str, out, *, base_model: Optional[str] = None) -> list[str]:
    """Write the exact files ``push_folder`` would upload into ``out`` (no network); returns their relative paths.

    ``out`` must not exist, be empty, or hold an earlier dry run (which is replaced); it is filled in a temporary
    folder beside it and renamed into place, so it is never half-written.
    """
    _check_repo_id(repo_id)
    out = Path(out).absolute()
    source = Path(folder).absolute()
    if out == source or source in out.parents:
        raise PushError(f"push --out {out} must lie outside the adapter folder {source}.")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / DRY_RUN_MARKER).is_file())):
        raise PushError(f"push --out {out} exists and is not an earlier dry run; pass a new or empty folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        files = stage_upload(folder, repo_id, staging, base_model=base_model)
        (staging / DRY_RUN_MARKER).write_text(f"dry run of peft-ext push to {repo_id}\n", encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files


def resolve_base_model(folder, base_model: Optional[str] = None) -> str:
    """The Hub id the pushed adapter names as its base model: ``base_model`` when given; else the Hub identity of the
    config's ``base_model_name_or_path`` (a Hub id, or an offline model's folder); else the ``base_model`` of the
    card peft-ext wrote when it was trained. Raises ``PushError`` (one line asking for ``--base-model``) otherwise."""
    from .data.models import hub_identity, is_hub_id

    if base_model is not None:
        if not is_hub_id(base_model):
            raise PushError(f"push --base-model must be a Hub model id like 'owner/name'; got {base_model!r}.")
        return base_model
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    name = config.get("base_model_name_or_path")
    identity = hub_identity(name)
    if identity is not None:
        return identity.repo_id
    card = folder / "README.md"
    if card.is_file():
        from .card import read_facts

        facts = read_facts(card.read_text(encoding="utf-8")) or {}
        recorded = (facts.get("base_model") or {}).get("id")
        if recorded and is_hub_id(recorded):
            return recorded
    raise PushError(f"push: the base model of {folder} ({name or 'no name recorded'}) has no known Hugging Face Hub "
                    "id; pass --base-model ID (e.g. --base-model HuggingFaceTB/SmolLM2-135M-Instruct).")


def stage_upload(folder, repo_id: str, dest, *, base_model: Optional[str] = None) -> list[str]:
    """Write into ``dest`` the files an upload of the adapter folder ``folder`` consists of; returns their relative
    paths (sorted). Every file of the folder except hidden ones, with: each ``adapter_config.json``'s
    ``base_model_name_or_path`` set to the base model's Hub id (``resolve_base_model``), the card rendered for
    ``repo_id``, and top-level local paths dropped from the other JSON files (e.g. a tokenizer's ``name_or_path``)."""
    from .card import render_for_push

    _check_repo_id(repo_id)
    folder, dest = Path(folder), Path(dest)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"push: {folder} has no adapter_config.json; pass a folder written by save_pretrained.")
    base_id = resolve_base_model(folder, base_model)
    written = []
    for src in sorted(folder.rglob("*")):
        rel = src.relative_to(folder)
        if not src.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.name == "adapter_config.json":
            config = json.loads(src.read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base_id
            atomic_write_text(target, json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif rel.as_posix() == "README.md":
            atomic_write_text(target, render_for_push(src.read_text(encoding="utf-8"), repo_id, base_id))
        elif src.suffix == ".json":
            atomic_write_text(target, _without_local_paths(src.read_text(encoding="utf-8")))
        else:
            shutil.copy2(src, target)
        written.append(rel.as_posix())
    if "README.md" not in written:
        from .card import render_for_push as _render

        atomic_write_text(dest / "README.md", _render(f"---\nlibrary_name: peft\n---\n\n# {repo_id}\n\nA PEFT adapter "
                                                      f"for {base_id}.\n", repo_id, base_id))
        written.append("README.md")
    return sorted(written)


def _without_local_paths(text: str) -> str:
    """A JSON document without the top-level keys whose value is an absolute local path; other text unchanged."""
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if not isinstance(data, dict):
        return text
    local = [k for k, v in data.items() if isinstance(v, str) and (os.path.isabs(v) or v.startswith("~"))]
    if not local:
        return text
    return json.dumps({k: v for k, v in data.items() if k not in local}, indent=2, ensure_ascii=False) + "\n"


def _check_repo_id(repo_id) -> None:
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise PushError(f"push: repo_id must look like 'user/name' or 'name'; got {repo_id!r}.")
