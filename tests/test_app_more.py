"""MoRE recipe (https://arxiv.org/abs/2410.16239): the symmetric InfoNCE equals its formula computed by hand, the
temperature is a trained parameter (the official script's never trains), and save → fresh-process load reproduces the
embeddings of both towers."""

import json
import math
from pathlib import Path

import pytest
import torch

from peft_ext.apps import more
from peft_ext.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny_more.yaml"


def test_info_nce_equals_the_formula_by_hand():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    scale = torch.tensor(2.5)

    def cos(u, v):
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    A, B, n = a.tolist(), b.tolist(), len(a)
    s = [[2.5 * cos(A[i], B[j]) for j in range(n)] for i in range(n)]
    # text→signal: row i's softmax over the signals; signal→text: column j's softmax over the texts
    rows = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    cols = -sum(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(n))) for j in range(n)) / n
    # fp32 against float64 by hand: ~1e-6 relative
    assert more.info_nce(a, b, scale).item() == pytest.approx((rows + cols) / 2, rel=1e-5)
    # asymmetric on purpose: the two directions differ here, so a one-sided loss would fail the check above
    assert abs(rows - cols) > 1e-3
    # the loss depends on the scale: its gradient reaches logit_scale
    scale = torch.tensor(2.5, requires_grad=True)
    more.info_nce(a, b, scale).backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


def _tiny_text_tower():
    recipe = load_recipe(TINY, [])
    tokenizer, model = more.text_tower(recipe)
    return recipe, tokenizer, model


@pytest.mark.parametrize("learn", [True, False])
def test_temperature_is_a_trained_parameter(learn):
    recipe, tokenizer, text = _tiny_text_tower()
    config = more.MoREConfig(steps=2, batch_size=4, max_length=8, embed_dim=8, signal_dim=4, signal_hidden=8,
                             learning_rate=1e-2, learn_temperature=learn)
    torch.manual_seed(0)
    heads = more.ContrastiveHeads(text.config.hidden_size, config)
    assert heads.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    data = {"text": ["a good film", "bad acting", "fine plot", "awful", "great", "meh", "superb", "dull"],
            "signal": torch.randn(8, 4, generator=torch.Generator().manual_seed(1))}
    start = heads.logit_scale.detach().clone()
    stats = more.train_contrastive(text, tokenizer, heads, data, config, seed=0, frozen=True)
    moved = (heads.logit_scale.detach() - start).abs().item()
    if learn:  # AdamW's first steps move a parameter by ~lr each: 1e-2 here
        assert moved > 1e-3 and stats["temperature_end"] != pytest.approx(stats["temperature_start"], abs=1e-6)
    else:  # the switch off keeps it exactly, as the official script (by accident) does
        assert moved == 0.0 and stats["temperature_end"] == stats["temperature_start"]


def test_saved_run_reloads_to_the_measured_embeddings(tmp_path):
    """The fresh-process reload of every app is in tests/test_app_fresh_process.py."""
    out = tmp_path / "run"
    recipe = load_recipe(TINY, [f"output_dir={out}", "trainer.args.baseline=false", "trainer.args.steps=2"])
    metrics = more.train_more_recipe(recipe, quiet=True)
    assert set(metrics["retrieval"]) == {"lora"}
    run = metrics["runs"]["lora"]
    assert run["temperature_end"] != run["temperature_start"]  # trained in the recipe too
    with open(out / "lora" / "text_adapter" / "adapter_config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["bias"]) == (16, 8, 0.1, "all")
    config = more.more_config_from_recipe(recipe)
    data = more.load_pairs(config, recipe.data.seed, recipe.data.max_train, recipe.data.max_eval)["test"]
    tokenizer, model, heads = more.load_more(out / "lora", recipe)
    t, s = more.embed_pairs(model, tokenizer, heads, data, config.max_length)
    with model.disable_adapter():
        t_base, _ = more.embed_pairs(model, tokenizer, heads, data, config.max_length)
    assert (t - t_base).abs().max() > 1e-6  # the LoRA matrices change the text embeddings
    recalls = more.recall_at_k(t, s, config.recall_at)
    assert recalls == pytest.approx(metrics["retrieval"]["lora"])  # the recipe measured this very model


def test_recall_at_k_on_fixed_similarities():
    a = torch.eye(3)
    b = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # rows 1 and 2 swapped
    r = more.recall_at_k(a, b, [1, 2])
    assert r["text_to_signal_R@1"] == pytest.approx(1 / 3) and r["signal_to_text_R@1"] == pytest.approx(1 / 3)
    assert r["text_to_signal_R@2"] == pytest.approx(1.0)  # a tie with the true match does not count against it
    # the oracle ceiling: exact noise-free signals find their noisy signal unless the noise carries it elsewhere
    clean = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert more.oracle_recall({"clean_signal": clean, "signal": clean + 0.1}, [1])["text_to_signal_R@1"] == 1.0
    moved = clean.clone()
    moved[1] = torch.tensor([0.0, 0.9])  # signal 1 lands next to text 2's clean signal
    o = more.oracle_recall({"clean_signal": clean, "signal": moved}, [1])
    assert o["signal_to_text_R@1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("override, field", [
    ("method.name=dora", "method.name"),
    ("model.name=smollm2", "model.name"),
    ("trainer.args.batch_size=1", "batch_size"),
    ("trainer.args.init_temperature=0.001", "max_logit_scale"),
    ("trainer.args.recall_at=[0]", "recall_at"),
])
def test_bad_recipes_name_the_field(override, field):
    with pytest.raises(RecipeError, match=field):
        load_recipe(TINY, [override])
