"""WavLLM stand-in recipe (peft_ext/apps/wavllm.py): held-out instructions stay out of training, the prompt mask
covers the instruction only, the stage switch, save -> fresh-process load, resume, and bad input."""

import json
import math
from pathlib import Path

import pytest

from peft_ext.apps import wavllm
from peft_ext.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny_wavllm.yaml"


def _tiny(out, *extra):
    return load_recipe(TINY, [f"output_dir={out}", *extra])


def test_heldout_instructions_never_train_and_prompt_mask_is_the_instruction(tmp_path):
    from peft_ext.runner import load_tokenizer_and_model

    recipe = _tiny(tmp_path / "run")
    config = wavllm.wavllm_config_from_recipe(recipe)
    tok, _ = load_tokenizer_and_model(recipe)
    rows = wavllm.task_rows(recipe, config)
    batches = wavllm.training_stream(tok, rows["train"], config, seed=0)
    assert len(batches) == config.steps and all(len(b) == config.batch_size for b in batches)
    for task in wavllm.INSTRUCTIONS:
        unseen = wavllm.paraphrases(task, config.heldout_paraphrases, seen=False)
        seen = wavllm.paraphrases(task, config.heldout_paraphrases, seen=True)
        assert len(unseen) == config.heldout_paraphrases and not set(unseen) & set(seen)
    trained_prefixes = set()
    for batch in batches:
        for e in batch:
            n_prompt = sum(e["prompt_mask"])
            prompt = tok.decode(e["input_ids"][:n_prompt]).strip()
            trained_prefixes.add(prompt)
            # the mask is a prefix, it is exactly one instruction, and no loss falls on it
            assert e["prompt_mask"][:n_prompt] == [True] * n_prompt and not any(e["prompt_mask"][n_prompt:])
            assert all(label == -100 for label in e["labels"][:n_prompt])
    unseen_all = {tok.decode(tok(p + "\n", add_special_tokens=False)["input_ids"]).strip()
                  for t in wavllm.INSTRUCTIONS for p in wavllm.paraphrases(t, config.heldout_paraphrases, False)}
    assert trained_prefixes and not trained_prefixes & unseen_all


def test_collate_pads_without_loss_or_prompt():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_mask": [True, False, False]},
                {"input_ids": [8], "labels": [8], "prompt_mask": [False]}]
    batch = wavllm.collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["prompt_mask"].tolist() == [[True, False, False], [False, False, False]]


def test_tiny_recipe_stage_switch_save_load_and_resume(tmp_path):
    """The fresh-process reload of every app is in tests/test_app_fresh_process.py."""
    out = tmp_path / "run"
    recipe = _tiny(out)
    metrics = wavllm.train_wavllm_recipe(recipe, quiet=True)
    for method in wavllm.METHODS:
        m = metrics["methods"][method]
        assert m["trained_this_run"] and len(m["history"]) == 3
        for which in ("seen", "unseen"):
            assert all(math.isfinite(v) for v in m["eval"][which].values())
    pa = json.loads((out / "prompt_aware_lora" / "adapter_config.json").read_text())
    assert pa["stage"] == 2 and pa["scale_mode"] == "output"  # the stage-1 steps ended in the switch to stage 2
    # identical first loss: both adapters start at B = 0 (the base model's output) and see the same first batch
    first = [metrics["methods"][m]["history"][0]["loss"] for m in wavllm.METHODS]
    assert first[0] == pytest.approx(first[1], rel=1e-6)

    here = metrics["methods"]["prompt_aware_lora"]["eval"]
    again = wavllm.train_wavllm_recipe(recipe, resume=True, quiet=True)  # finished methods are not retrained
    assert not any(again["methods"][m]["trained_this_run"] for m in wavllm.METHODS)
    for which in ("seen", "unseen"):  # the saved adapter loaded back: same fp32 arithmetic
        assert again["methods"]["prompt_aware_lora"]["eval"][which] == pytest.approx(here[which], rel=1e-6)


@pytest.mark.parametrize("args, field", [
    ({"heldout_paraphrases": 6}, "heldout_paraphrases"),
    ({"stage1_steps": 5, "steps": 5}, "stage1_steps"),
    ({"methods": ["dora"]}, "methods"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        wavllm.WavLLMConfig(**args)


def test_bad_recipe_names_the_field(tmp_path):
    with pytest.raises(RecipeError, match="method.name"):
        load_recipe(TINY, ["method.name=lora", "method.config={r: 4}"])
    with pytest.raises(RecipeError, match="stage"):
        load_recipe(TINY, ["method.config.stage=1"])
    with pytest.raises(RecipeError, match="whole_input"):
        load_recipe(TINY, ["method.config.no_prompt=whole_input"])
    with pytest.raises(RecipeError, match="trainer.args.step"):
        load_recipe(TINY, ["trainer.args.step=3"])
