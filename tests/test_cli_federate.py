"""``peft-ext federate``: the tiny FLASC recipe runs from the command and writes its metrics; a bad recipe is one line
on stderr with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from peft_ext.cli import main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(tmp_path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "recipes" / "tiny_flasc.yaml").read_text())
    data["output_dir"] = str(tmp_path / "out")
    data["flasc"]["rounds"] = 2
    for key, value in changes.items():
        section, name = key.split(".")
        data[section][name] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_federate_runs_the_tiny_recipe(tmp_path, capsys):
    assert main(["federate", str(_recipe(tmp_path)), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    printed = capsys.readouterr().out
    assert f"bytes up {metrics['total_bytes_up']:,}" in printed
    assert metrics["total_bytes_up"] > 0 and len(metrics["rounds"]) == 2


@pytest.mark.parametrize("key,value,needle", [("flasc.ul_density", 1.5, "ul_density"),
                                              ("flasc.rounds", 0, "rounds")])
def test_federate_bad_recipe_is_one_line(tmp_path, capsys, key, value, needle):
    assert main(["federate", str(_recipe(tmp_path, **{key: value}))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peft-ext federate: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "out").exists()
