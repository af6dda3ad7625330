"""PEFT's own test modules, fetched at test time from the source distribution of the installed PEFT version.

The tests are never copied into this repository: ``pip download peft==<version> --no-binary :all:`` fetches the sdist
from PyPI once, its ``tests/`` folder is extracted into a cache (``$PEFT_EXT_CACHE``, else
``$XDG_CACHE_HOME/peft-ext`` or ``~/.cache/peft-ext``) and reused by later runs. Extraction goes to a temporary folder
beside the target and is renamed into place, so an interrupted run never leaves a half-extracted cache behind.
``$PEFT_EXT_PEFT_TESTS`` may name an already extracted ``tests/`` folder instead (no download then).

``load_peft_test_module("test_custom_models")`` imports one of those modules as part of a package named
``peft_upstream_tests``, so its relative imports (``from .testing_common import ...``) resolve.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft

PACKAGE = "peft_upstream_tests"
# what a usable extraction contains: the generic suite and its two helper modules
REQUIRED = ("test_custom_models.py", "testing_common.py", "testing_utils.py")


def cache_root() -> Path:
    """Where fetched PEFT tests live: $PEFT_EXT_CACHE, else $XDG_CACHE_HOME/peft-ext, else ~/.cache/peft-ext."""
    if os.environ.get("PEFT_EXT_CACHE"):
        return Path(os.environ["PEFT_EXT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peft-ext"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def _extract_tests(sdist: Path, version: str, into: Path) -> None:
    """Extract the sdist's ``peft-<version>/tests/*.py`` files (nothing else, no paths outside) into ``into``."""
    prefix = f"peft-{version}/tests/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(prefix) and name.endswith(".py")):
                continue
            rel = name[len(prefix):]
            if "/" in rel or rel.startswith("."):
                continue  # only the top-level test modules
            source = tar.extractfile(member)
            (into / rel).write_bytes(source.read())


def peft_tests_dir(version: str | None = None) -> Path:
    """The folder holding PEFT ``version``'s test modules (default: the installed PEFT), fetched on first use."""
    if os.environ.get("PEFT_EXT_PEFT_TESTS"):
        folder = Path(os.environ["PEFT_EXT_PEFT_TESTS"])
        if not _complete(folder):
            raise RuntimeError(f"PEFT_EXT_PEFT_TESTS={folder} lacks one of {list(REQUIRED)}.")
        return folder
    version = version or peft.__version__
    target = cache_root() / f"peft-{version}-tests"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".peft-{version}-") as tmp:
        download = Path(tmp) / "download"
        cmd = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-binary", ":all:", "--no-deps", "-q",
               "-d", str(download)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(download.glob(f"peft-{version}.tar.gz")) if download.is_dir() else []
        if result.returncode != 0 or not sdists:
            raise RuntimeError(
                f"Could not fetch PEFT {version}'s source distribution from PyPI to run its generic tests "
                f"({' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()[-500:]}). Fetch it once with "
                f"network access, or set PEFT_EXT_PEFT_TESTS to an extracted peft-{version}/tests folder."
            )
        staged = Path(tmp) / "tests"
        staged.mkdir()
        _extract_tests(sdists[0], version, staged)
        if not _complete(staged):
            raise RuntimeError(f"PEFT {version}'s sdist has no tests/{{{','.join(REQUIRED)}}}.")
        try:
            os.replace(staged, target)  # atomic: the cache is either absent or complete
        except OSError:
            if not _complete(target):  # another process may have won the race with a complete copy
                raise
    return target


def load_peft_test_module(name: str):
    """Import PEFT's test module ``name`` (e.g. "test_custom_models") from the fetched tests folder."""
    folder = peft_tests_dir()
    package = sys.modules.get(PACKAGE)
    if package is None:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        package.__file__ = None
        sys.modules[PACKAGE] = package
    # testing_common imports diffusers' StableDiffusionPipeline at module level for PEFT's diffusion tests, which are
    # not run here; without diffusers installed, a placeholder module stands in for the import only.
    stub = None
    if importlib.util.find_spec("diffusers") is None:
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = None
        sys.modules["diffusers"] = stub
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    finally:
        if stub is not None and sys.modules.get("diffusers") is stub:
            del sys.modules["diffusers"]


def clear_cache(version: str | None = None) -> None:
    """Remove the cached tests of ``version`` (default: installed PEFT)."""
    shutil.rmtree(cache_root() / f"peft-{version or peft.__version__}-tests", ignore_errors=True)
