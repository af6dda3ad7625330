"""LoRA-LEGO (peft_ext.merging): exact sum at k = Σr, order and seed invariance, rank k, the reweighting formulas, the
sign-aware k-means, plain-PEFT loading of the output, add_lego_adapter, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import randomize_adapter, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from peft_ext.merging import MergeInputError, add_lego_adapter, kmeans, lego_merge
from peft_ext.merging.adapters import load_adapter, lora_view

TARGETS = ["q_proj", "v_proj"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def lora_pair(seed, r, base=None, targets=TARGETS, **kwargs):
    """A random LoRA as a (state_dict, config) pair."""
    config = LoraConfig(r=r, lora_alpha=kwargs.pop("lora_alpha", 2 * r), target_modules=list(targets), **kwargs)
    model = get_peft_model(tiny_llama(), config)
    randomize_adapter(model, seed=seed)
    model.peft_config["default"].base_model_name_or_path = base
    return get_peft_model_state_dict(model), model.peft_config["default"]


def save_folder(pair, folder):
    from peft_ext.merging import write_lora_folder

    return write_lora_folder(folder, *pair)


def deltas(pair):
    return lora_view(*pair).delta_weights()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def three():
    """LoRAs of ranks 2, 3 and 4 with different scalings (rsLoRA on one)."""
    return [lora_pair(1, 2), lora_pair(2, 3, use_rslora=True), lora_pair(3, 4, lora_alpha=1)]


def test_k_total_rank_without_reweighting_is_the_exact_weighted_sum(three):
    weights = [0.5, 2.0, -1.0]
    merged, config = lego_merge(three, k=9, reweight=(), weights=weights)
    assert config.r == config.lora_alpha == 9
    got = deltas((merged, config))
    inputs = [deltas(p) for p in three]
    for module, delta in got.items():
        expected = sum(w * d[module] for w, d in zip(weights, inputs))
        # the merged factors are stored in float32 (each entry rounded at 2^-24 relative); ΔW sums 9 rank-1 products
        assert rel(delta, expected) < 1e-6, module


def test_input_order_does_not_matter(three):
    a, _ = lego_merge(three, k=4, weights=[1.0, 2.0, 3.0])
    b, _ = lego_merge([three[2], three[0], three[1]], k=4, weights=[3.0, 1.0, 2.0])
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_same_seed_same_result_and_seed_is_used(three):
    a, _ = lego_merge(three, k=3, seed=5)
    b, _ = lego_merge(three, k=3, seed=5)
    assert all(torch.equal(a[key], b[key]) for key in a)
    others = [lego_merge(three, k=3, seed=s)[0] for s in range(6)]
    # random units have no cluster structure: k-means from other seedings lands in other local optima
    assert any(not torch.equal(o[key], a[key]) for o in others for key in a)


def test_output_rank_is_k(three):
    merged, config = lego_merge(three, k=5)
    assert config.r == 5
    for key, tensor in merged.items():
        assert tensor.shape[0 if "lora_A" in key else 1] == 5
    for delta in deltas((merged, config)).values():
        assert torch.linalg.matrix_rank(delta) == 5


def test_reweighting_formulas(three):
    """k = 1: one cluster of all n = 9 units; "param" gives the centroid the members' mean |b|·|a|, "output"
    multiplies B by √(r̄/k) with r̄ = 9/3 the inputs' mean rank."""
    plain, _ = lego_merge(three, k=1, reweight=())
    param, _ = lego_merge(three, k=1, reweight=("param",))
    both, _ = lego_merge(three, k=1)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    units = []
    for state_dict, config in three:
        (A, B, s, _), = [v for m, v in lora_view(state_dict, config).modules.items() if m == key]
        units += [(A[i].double().norm() * s * B[:, i].double().norm()).item() for i in range(A.shape[0])]
    A, B = param[f"{key}.lora_A.weight"].double(), param[f"{key}.lora_B.weight"].double()
    # float32 factors: the product of two norms agrees to ~1e-7 relative
    assert abs((A.norm() * B.norm()).item() / (sum(units) / len(units)) - 1) < 1e-5
    # the plain centroid of 9 differently directed units is shorter than its members (the norm decay)
    plain_norm = (plain[f"{key}.lora_A.weight"].norm() * plain[f"{key}.lora_B.weight"].norm()).item()
    assert plain_norm < 0.9 * sum(units) / len(units)
    assert torch.allclose(both[f"{key}.lora_B.weight"], param[f"{key}.lora_B.weight"] * 3 ** 0.5, rtol=1e-6, atol=0)
    assert torch.equal(both[f"{key}.lora_A.weight"], param[f"{key}.lora_A.weight"])


