"""Uni-MoE recipe (peft_ext/apps/unimoe.py): the preset adapts every expert and leaves the gates to the base, the
expert shares, save -> fresh-process load, resume, and bad input."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from peft_ext.apps import unimoe
from peft_ext.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny_unimoe.yaml"


def _tiny(out, *extra):
    return load_recipe(TINY, [f"output_dir={out}", *extra])


def test_recipe_adapter_is_the_uni_moe_preset():
    """The recipe's method.config is configs/uni_moe.yaml's config, so the recipe trains the preset."""
    preset = yaml.safe_load((ROOT / "configs" / "uni_moe.yaml").read_text(encoding="utf-8"))
    for name in ("unimoe.yaml", "tiny_unimoe.yaml"):
        recipe = load_recipe(ROOT / "recipes" / name)
        assert recipe.method.name == preset["method"] and recipe.method.config == preset["config"], name


def test_expert_lora_trains_every_expert_and_not_the_gates(tmp_path):
    from peft import LoraConfig, get_peft_model

    recipe = _tiny(tmp_path)
    config = unimoe.unimoe_config_from_recipe(recipe)
    tok, base = unimoe.load_moe_model(recipe, config)
    model = get_peft_model(base, LoraConfig(**recipe.method.config))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(".gate." in n for n in trainable)  # routing stays the base model's
    batch = unimoe.encode(tok, ["the plot was great", "the cast was dull"], 16)
    model(**batch).loss.backward()
    r = recipe.method.config["r"]
    for layer in range(config.num_layers):
        # gate_up_proj and down_proj each get an A and a B; PEFT stacks one rank-r LoRA per expert (r x E rows of A)
        expert = {n: p for n, p in model.named_parameters() if f"layers.{layer}.mlp.experts" in n and "lora_" in n}
        assert len(expert) == 4, sorted(expert)
        assert all(p.shape[0] == r * config.num_experts for n, p in expert.items() if "lora_A" in n)
        # B starts at 0, so only B receives a gradient at the first step; it must reach both expert weights
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in expert.items() if "lora_B" in n)


def test_router_shares_count_top_k_of_the_gate_logits():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0],   # top-2: experts 0, 1
                           [0.0, 5.0, 4.0, 0.0],    # 1, 2
                           [9.0, 9.5, 0.0, 0.0]])   # padding: left out
    shares = unimoe.router_probs([logits], top_k=2, attention_mask=torch.tensor([[1, 1, 0]]))[0]
    np.testing.assert_allclose(shares, [0.25, 0.5, 0.25, 0.0])


def test_tiny_recipe_save_load_and_resume(tmp_path):
    """The fresh-process reload of every app is in tests/test_app_fresh_process.py."""
    out = tmp_path / "run"
    recipe = _tiny(out)
    metrics = unimoe.train_unimoe_recipe(recipe, quiet=True)
    variants = metrics["variants"]
    assert set(variants) == {"experts_and_attention", "attention_only"}
    sizes = {name: r["trainable_parameters"] for name, r in variants.items()}
    assert sizes["experts_and_attention"] > sizes["attention_only"]
    for r in variants.values():
        assert math.isfinite(r["after"]["loss"]) and len(r["history"]) == 2
        assert np.allclose(np.asarray(r["after"]["expert_share"]).sum(1), 1.0, atol=1e-3)  # rounded to 4 places
    here = variants["experts_and_attention"]["after"]
    again = unimoe.train_unimoe_recipe(recipe, resume=True, quiet=True)  # finished variants are not retrained
    assert not any(r["trained_this_run"] for r in again["variants"].values())
    assert again["variants"]["experts_and_attention"]["after"]["loss"] == pytest.approx(here["loss"], rel=1e-6)


@pytest.mark.parametrize("args, field", [
    ({"top_k": 5}, "top_k"),
    ({"hidden_size": 30}, "hidden_size"),
    ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
    ({"steps": 0}, "steps"),
    ({"compare_attention_only": "yes"}, "compare_attention_only"),
])
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        unimoe.UniMoEConfig(**args)


def test_bad_recipe_names_the_field():
    with pytest.raises(RecipeError, match="target_parameters"):
        load_recipe(TINY, ["method.config={r: 8, lora_alpha: 16, target_modules: [q_proj]}"])
    with pytest.raises(RecipeError, match="method.name"):
        load_recipe(TINY, ["method.name=mola", "method.config={r: 4}"])
    with pytest.raises(RecipeError, match="model.name"):
        load_recipe(TINY, ["model.name=tiny-mixtrall"])
    with pytest.raises(RecipeError, match="trainer.args.experts"):
        load_recipe(TINY, ["trainer.args.experts=4"])
