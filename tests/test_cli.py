"""The peft-ext command end to end on a tiny random BERT and synthetic data (seconds per run)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from peft_ext import cli
from peft_ext.recipe import RecipeError, load_recipe
from peft_ext.runner import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def tiny_recipe(tmp_path, *overrides):
    return load_recipe(TINY, [f"output_dir={tmp_path}", *overrides])


def test_train_end_to_end_writes_adapter_card_metrics_plot(tmp_path, capsys):
    result = tmp_path / "run.json"
    argv = ["train", str(TINY), "--set", f"output_dir={tmp_path}", "--quiet", "--result-json", str(result)]
    assert cli.main(argv) == 0
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "DYLORA" and config["r"] == 4
    card = (adapter / "README.md").read_text()
    assert "peft-ext" in card and "- dylora" in card and "arxiv.org/abs/2210.07558" in card
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["rank"] for row in metrics["results"]] == [1, 2, 3, 4]
    assert all(0 <= row["accuracy"] <= 1 for row in metrics["results"]) and "accuracy" in metrics["baseline"]
    assert metrics["train_steps"] == 8 and metrics["num_trainable_params"] > 0
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads(result.read_text())
    assert set(record) == {"run_info", "train_info", "meta_info"}
    assert record["train_info"]["status"] == "success" and record["run_info"]["peft_config"]["peft_type"] == "DYLORA"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.name=dyloar"], r"method\.name must be one of \['lora', 'dylora', 'nola'"),
        (["modle.name=minilm"], r"Unknown key 'modle'\. Did you mean 'model'\?"),
        (["training.learnig_rate=0.1"], r"Unknown key 'training\.learnig_rate'\. Did you mean 'learning_rate'\?"),
        (["data.max_train=lots"], r"data\.max_train must be an integer or null; got 'lots'"),
        (["method.config.rr=4"], r"Unknown key 'method\.config\.rr'\. Did you mean 'r'\?"),
        (["model.task=classify"], r"model\.task must be one of \['seq_cls', 'causal_lm'\]; got 'classify'"),
        (["data.name=imdb"], r"data\.name must be one of"),
        (["evaluation.ranks=some"], r"evaluation\.ranks must be 'all'"),
    ],
)
def test_recipe_errors_name_the_key_and_allowed_values(tmp_path, overrides, message, capsys):
    with pytest.raises(RecipeError, match=message):
        tiny_recipe(tmp_path, *overrides)
    args = ["train", str(TINY)] + [a for o in overrides for a in ("--set", o)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peft-ext train: error:")  # one error line


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


class StopAt(TrainerCallback):
    """Simulates an interruption: stop training after ``step`` optimizer steps (a checkpoint is saved there)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_ends_with_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    full = tiny_recipe(tmp_path / "full", "evaluation.baseline=false", "evaluation.plot=false")
    train(full, quiet=True)
    cut = tiny_recipe(tmp_path / "cut", "evaluation.baseline=false", "evaluation.plot=false")
    train(cut, quiet=True, extra_callbacks=[StopAt(4)])
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-4").is_dir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(tiny_recipe(tmp_path / "empty"), resume=True, quiet=True)
    metrics = train(cut, resume=True, quiet=True)
    assert metrics["train_steps"] == 8
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # same CPU, same data order, same RNG states: identical up to float summation order
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_export_to_lora_round_trip(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    recipe = tiny_recipe(tmp_path, "evaluation.baseline=false", "evaluation.plot=false")
    train(recipe, quiet=True)
    adapter = tmp_path / "adapter"
    base_dir = tmp_path / "base"
    # the tiny model is random: keep its weights so both adapters sit on the same base
    from peft_ext.runner import load_tokenizer_and_model

    _, base = load_tokenizer_and_model(recipe)
    base.save_pretrained(base_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert cli.main(["export", str(adapter), "--to", "lora", "--out", str(tmp_path / "lora")]) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    x = torch.randint(0, 1000, (3, 10))
    with torch.no_grad():
        ours = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir), adapter).eval()
        lora = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir),
                                         tmp_path / "lora").eval()
        expected, got = ours(input_ids=x).logits, lora(input_ids=x).logits
    # ΔW has rank <= r = 4 and is exported at rank 4: only SVD round-off separates them
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compare_writes_peft_layout_table_and_plot(tmp_path):
    out = tmp_path / "cmp"
    code = cli.main(["compare", str(TINY), "--methods", "lora,dylora", "--set", f"output_dir={tmp_path}",
                     "--set", "training.max_steps=4", "--out", str(out)])
    assert code == 0
    for method in ("lora", "dylora"):
        record = json.loads((out / f"{method}--tiny.json").read_text())
        info = record["train_info"]
        assert info["status"] == "success" and info["num_trainable_params"] > 0 and info["file_size"] > 0
        assert info["train_time"] > 0 and info["cpu_memory_max"] > 0
        assert record["run_info"]["peft_config"]["peft_type"] == method.upper()
        assert 0 <= info["metrics"][-1]["test accuracy"] <= 1 and info["metrics"][-1]["tokens / sec"] > 0
    table = (out / "comparison.md").read_text()
    assert "| lora |" in table and "| dylora |" in table
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_rejects_unknown_methods(tmp_path, capsys):
    assert cli.main(["compare", str(TINY), "--methods", "lora,nope"]) == 2
    assert "--methods must be a comma-separated subset of ['lora', 'dylora', 'nola'" in capsys.readouterr().err


