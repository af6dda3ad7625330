"""The import structure of ``peft_ext``: no module-level import cycle, and every module imports on its own.

A cycle makes the result depend on which module a user imports first (a name is missing from a partly executed
module), so the graph is checked statically over every module, and each module is then imported in isolation.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peft_ext"


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (``peft_ext.tuners.dylora`` for its ``__init__.py``)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _module_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: not those inside functions (lazy imports) and not
    those under ``if TYPE_CHECKING:``; class bodies and module-level ``if`` / ``try`` blocks do run."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``peft_ext`` modules its module-level imports execute.

    ``from X import name`` depends on ``X.name`` when that is a module, else on ``X`` itself (it needs the name from
    X's executed body). ``import X.Y`` depends on ``X.Y``. Parent packages that Python initialises on the way are not
    edges: a package's ``__init__`` already runs (or is running) before any of its submodules.
    """
    names = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in _module_level_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in names)
                continue
            if node.level:
                base_parts = here[: len(here) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "peft_ext":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                edges.add(target if target in names else base)
        edges.discard(name)
        graph[name] = {edge for edge in edges if edge in names}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None; iterative DFS with white/grey/black marks."""
    state = dict.fromkeys(graph, 0)  # 0 unvisited, 1 on the current path, 2 done
    for start in sorted(graph):
        if state[start]:
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_reports_a_cycle():
    # The checker itself: a three-module loop is found and printed in order; a DAG with a shared child is not a cycle.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_resolves_relative_imports():
    graph = import_graph()
    # tuners/dylora/__init__.py does `from .config import DyLoraConfig` and `from ...spec import MethodSpec`.
    assert {"peft_ext.tuners.dylora.config", "peft_ext.spec"} <= graph["peft_ext.tuners.dylora"]
    # The package root imports the registry at module level.
    assert "peft_ext.registry" in graph["peft_ext"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle inside peft_ext: " + " -> ".join(cycle)


# Each child imports one module into an interpreter that has the third-party stack loaded but no peft_ext module, so a
# module that only works when something else was imported first fails here. Forking from one preloaded parent keeps
# this to seconds instead of one ~15 s torch/transformers start per module; PEFT_EXT_NO_AUTOLOAD keeps `import peft`
# from importing peft_ext in the parent.
_ISOLATED = textwrap.dedent(
    """
    import importlib, os, sys, traceback
    # The third-party stack, loaded once (transformers' lazy submodules included), so each child only runs peft_ext.
    import torch, transformers, peft, datasets, safetensors, yaml, matplotlib.pyplot
    from transformers import Trainer, TrainerCallback, AutoModelForCausalLM, AutoTokenizer
    try:
        import trl, trl.trainer
    except ImportError:
        pass
    assert not [m for m in sys.modules if m.split(".")[0] == "peft_ext"], "peft_ext was imported before the fork"
    def child(name, write):
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc().encode()[-4000:])
            os._exit(1)

    failures, running, queue = [], {}, list(sys.argv[1:])
    parallel = max(1, min(4, os.cpu_count() or 1))
    while queue or running:
        while queue and len(running) < parallel:
            name = queue.pop(0)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                child(name, write)
            os.close(write)
            running[pid] = (name, read)
        pid, status = os.wait()
        name, read = running.pop(pid)
        with os.fdopen(read, "rb") as pipe:  # a traceback is at most 4000 bytes: it fits the pipe buffer
            message = pipe.read().decode()
        if status:
            failures.append(f"{name}:\\n{message or 'exit status %d' % status}")
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
    """
)


def test_each_module_imports_in_isolation():
    env = dict(os.environ, PEFT_EXT_NO_AUTOLOAD="1", HF_HUB_OFFLINE="1")
    names = sorted(module_names())
    result = subprocess.run(
        [sys.executable, "-c", _ISOLATED, *names], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"modules that fail to import on their own:\n{result.stdout}\n{result.stderr[-4000:]}")
