"""Every recipe in recipes/: it validates, names its paper, a full-size recipe names a seconds-long tiny variant of the
same trainer, and every tiny variant runs end to end (here, unless a dedicated test already runs it through the
command). ``peft-ext recipes`` lists them all. Parametrised over the folder, so a new recipe is tested when added."""

import json
import math
from pathlib import Path

import pytest
import yaml

from peft_ext import cli
from peft_ext.federated.recipe import load_federated_recipe
from peft_ext.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = [p for p in RECIPES if p.name.startswith("tiny")]
FULL = [p for p in RECIPES if not p.name.startswith("tiny")]

# Tiny recipes a dedicated test already runs end to end, with checks specific to the recipe: file -> that test file.
RUN_ELSEWHERE = {
    "tiny.yaml": "test_cli.py",
    "tiny_gsm.yaml": "test_cli.py",
    "tiny_mrdpo.yaml": "test_cli.py",
    "tiny_sft_grpo.yaml": "test_trainers_grpo.py",
    "tiny_flasc.yaml": "test_cli_federate.py",
    "tiny_codyra_continual.yaml": "test_continual.py",
    "tiny_planner.yaml": "test_planner.py",
    "tiny_mtp.yaml": "test_trainers_mtp.py",
    "tiny_lorid.yaml": "test_lorid.py",
    "tiny_o3_unlearning.yaml": "test_unlearning.py",
}


def _is_federated(path: Path) -> bool:
    return "flasc" in yaml.safe_load(path.read_text(encoding="utf-8"))


def _load(path: Path, overrides=()):
    if _is_federated(path):
        return load_federated_recipe(path)
    return load_recipe(path, list(overrides))


def _trainer(recipe) -> str:
    return "flasc" if not hasattr(recipe, "trainer") else str(recipe.trainer.name)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_names_its_paper(path):
    recipe = _load(path)
    assert "arxiv.org/abs/" in recipe.paper, f"{path.name}: paper must name the paper with its arXiv link"


@pytest.mark.parametrize("path", FULL, ids=lambda p: p.name)
def test_full_recipe_has_a_tiny_variant_of_the_same_trainer(path):
    recipe = _load(path)
    assert recipe.tiny, f"{path.name}: a full-size recipe names its tiny variant (tiny: tiny_<name>.yaml)"
    tiny_path = path.parent / recipe.tiny
    assert tiny_path.is_file() and tiny_path.name.startswith("tiny"), f"{path.name}: tiny {recipe.tiny!r} missing"
    tiny = _load(tiny_path)
    assert _trainer(tiny) == _trainer(recipe)
    if _trainer(recipe) != "None":  # a trainer recipe's variant is the same paper; a plain one may try another method
        assert tiny.paper == recipe.paper


def test_every_tiny_recipe_is_some_full_recipes_variant_or_stands_alone():
    named = {_load(p).tiny for p in FULL}
    # tiny.yaml is quickstart's variant; the others must each belong to one full-size recipe.
    assert {p.name for p in TINY} <= named, sorted({p.name for p in TINY} - named)


@pytest.mark.parametrize("name", sorted(RUN_ELSEWHERE))
def test_tiny_recipes_run_elsewhere_really_are(name):
    text = (ROOT / "tests" / RUN_ELSEWHERE[name]).read_text(encoding="utf-8")
    assert name in text, f"{RUN_ELSEWHERE[name]} no longer runs {name}; remove it from RUN_ELSEWHERE"


@pytest.mark.parametrize("path", [p for p in TINY if p.name not in RUN_ELSEWHERE], ids=lambda p: p.name)
def test_tiny_recipe_runs_end_to_end(path, tmp_path):
    out = tmp_path / "run"
    command = "federate" if _is_federated(path) else "train"
    args = [command, str(path), "--quiet"] if command == "federate" else [
        "train", str(path), "--quiet", "--set", f"output_dir={out}"]
    if command == "federate":  # federate has no --set: write a copy pointing at tmp_path
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["output_dir"] = str(out)
        copy = tmp_path / path.name
        copy.write_text(yaml.safe_dump(data), encoding="utf-8")
        args[1] = str(copy)
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    numbers = [v for v in _leaves(metrics) if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers), "metrics.json holds finite results"


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def test_recipes_command_lists_every_recipe_with_its_paper(capsys):
    assert cli.main(["recipes", "--dir", str(ROOT / "recipes")]) == 0
    out = capsys.readouterr().out
    for path in RECIPES:
        assert path.name in out
        assert _load(path).paper in out
    assert cli.main(["recipes", "--dir", str(ROOT / "recipes"), "--paper", "octo-planner"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line and not line.startswith(" ")]
    assert sorted(listed) == ["planner_bfcl.yaml", "tiny_planner.yaml"]


def test_recipes_command_errors(tmp_path, capsys):
    assert cli.main(["recipes", "--dir", str(tmp_path / "nope")]) == 2
    assert "--dir" in capsys.readouterr().err
    assert cli.main(["recipes", "--dir", str(ROOT / "recipes"), "--paper", "no such paper"]) == 2
    assert "no such paper" in capsys.readouterr().err


@pytest.mark.parametrize("path", FULL, ids=lambda p: p.name)
def test_readme_recipes_table_links_every_full_recipe(path):
    """The README's recipes table links each paper's recipe, so a user finds it from the front page."""
    assert f"(recipes/{path.name})" in (ROOT / "README.md").read_text(encoding="utf-8"), (
        f"README.md has no link to recipes/{path.name}: add a row to its recipes table.")
