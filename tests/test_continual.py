"""The CoDyRA continual-learning recipe (https://arxiv.org/abs/2412.01004, official code
https://github.com/Artificer-AI-Lab/CoDyRA): the task boundary keeps earlier tasks' outputs, the continual metrics
against a hand computation, bad input, and the tiny recipe end to end with resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import peft_ext.recipe as recipe_module
from peft_ext.trainers import continual as C

ROOT = Path(__file__).resolve().parents[1]


def load_tiny(monkeypatch, out, overrides=()):
    """The tiny recipe through the full recipe validation."""
    return recipe_module.load_recipe(ROOT / "recipes" / "tiny_codyra_continual.yaml", [f"output_dir={out}", *overrides])


def test_increment_task_keeps_the_earlier_task_outputs(monkeypatch, tmp_path):
    from peft import get_peft_model

    from peft_ext.callbacks.codyra import CodyraThresholdCallback
    from peft_ext.tuners.codyra import CodyraConfig, increment_task

    recipe = load_tiny(monkeypatch, tmp_path)
    tokenizer, base = C.seqcls_model(recipe)
    model = get_peft_model(base, CodyraConfig(**C.adapter_kwargs(recipe)))
    movies, tweets = C.toy_domain("movies", 48), C.toy_domain("tweets", 48)
    C.train_classifier(model, tokenizer, movies["train"], epochs=2, batch_size=8, learning_rate=0.02, max_length=16,
                       seed=0, after_step=CodyraThresholdCallback(model).step)
    batch = C.encode(tokenizer, movies["test"], 16)
    batch.pop("labels")
    with torch.no_grad():
        with model.disable_adapter():
            untrained = model(**batch).logits
        before = model(**batch).logits
    assert not torch.allclose(before, untrained)  # task 1 changed the model
    increment_task(model)
    layers = [m for m in model.modules() if hasattr(m, "codyra_up")]
    assert all(not m.codyra_up["default"].weight.detach().any() for m in layers)  # the new task starts at B = 0
    with torch.no_grad():
        after = model(**batch).logits
    # the fold computes x·(W + B·diag(g)·A)ᵀ instead of x·Wᵀ + ((x·Aᵀ)⊙g)·Bᵀ: equal up to fp32 rounding
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    C.train_classifier(model, tokenizer, tweets["train"], epochs=1, batch_size=8, learning_rate=0.02, max_length=16,
                       seed=1)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, after)  # the new adapter is live


def test_continual_metrics_by_hand():
    acc = [[0.9, 0.5, 0.5], [0.7, 0.8, 0.5], [0.6, 0.7, 0.9]]
    got = C.continual_metrics(acc)
    assert got["average_accuracy"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert got["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.7)) / 2)
    assert got["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    # forgetting uses the best earlier accuracy, not the just-trained one
    assert C.continual_metrics([[0.6, 0.1], [0.9, 0.8], ])["forgetting"] == pytest.approx(0.6 - 0.9)
    with pytest.raises(ValueError, match="square"):
        C.continual_metrics([[0.5, 0.5]])


def test_toy_domains_are_seeded_and_distinct():
    a, b = C.toy_domain("products", 40, seed=1), C.toy_domain("products", 40, seed=1)
    assert a == b and len(a["test"]) == 10
    assert not set(t for t, _ in a["train"]) & set(t for t, _ in C.toy_domain("tweets", 40, seed=1)["train"])
    labels = np.array([y for _, y in a["train"]])
    assert 0 < labels.mean() < 1


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method.name=lora", "method.config={}"], "needs method.name 'codyra'"),
        (["trainer.args.tasks=[movies]"], "ContinualConfig.tasks"),
        (["trainer.args.tasks=[movies, films]"], "trainer.args.tasks: unknown domain"),
        (["trainer.args.tasks=[movies, movies]"], "must not repeat"),
        (["trainer.args.epochs=0"], "ContinualConfig.epochs"),
        (["trainer.args.learning_rate=0"], "ContinualConfig.learning_rate"),
        (["trainer.args.lr=0.1"], "trainer.args.lr"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(monkeypatch, tmp_path, overrides, needle):
    with pytest.raises(recipe_module.RecipeError, match=needle) as info:
        load_tiny(monkeypatch, tmp_path, overrides)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        out = tmp_path_factory.mktemp("continual_full")
        return out, C.train_continual_recipe(load_tiny(mp, out), quiet=True)
    finally:
        mp.undo()


def test_tiny_recipe_end_to_end(uninterrupted):
    out, metrics = uninterrupted
    saved = json.loads((out / "metrics.json").read_text())
    assert (out / "results.png").stat().st_size > 0
    for method in ("codyra", "lora"):
        r = saved["methods"][method]
        assert np.asarray(r["accuracy_matrix"]).shape == (3, 3)
        for key, value in C.continual_metrics(r["accuracy_matrix"]).items():
            assert r[key] == pytest.approx(value, abs=1e-12)
        for j in (1, 2, 3):
            assert (out / method / f"task_{j}" / "adapter_model.safetensors").is_file()
    # the CoDyRA adapter carries every folded task: two after task 2's boundary, three at the end
    past = load_file(out / "codyra" / "task_3" / "adapter_model.safetensors")
    ranks = [v for k, v in past.items() if k.endswith("codyra_past_ranks")]
    assert ranks and all(v.numel() == 3 for v in ranks)
    assert not list(out.rglob(".*.tmp"))


def test_resume_equals_uninterrupted(uninterrupted, monkeypatch, tmp_path):
    out_full, full = uninterrupted
    recipe = load_tiny(monkeypatch, tmp_path)
    real, calls = C.train_classifier, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) in (2, 6):  # codyra task 2 (first run); lora task 2 (the resume: codyra 2, 3, lora 1, 2)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "train_classifier", crash)
    with pytest.raises(KeyboardInterrupt):
        C.train_continual_recipe(recipe, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        C.train_continual_recipe(recipe, resume=True, quiet=True)
    monkeypatch.setattr(C, "train_classifier", real)
    resumed = C.train_continual_recipe(recipe, resume=True, quiet=True)
    for method in ("codyra", "lora"):
        a, b = resumed["methods"][method], full["methods"][method]
        assert a["accuracy_matrix"] == b["accuracy_matrix"]
        got = load_file(tmp_path / method / "task_3" / "adapter_model.safetensors")
        want = load_file(out_full / method / "task_3" / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), method