def test_methods_lists_the_registry(capsys):
    import peft_ext

    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for spec in peft_ext.list_methods():
        assert f"| {spec.name} | {spec.config_cls.__name__} |" in out and spec.paper_url in out


def test_push_uploads_the_folder_with_its_card(tmp_path):
    recipe = tiny_recipe(tmp_path, "evaluation.baseline=false", "evaluation.plot=false", "training.max_steps=1")
    train(recipe, quiet=True)
    uploaded = {}
    api = mock.Mock()
    api.upload_folder.side_effect = lambda **kw: uploaded.update(
        {p.name: p.read_text(errors="ignore") for p in Path(kw["folder_path"]).iterdir()})
    with mock.patch("peft_ext.hub.HfApi", return_value=api):
        assert cli.main(["push", str(tmp_path / "adapter"), "me/tiny-dylora", "--base-model", "owner/tiny-bert"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    assert "arxiv.org/abs/2210.07558" in uploaded["README.md"]


def test_causal_lm_recipe_on_gsm_scores_generations(tmp_path):
    pytest.importorskip("reasoning_gym")
    recipe = load_recipe(ROOT / "recipes" / "tiny_gsm.yaml", [f"output_dir={tmp_path}", "evaluation.plot=false"])
    from peft_ext.runner import load_data, load_tokenizer_and_model

    tokenizer, _ = load_tokenizer_and_model(recipe)
    train_set, _, _ = load_data(recipe, tokenizer)
    row = train_set[0]
    masked = sum(1 for label in row["labels"] if label == -100)
    assert 0 < masked < len(row["labels"]), "the loss must cover the worked solution only, not the question"
    metrics = train(recipe, quiet=True)
    assert metrics["peft_config"]["peft_type"] == "NOLA" and metrics["train_steps"] == 4
    for row in [metrics["baseline"], *metrics["results"]]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["eval_loss"] > 0


def test_generate_needs_a_causal_lm_on_gsm_or_bfcl(tmp_path):
    with pytest.raises(RecipeError, match="evaluation.generate applies to model.task 'causal_lm'"):
        tiny_recipe(tmp_path, "evaluation.generate=4")


def test_eval_reproduces_the_trained_metrics(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, "evaluation.baseline=false", "evaluation.plot=false")
    metrics = train(recipe, quiet=True)
    from peft_ext.runner import evaluate

    again = evaluate(recipe, str(tmp_path / "adapter"), quiet=True)
    assert [r["rank"] for r in again["results"]] == [1, 2, 3, 4]
    for before, after in zip(metrics["results"], again["results"]):
        assert after["accuracy"] == before["accuracy"]
        assert abs(after["eval_loss"] - before["eval_loss"]) <= 1e-6 * max(1.0, before["eval_loss"])
    assert cli.main(["eval", str(TINY), "--adapter", str(tmp_path / "adapter"), "--set", f"output_dir={tmp_path}"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if " | " in line]
    assert [line.split("|")[0].strip() for line in table] == ["rank", "1", "2", "3", "4"]  # no baseline row


def test_prompt_aware_recipe_pools_over_the_question_only(tmp_path):
    """``peft-ext train`` with prompt-aware LoRA (WavLLM) hands ``prompt_mask=`` (the question tokens) to every call,
    so the scale never sees the answer it is trained to produce, and the method's default ``no_prompt="error"``
    never fires; generation passes the question as the prompt too."""
    pytest.importorskip("reasoning_gym")
    recipe = load_recipe(ROOT / "recipes" / "tiny_gsm.yaml", [
        f"output_dir={tmp_path}", "evaluation.plot=false", "evaluation.baseline=false", "method.name=prompt_aware_lora",
        "method.config={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}",
    ])
    from peft_ext.runner.data import _collator, load_data, load_tokenizer_and_model

    tokenizer, _ = load_tokenizer_and_model(recipe)
    train_set, _, _ = load_data(recipe, tokenizer)
    batch = _collator(recipe, tokenizer)([train_set[i] for i in range(3)])
    expected = batch["labels"].eq(-100) & batch["attention_mask"].bool()
    assert torch.equal(batch["prompt_mask"], expected)
    # every row has a question; rows cut at max_length may hold no answer tokens, but some do
    assert batch["prompt_mask"].any(1).all() and (~batch["prompt_mask"] & batch["attention_mask"].bool()).any()
    metrics = train(recipe, quiet=True)
    assert metrics["peft_config"]["peft_type"] == "PROMPT_AWARE_LORA" and metrics["train_steps"] == 4
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in metrics["results"])


def test_trainer_recipes_run_through_the_command(tmp_path):
    """`trainer:` recipes go to peft_ext.trainers.run: two mrDPO rounds, each recorded, and the final adapter
    written."""
    out = tmp_path / "mrdpo"
    assert cli.main(["train", str(ROOT / "recipes" / "tiny_mrdpo.yaml"), "--set", f"output_dir={out}", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainer"] == "mrdpo" and len(metrics["stages"]) == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "rounds").glob("round-*")) == ["round-1", "round-2"]
