"""Evaluating a trained or saved adapter: eval loss and accuracy at every rank the recipe asks for, and scored
generated answers on GSM / BFCL."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..recipe import Recipe
from .data import _collator, _takes_prompt_mask, causal_lm_pairs, load_data, load_tokenizer_and_model
from .reporting import format_table


def _accuracy(eval_pred) -> dict:
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_pred.label_ids).mean())}


def ranks_to_evaluate(recipe: Recipe, model) -> list:
    """The DyLoRA ranks the recipe asks to evaluate ('all' → 1..r), or [None] for a single evaluation."""
    ranks = recipe.evaluation.ranks
    if ranks is None:
        return [None]
    from ..tuners.dylora import dylora_layers, max_rank

    if not dylora_layers(model):
        raise ValueError(f"evaluation.ranks applies to DyLoRA adapters; method.name is {recipe.method.name!r}.")
    r = max_rank(model)
    ranks = list(range(1, r + 1)) if ranks == "all" else ranks
    bad = [b for b in ranks if b > r]
    if bad:
        raise ValueError(f"evaluation.ranks must be within 1..r (1..{r}); got {bad}.")
    return ranks


def generation_accuracy(model, tokenizer, recipe: Recipe, rows) -> float:
    """Greedy-generate answers for the first ``evaluation.generate`` eval rows and score them with the data set's
    own scorer (``score_gsm`` / ``score_bfcl``); returns the mean score."""
    import torch

    from ..data.bfcl import score_bfcl
    from ..data.gsm import score_gsm

    score = score_gsm if recipe.data.name == "gsm" else score_bfcl
    rows = rows.select(range(min(recipe.evaluation.generate, len(rows))))
    prompts = [prompt for prompt, _ in causal_lm_pairs(recipe.data.name, rows[:])]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    scores = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), 8):
            enc = tokenizer(prompts[start : start + 8], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            if _takes_prompt_mask(recipe):
                enc["prompt_mask"] = enc["attention_mask"].bool()  # the whole (left-padded) question is the prompt
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=recipe.evaluation.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            scores += [score(text, answer) for text, answer in zip(texts, rows["answer"][start : start + 8])]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return float(np.mean(scores)) if scores else float("nan")


def evaluate_model(trainer, model, recipe: Recipe, tokenizer=None, raw_eval=None) -> list[dict]:
    """One row per evaluated rank: ``{"rank", "eval_loss", "accuracy"?}`` (accuracy from the classifier, or from
    scored generations when ``evaluation.generate`` is set)."""
    rows = []
    ranks = ranks_to_evaluate(recipe, model)
    keep = model.get_rank() if ranks != [None] else None
    for b in ranks:
        if b is not None:
            model.set_rank(b)
        metrics = trainer.evaluate()
        row = {"rank": b, "eval_loss": metrics["eval_loss"]}
        if "eval_accuracy" in metrics:
            row["accuracy"] = metrics["eval_accuracy"]
        if recipe.evaluation.generate:
            row["accuracy"] = generation_accuracy(model, tokenizer, recipe, raw_eval)
        rows.append(row)
    if keep is not None:
        model.set_rank(keep)
    return rows


def evaluate(recipe: Recipe, adapter_dir: str, quiet: bool = False) -> dict:
    """Evaluate a saved adapter on the recipe's evaluation split (at every rank the recipe asks for)."""
    from peft import PeftModel
    from transformers import Trainer

    from .training import _training_args  # training imports this module: import at call time

    tokenizer, base = load_tokenizer_and_model(recipe)
    _, eval_set, raw_eval = load_data(recipe, tokenizer)
    model = PeftModel.from_pretrained(base, adapter_dir)
    with tempfile.TemporaryDirectory() as scratch:
        args = _training_args(recipe, Path(scratch), quiet=True)
        trainer = Trainer(model=model, args=args, eval_dataset=eval_set, data_collator=_collator(recipe, tokenizer),
                          compute_metrics=_accuracy if recipe.model.task == "seq_cls" else None)
        rows = evaluate_model(trainer, model, recipe, tokenizer, raw_eval)
    metrics = {"name": recipe.name, "method": recipe.method.name, "adapter": str(adapter_dir), "baseline": None,
               "results": rows}
    if not quiet:
        print(format_table(metrics))
    return metrics
