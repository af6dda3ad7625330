"""Atomic file writes: a file is either the old one or the complete new one, never half-written.

Each writer creates a uniquely named file beside the target with the usual permissions (``0o666`` less the umask;
``tempfile.mkstemp`` would make it owner-only), fills it, and moves it into place with ``os.replace``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[Any], None], binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: PathLike, payload: Any, indent: int = 2, **dump_kwargs) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (sets become sorted lists, other objects strings);
    ``dump_kwargs`` go to ``json.dump`` (e.g. ``allow_nan=False``)."""

    def default(value):
        return sorted(value) if isinstance(value, (set, frozenset)) else str(value)

    return atomic_write(
        path, lambda f: json.dump(payload, f, indent=indent, ensure_ascii=False, default=default, **dump_kwargs)
    )


def atomic_savefig(fig, path: PathLike, **kwargs) -> Path:
    """Save a matplotlib figure as PNG to ``path`` atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", **kwargs), binary=True)


def adapter_folder_is_whole(folder: PathLike) -> bool:
    """True when ``folder`` holds what ``save_pretrained`` writes last-and-must-be-whole: ``adapter_config.json`` and a
    whole ``adapter_model.safetensors`` (resume checks of the recipe trainers)."""
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and safetensors_is_whole(folder / "adapter_model.safetensors")


def safetensors_is_whole(path: PathLike) -> bool:
    """True when ``path`` is a safetensors file whose header parses and whose tensors all fit inside the file.

    Reads only the header: a file cut short by a kill or a partial copy fails, without loading any tensor."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > os.path.getsize(path) - 8:
                return False
            header = json.loads(f.read(size))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return 8 + size + max(ends, default=0) <= os.path.getsize(path)