def test_kmeans_groups_units_whatever_their_sign_and_scale():
    """Noisy copies of 3 directions, each with a random sign: the sign-aware k-means recovers the 3 groups."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    truth = torch.arange(30) % 3
    signs = torch.where(torch.rand(30, generator=gen) < 0.5, -1.0, 1.0).double()
    x = (centers[truth] + 0.05 * torch.randn(30, 40, generator=gen, dtype=torch.float64)) * signs[:, None]
    labels, got_signs = kmeans(x, 3, seed=0)
    for group in range(3):
        assert labels[truth == group].unique().numel() == 1
        # members of one group join with the signs that undo their random flips
        aligned = got_signs[truth == group] * signs[truth == group]
        assert aligned.unique().numel() == 1
    assert labels.unique().numel() == 3


def test_output_loads_in_plain_peft_and_matches_delta_w_by_hand(three, base_dir, tmp_path, llama_inputs):
    out = tmp_path / "lego"
    merged, config = lego_merge([(sd, _with_base(c, base_dir)) for sd, c in three], k=4, out=out)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(out)!r})
        assert "peft_ext" not in sys.modules
        ids = torch.tensor({llama_inputs.tolist()})
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "logits.pt")!r})
    """)
    env = {**os.environ, "PEFT_EXT_NO_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    by_hand = tiny_llama()
    with torch.no_grad():
        for module, delta in deltas((merged, config)).items():
            by_hand.get_submodule(module.removeprefix("base_model.model.")).weight += delta.float()
        expected = by_hand(input_ids=llama_inputs).logits
    # one fp32 forward with W + ΔW folded vs LoRA's separate x·Aᵀ·Bᵀ branch: rounding only, ~1e-6 of the logits
    assert rel(got, expected) < 1e-5


def _with_base(config, base_dir):
    import copy

    config = copy.copy(config)
    config.base_model_name_or_path = str(base_dir)
    return config


def _loaded_model(three):
    model = get_peft_model(tiny_llama(), three[0][1], adapter_name="x")
    for name, (state_dict, config) in zip("xyz", three):
        if name != "x":
            model.add_adapter(name, config)
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state_dict, adapter_name=name)
    return model


def test_add_lego_adapter_adds_the_merge_frozen_and_inactive(three, llama_inputs):
    model = _loaded_model(three)
    add_lego_adapter(model, ["x", "y", "z"], [1.0, 0.5, 2.0], "lego", k=4, seed=3)
    assert model.active_adapters == ["x"] and model.peft_config["lego"].r == 4
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lego." in n)
    expected, _ = lego_merge(three, k=4, seed=3, weights=[1.0, 0.5, 2.0])
    got = get_peft_model_state_dict(model, adapter_name="lego")
    assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in got)
    model.set_adapter("lego")
    by_hand = tiny_llama()
    with torch.no_grad():
        for module, delta in deltas((expected, model.peft_config["lego"])).items():
            by_hand.get_submodule(module.removeprefix("base_model.model.")).weight += delta.float()
        # fp32 rounding of the two forms of one update, as above
        assert rel(model(input_ids=llama_inputs).logits, by_hand(input_ids=llama_inputs).logits) < 1e-5


