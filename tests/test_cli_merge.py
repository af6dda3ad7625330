"""``peft-ext merge``: LoRA-LEGO and PEFT's rules over adapter folders give a plain LoRA folder; user errors are one
line with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_adapter, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from peft_ext import cli
from peft_ext.merging import RULES, lego_merge
from peft_ext.merging.adapters import load_adapter

TARGETS = ["q_proj", "v_proj"]
pytestmark = pytest.mark.usefixtures("one_thread")


def save_lora(folder, base, seed, r, targets=TARGETS, **kwargs):
    model = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **kwargs))
    randomize_adapter(model, seed=seed)
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = root / "base"
    tiny_llama().save_pretrained(base)
    return {"base": base, "root": root,
            "a": save_lora(root / "a", base, 1, 2), "b": save_lora(root / "b", base, 2, 2),
            "c": save_lora(root / "c", base, 3, 4)}


def deltas(folder):
    return load_adapter(folder).delta_weights()


def run_ok(argv, capsys):
    assert cli.main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_the_command_offers_every_rule():
    choices = next(a for a in cli._parser()._subparsers._group_actions[0].choices["merge"]._actions
                   if a.dest == "rule").choices
    assert tuple(choices) == RULES


def test_lego_writes_the_lego_merge(folders, capsys, tmp_path):
    out = tmp_path / "lego"
    printed = run_ok(["merge", folders["a"], folders["b"], folders["c"], "--rule", "lego", "-k", "3",
                      "--weights", "1", "0.5", "2", "--seed", "4", "--out", str(out)], capsys)
    assert "rank-3 LoRA" in printed
    expected, _ = lego_merge([folders["a"], folders["b"], folders["c"]], k=3, weights=[1, 0.5, 2], seed=4)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(tiny_llama(), out))
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folders["base"])


def test_cat_is_the_exact_weighted_sum(folders, capsys, tmp_path):
    out = tmp_path / "cat"
    run_ok(["merge", folders["a"], folders["c"], "--rule", "cat", "--weights", "0.5", "3", "--out", str(out)], capsys)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 6
    a, c, got = deltas(folders["a"]), deltas(folders["c"]), deltas(out)
    for module, delta in got.items():
        # float32 factors with the scalings folded in: rounding at ~1e-7 relative
        assert torch.allclose(delta, 0.5 * a[module] + 3 * c[module], rtol=0, atol=1e-6 * delta.abs().max().item())


def test_linear_is_peft_factor_wise_sum(folders, capsys, tmp_path):
    """PEFT's linear rule sums the factors with √weight each; the inputs' scalings are folded into B first:
    ΔW = (s_a B_a + 2 s_b B_b)(A_a + 2 A_b)."""
    out = tmp_path / "linear"
    run_ok(["merge", folders["a"], folders["b"], "--rule", "linear", "--weights", "1", "4", "--out", str(out)], capsys)
    va, vb, got = load_adapter(folders["a"]), load_adapter(folders["b"]), load_adapter(out)
    for module, (A, B, s, _) in got.modules.items():
        (Aa, Ba, sa, _), (Ab, Bb, sb, _) = va.modules[module], vb.modules[module]
        assert s == 1.0
        # float32 factors: rounding only
        assert torch.allclose(B @ A, (sa * Ba + 2 * sb * Bb) @ (Aa + 2 * Ab), rtol=1e-5, atol=1e-7)


def test_svd_k_is_the_best_rank_k_approximation(folders, capsys, tmp_path):
    out = tmp_path / "svd"
    run_ok(["merge", folders["a"], folders["c"], "--rule", "svd", "-k", "3", "--out", str(out)], capsys)
    a, c, got = deltas(folders["a"]), deltas(folders["c"]), deltas(out)
    for module, delta in got.items():
        want = torch.linalg.svdvals(a[module] + c[module])[:3]
        # the merged ΔW keeps the top 3 singular values of the sum (fp32 SVD: ~1e-6 relative)
        assert torch.allclose(torch.linalg.svdvals(delta)[:3], want, rtol=1e-4)
        assert torch.linalg.matrix_rank(delta) == 3


@pytest.mark.parametrize("rule, extra, rank", [("ties", [], 2), ("dare_ties", ["--density", "0.7"], 2),
                                               ("ties", ["-k", "3"], 3)])
def test_ties_rules_give_a_loadable_lora(folders, capsys, tmp_path, rule, extra, rank):
    out = tmp_path / rule
    run_ok(["merge", folders["a"], folders["b"], "--rule", rule, *extra, "--out", str(out)], capsys)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == rank
    PeftModel.from_pretrained(tiny_llama(), out)
    assert any(d.abs().max() > 0 for d in deltas(out).values())


def test_heads_are_averaged(folders, capsys, tmp_path):
    """modules_to_save copies (here lm_head) are averaged with the normalised weights; PEFT would refuse them."""
    a = save_lora(tmp_path / "ha", folders["base"], 5, 2, modules_to_save=["lm_head"])
    b = save_lora(tmp_path / "hb", folders["base"], 6, 2, modules_to_save=["lm_head"])
    out = tmp_path / "heads"
    run_ok(["merge", a, b, "--rule", "ties", "--weights", "1", "3", "--out", str(out)], capsys)
    head = "base_model.model.lm_head.weight"
    ha, hb, got = (load_adapter(f).extra[head] for f in (a, b, out))
    assert torch.allclose(got, 0.25 * ha + 0.75 * hb, rtol=0, atol=1e-7)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]


@pytest.fixture(scope="module")
def odd_folders(folders):
    root = folders["root"]
    other = root / "other_base"
    other.mkdir()
    (other / "config.json").write_text("{}")
    mola_model = get_peft_model(tiny_llama(), _mola_config())
    mola_model.peft_config["default"].base_model_name_or_path = str(folders["base"])
    mola_model.save_pretrained(root / "mola")
    return {"other": save_lora(root / "other", other, 7, 2),
            "modules": save_lora(root / "modules", folders["base"], 8, 2, targets=["q_proj", "k_proj"]),
            "mola": str(root / "mola")}


def _mola_config():
    from conftest import make_config

    from peft_ext.registry import get_method

    return make_config(get_method("mola"), TARGETS)


@pytest.mark.parametrize("case, argv, names", [
    ("base", ["A", "other", "--rule", "lego", "-k", "2"], "different base models"),
    ("modules", ["A", "modules", "--rule", "cat"], "different target modules"),
    ("k", ["A", "B", "--rule", "lego", "-k", "0"], "k must be an integer >= 1"),
    ("no k", ["A", "B", "--rule", "lego"], "the lego rule needs k"),
    ("cat k", ["A", "B", "--rule", "cat", "-k", "2"], "the cat rule's rank is the sum"),
    ("type", ["A", "mola", "--rule", "linear"], "mola adapters cannot export to LoRA"),
    ("missing", ["A", "missing", "--rule", "linear"], "is not a folder"),
    ("ranks", ["A", "C", "--rule", "linear"], "needs adapters of one rank; got ranks [2, 4]"),
    ("weights", ["A", "B", "--rule", "cat", "--weights", "1"], "weights must be 2 finite numbers"),
    ("density", ["A", "B", "--rule", "linear", "--density", "0.5"], "density applies to the ties"),
])
def test_user_errors_are_one_line(folders, odd_folders, capsys, tmp_path, case, argv, names):
    paths = {"A": folders["a"], "B": folders["b"], "C": folders["c"], "missing": str(tmp_path / "missing"),
             **odd_folders}
    out = tmp_path / "out"
    assert cli.main(["merge", *[paths.get(a, a) for a in argv], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err and "Traceback" not in err, err
    assert err.startswith("peft-ext merge: error:")
    assert not out.exists()
