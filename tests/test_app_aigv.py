"""AIGV quality recipe (peft_ext/apps/aigv.py): the level-word read-out against the official formula, the official
losses, the correlations, save -> fresh-process load, resume, and bad input."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_ext.apps import aigv
from peft_ext.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny_aigv_quality.yaml"


def _official_readout(logits: np.ndarray, ids, weights, temperature=100.0) -> np.ndarray:
    """The official T2VQA.forward read-out written out by hand: stack the five logits, divide by 100, softmax over the
    five, multiply by the weight column, sum."""
    picked = np.stack([logits[:, i] for i in ids]) / temperature  # [5, batch]
    e = np.exp(picked - picked.max(0, keepdims=True))
    p = e / e.sum(0, keepdims=True)
    return (p * np.asarray(weights, dtype=float)[:, None]).sum(0)


def test_readout_equals_official_formula_on_fixed_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 300  # large logits: /100 still leaves a peaked softmax
    ids = [7, 3, 41, 12, 0]
    got = aigv.level_score(logits, ids, aigv.OFFICIAL_WEIGHTS)
    want = _official_readout(logits.double().numpy(), ids, aigv.OFFICIAL_WEIGHTS)
    # fp32 softmax of values up to ~10: agreement to 1e-5 relative on scores in [1, 5]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # the MOS-direction weights (5..1) are the exact mirror: probabilities sum to 1, so q_mos = 6 - q_official
    np.testing.assert_allclose(aigv.level_score(logits, ids, aigv.MOS_WEIGHTS).numpy(), 6 - want, rtol=1e-5)


def test_readout_direction():
    """Logits that favour 'excellent': the official score is low (a badness score), the MOS-direction one high."""
    ids = [0, 1, 2, 3, 4]
    logits = torch.tensor([[2000.0, 0, 0, 0, -2000.0]])  # softmax(l/100) puts ~1 on excellent
    assert aigv.level_score(logits, ids, aigv.OFFICIAL_WEIGHTS).item() == pytest.approx(1.0, abs=1e-6)
    assert aigv.level_score(logits, ids, aigv.MOS_WEIGHTS).item() == pytest.approx(5.0, abs=1e-6)
    # equal logits: the mean weight, 3
    assert aigv.level_score(torch.zeros(1, 5), ids, aigv.OFFICIAL_WEIGHTS).item() == pytest.approx(3.0)


def test_official_losses():
    y = torch.tensor([0.3, -1.2, 2.5, 0.9, -0.4, 1.7])
    assert aigv.plcc_loss(2 * y + 7, y).item() == pytest.approx(0.0, abs=1e-6)  # increasing affine: no loss
    assert aigv.plcc_loss(-y, y).item() == pytest.approx(0.5, abs=1e-5)  # rho = -1: (4/4 + 0) / 2
    assert aigv.rank_loss(torch.exp(y), y).item() == 0.0  # same order
    pred = torch.tensor([0.1, 0.5, -0.2, 0.3, 0.0, 0.4])
    n, total, worst = len(y), 0.0, 0.0
    for i in range(n):  # the pairwise hinge written as a double loop
        for j in range(n):
            v = max(0.0, float((pred[i] - pred[j]) * np.sign(float(y[j] - y[i]))))
            total, worst = total + v, max(worst, v)
    assert aigv.rank_loss(pred, y).item() == pytest.approx(total / (n * (n - 1)) / (1 + worst), rel=1e-6)
    assert aigv.quality_loss(pred, y).item() == pytest.approx(
        aigv.plcc_loss(pred, y).item() + 0.3 * aigv.rank_loss(pred, y).item(), rel=1e-6)


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    y[:5] = y[5]  # ties
    assert aigv.srcc(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert aigv.plcc(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)


def test_tiny_recipe_save_load_and_resume(tmp_path):
    """The fresh-process reload of every app is in tests/test_app_fresh_process.py."""
    out = tmp_path / "run"
    recipe = load_recipe(TINY, [f"output_dir={out}", "trainer.args.steps=2"])
    metrics = aigv.train_aigv_recipe(recipe, quiet=True)
    assert metrics["trained_this_run"] and len(metrics["history"]) == 2
    assert all(math.isfinite(v) for v in (*metrics["before"].values(), *metrics["after"].values()))
    assert (out / "results.png").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()

    # the in-process scores of the trained model, recomputed from what it saved
    from peft import PeftModel

    from peft_ext.runner import load_tokenizer_and_model

    config = aigv.aigv_config_from_recipe(recipe)
    rows = aigv.rated_rows(recipe, config)["test"]
    tok, base = load_tokenizer_and_model(recipe)
    here = aigv.score_rows(PeftModel.from_pretrained(base, out / "adapter"), tok, rows, config, recipe.data.max_length)
    assert aigv.correlations(here, [m for _, m in rows])["srcc"] == pytest.approx(metrics["after"]["srcc"], abs=1e-9)

    again = aigv.train_aigv_recipe(recipe, resume=True, quiet=True)  # a finished training is not redone
    assert not again["trained_this_run"]
    assert again["after"] == pytest.approx(metrics["after"]) and again["before"] == pytest.approx(metrics["before"])


@pytest.mark.parametrize("args, field", [
    ({"level_weights": [1, 2, 3]}, "level_weights"),
    ({"level_weights": [2, 2, 2, 2, 2]}, "level_weights"),
    ({"batch_size": 1}, "batch_size"),
    ({"temperature": 0}, "temperature"),
    ({"lora_a_init": "xavier"}, "lora_a_init"),
    ({"prompt": "no placeholder"}, "prompt"),
])
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        aigv.AIGVConfig(**args)


def test_bad_recipe_names_the_field():
    with pytest.raises(RecipeError, match="method.name"):
        load_recipe(TINY, ["method.name=dylora", "method.config={r: 4}"])
    with pytest.raises(RecipeError, match="trainer.args.stepz"):
        load_recipe(TINY, ["trainer.args.stepz=3"])
    with pytest.raises(RecipeError, match="domains"):
        load_recipe(TINY, ["data.name=movie_reviews", "trainer.args.domains=[cinema]"])
    with pytest.raises(RecipeError, match="data.name"):
        load_recipe(TINY, ["data.name=gsm"])