def test_peft_ext_adapters_export_to_lora_first(base_dir, tmp_path):
    """A LoRA-convertible peft-ext adapter (DyLoRA) joins through its LoRA export; at k = Σr with no reweighting the
    merge is its ΔW plus the LoRA's."""
    from peft_ext import DyLoraConfig

    dylora = get_peft_model(tiny_llama(), DyLoraConfig(r=4, target_modules=TARGETS))
    randomize_adapter(dylora, seed=7)
    dylora.peft_config["default"].base_model_name_or_path = str(base_dir)
    dylora.save_pretrained(tmp_path / "dylora")
    lora = lora_pair(8, 2, base=str(base_dir))
    merged, config = lego_merge([tmp_path / "dylora", lora], k=6, reweight=())
    exported = load_adapter(tmp_path / "dylora").delta_weights()
    want = {m: exported[m] + d for m, d in deltas(lora).items()}
    for module, delta in deltas((merged, config)).items():
        # the export is an fp32 SVD of an exactly rank-4 ΔW: ~1e-6 relative
        assert rel(delta, want[module]) < 1e-5
    dy_model = dylora.base_model.model.model.layers[0].self_attn.q_proj
    assert rel(exported["base_model.model.model.layers.0.self_attn.q_proj"].float(),
               dy_model.get_delta_weight("default")) < 1e-5


@pytest.mark.parametrize("case, message", [
    ("k0", "k must be an integer >= 1"),
    ("k_big", "k=10 exceeds the 9 rank-1 units"),
    ("base", "different base models"),
    ("modules", "different target modules"),
    ("weights", "weights must be 3 finite numbers"),
    ("reweight", "reweight must be a subset"),
])
def test_bad_inputs_are_named(three, case, message):
    adapters, k, kwargs = list(three), 3, {}
    if case == "k0":
        k = 0
    elif case == "k_big":
        k = 10
    elif case == "base":
        adapters[1] = (three[1][0], _with_base(three[1][1], "other/base"))
    elif case == "modules":
        adapters[1] = lora_pair(4, 3, targets=["q_proj", "k_proj"])
    elif case == "weights":
        kwargs["weights"] = [1.0, 2.0]
    else:
        kwargs["reweight"] = ("param", "norm")
    with pytest.raises(MergeInputError, match=message) as info:
        lego_merge(adapters, k=k, **kwargs)
    assert "\n" not in str(info.value)


def test_adapter_without_lora_export_and_missing_folder_are_refused(tmp_path, base_dir, three):
    from peft_ext import MolaConfig

    from conftest import make_config
    from peft_ext.registry import get_method

    mola = get_peft_model(tiny_llama(), make_config(get_method("mola"), TARGETS))
    mola.peft_config["default"].base_model_name_or_path = str(base_dir)
    mola.save_pretrained(tmp_path / "mola")
    assert isinstance(mola.peft_config["default"], MolaConfig)
    with pytest.raises(MergeInputError, match="mola adapters cannot export to LoRA"):
        lego_merge([tmp_path / "mola", three[0]], k=2)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        lego_merge([tmp_path / "missing", three[0]], k=2)
    model = _loaded_model(three)
    with pytest.raises(MergeInputError, match=r"adapters \['zz'\] are not on the model"):
        add_lego_adapter(model, ["x", "zz"], None, "lego", k=2)
    with pytest.raises(MergeInputError, match="'x' already exists"):
        add_lego_adapter(model, ["x", "y"], None, "x", k=2)


def test_plain_model_loads_back_the_folder(three, tmp_path, llama_inputs):
    """PeftModel.from_pretrained in this process (peft-ext imported) reads the folder back to the same factors."""
    merged, config = lego_merge(three, k=3, out=tmp_path / "m")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "m")
    got = get_peft_model_state_dict(loaded)
    assert all(torch.equal(got[key], merged[key]) for key in merged)
