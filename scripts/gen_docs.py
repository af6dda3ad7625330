"""Regenerate the parts of the docs that come from code, so they cannot drift from it.

    python scripts/gen_docs.py          # rewrite the generated regions in README.md and docs/methods/*.md
    python scripts/gen_docs.py --check  # exit 1 and name the stale files instead (tests/test_docs.py runs this)

Generated regions sit between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers:

* README.md ``methods``: one row per registered method (``peft_ext.list_methods()``): name, config class, paper,
  official code, capabilities, the one-line summary, and the link to its page.
* docs/recipes.md ``recipe-keys``: every key of a ``peft-ext train`` recipe, from the dataclasses of
  ``peft_ext/recipe.py``.
* docs/methods/<name>.md ``fields``: the config fields of the method (its own and those peft-ext adds to every tuner),
  with their defaults and the ``help`` text of the dataclass field.

Everything else in the pages is written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peft import PeftConfig  # noqa: E402

import peft_ext  # noqa: E402
from peft_ext._io import atomic_write_text  # noqa: E402

METHODS_DIR = ROOT / "docs" / "methods"


def _code_link(url: str) -> str:
    if not url:
        return "none public"
    name = re.sub(r"^https?://(www\.)?github\.com/", "", url).rstrip("/")
    return f"[{name}]({url})"


def _capabilities(spec) -> str:
    caps = []
    caps.append("merge" if spec.mergeable else "no merge")
    caps.append("4/8-bit" if spec.quantizable else "no 4/8-bit")
    if spec.routed:
        caps.append("routed")
    return ", ".join(caps)


SUITE_COUNTS = ROOT / "docs" / "peft_generic_suite.json"


def suite_counts() -> dict:
    """Pass / skip counts of PEFT's generic suite per method, as tests/conftest.py checks them on every full run."""
    return json.loads(SUITE_COUNTS.read_text(encoding="utf-8")) if SUITE_COUNTS.is_file() else {}


def methods_table() -> str:
    """The README's methods table, one row per registered method."""
    counts = suite_counts()
    lines = [
        "| method | config | paper | official code | capabilities | PEFT suite pass / skip | what it is |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in peft_ext.list_methods():
        summary = spec.summary.replace("|", "\\|")
        suite = "{} / {}".format(*counts[spec.name]) if spec.name in counts else "not run"
        lines.append(
            f"| [`{spec.name}`](docs/methods/{spec.name}.md) | `{spec.config_cls.__name__}` | "
            f"[{spec.paper_title}]({spec.paper_url}) | {_code_link(spec.code_url)} | {_capabilities(spec)} | {suite} | "
            f"{summary} |"
        )
    return "\n".join(lines)


def config_fields(config_cls) -> list[dataclasses.Field]:
    """The fields a method's config adds to PEFT's ``PeftConfig`` (its own and peft-ext's shared ones), in order."""
    base = {f.name for f in dataclasses.fields(PeftConfig)}
    return [f for f in dataclasses.fields(config_cls) if f.name not in base and f.init]


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    return f"`{value!r}`".replace("|", "\\|")


def _help(f: dataclasses.Field) -> str:
    """A field's help text on one line, safe inside a table cell."""
    return " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")


def fields_table(config_cls) -> str:
    """Markdown table of a config's fields: name, default, help text."""
    lines = ["| field | default | what it does |", "|---|---|---|"]
    for f in config_fields(config_cls):
        lines.append(f"| `{f.name}` | {_default(f)} | {_help(f)} |")
    return "\n".join(lines)


def recipe_keys_table() -> str:
    """Markdown table of every recipe key (``section.key``), its default and help, from ``peft_ext.recipe``."""
    from peft_ext.recipe import Recipe

    lines = ["| key | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(Recipe):
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if nested is not None and dataclasses.is_dataclass(nested):
            for sub in dataclasses.fields(nested):
                lines.append(f"| `{f.name}.{sub.name}` | {_default(sub)} | {_help(sub)} |")
        else:
            lines.append(f"| `{f.name}` | {_default(f)} | {_help(f)} |")
    return "\n".join(lines)


URL = re.compile(r"https?://[^\s),]+")


def _paper_link(paper: str) -> str:
    """A recipe's ``paper`` text with its one URL as a markdown link on the title; several URLs in angle brackets."""
    urls = URL.findall(paper)
    if len(urls) != 1:
        return URL.sub(lambda m: f"<{m.group(0)}>", paper).replace("|", "\\|")
    title = paper.replace(urls[0], "").replace(", )", ")").replace(" ()", "").strip()
    return f"[{title}]({urls[0]})".replace("|", "\\|")


def recipes_index_table() -> str:
    """Markdown table of the full-size recipes in ``recipes/`` (the ``peft-ext recipes`` listing): file, trainer,
    paper, tiny variant, command. Tiny variants are named in their full recipe's row."""
    from peft_ext.cli import recipe_index

    lines = ["| recipe | trainer | paper | tiny variant (tests) |", "|---|---|---|---|"]
    for row in recipe_index(ROOT / "recipes"):
        if row["file"].startswith("tiny"):
            continue
        tiny = f"`{row['tiny']}`" if row["tiny"] else ""
        link = f"[`{row['file']}`](../recipes/{row['file']}) (`peft-ext {row['command']}`)"
        lines.append(f"| {link} | `{row['trainer']}` | {_paper_link(row['paper'])} | {tiny} |")
    return "\n".join(lines)


def replace_region(text: str, name: str, body: str, path: Path) -> str:
    """``text`` with the region between ``<!-- name:start -->`` and ``<!-- name:end -->`` set to ``body``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} region.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def expected_files() -> dict[Path, str]:
    """Every generated file with its expected full text (existing hand-written parts kept)."""
    out = {}
    readme = ROOT / "README.md"
    out[readme] = replace_region(readme.read_text(encoding="utf-8"), "methods", methods_table(), readme)
    recipes = ROOT / "docs" / "recipes.md"
    text = replace_region(recipes.read_text(encoding="utf-8"), "recipe-keys", recipe_keys_table(), recipes)
    out[recipes] = replace_region(text, "recipes-index", recipes_index_table(), recipes)
    for spec in peft_ext.list_methods():
        page = METHODS_DIR / f"{spec.name}.md"
        if not page.is_file():
            raise FileNotFoundError(f"{page} is missing: every registered method needs a page (copy another one).")
        out[page] = replace_region(page.read_text(encoding="utf-8"), "fields", fields_table(spec.config_cls), page)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1), write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        if path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not args.check:
                atomic_write_text(path, text)
    for path in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {path.relative_to(ROOT)}")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
