"""Short, equal-budget training runs of peft-ext's optimizers and initialisers for LoRA on MiniLM sentiment.

What it measures: sentiment with ``all-MiniLM-L6-v2`` (``peft_ext.data.minilm_path()``,
``AutoModelForSequenceClassification``, 2 labels) on the VADER movie-review snippets
(``peft_ext.data.load_movie_reviews(seed)``). Every method gets the same budget: the same seed, the first
``--p1-train`` (1,600) training snippets and the first ``--p1-eval`` (600) test snippets, ``max_length`` 64, batch 16,
``--p1-epochs`` (2) epochs, a linear schedule without warm-up to 0, through ``transformers.Trainer`` with
``optimizers=(optimizer, None)`` (the Trainer adds the linear schedule). Methods (``--p1-methods``, all by default):

* **LoRA** (``lora``): ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
  task_type=SEQ_CLS)`` and ``torch.optim.AdamW`` (weight decay 0) at ``--lora-lr`` (2e-3) over every trainable
  parameter.
* **LoRA-Pro** (``lorapro``): the same LoRA config but ``lora_dropout=0`` (the paper and official code; LoRA-Pro's
  equivalent gradient assumes no dropout and warns otherwise), and ``peft_ext.optim.create_lorapro_optimizer``.
  LoRA-Pro's update is, to first order, a full-size Adam step projected onto the LoRA tangent space, so its learning
  rate lives on the full fine-tuning scale: ``--lorapro-lr`` (1e-4, the scale of the LoRA-GA / LoRA-Pro GLUE runs).
  Its second parameter group (everything that is not a LoRA pair: the classifier head, which ``task_type=SEQ_CLS``
  puts in ``modules_to_save``) gets the LoRA run's ``--lora-lr``, so the head is not what the comparison measures.
  LoRA-Pro is slower per step (full-size moments, r×r solves), so time-to-target is reported beside steps.
* **ALLoRA** (``allora``): ``peft_ext.optim.allora_lora_config(r=8, ...)`` (dropout 0, scaling 1) and
  ``peft_ext.optim.create_allora_optimizer(model, lr, eta=2.0, weight_decay=0)`` at ``--allora-lr`` (2e-3); the head
  is in its plain-AdamW group.
* **LoRA-GA (paper init)** (``loraga``): the LoRA run's config, optimizer and learning rate, with the adapter
  initialised by ``peft_ext.init.lora_ga_init`` (the official initialisation: direction ArB2r, "stable" scale with
  γ = 16, no singular values; the base weights offset so the start equals the base model) from the mean gradient of
  ``--loraga-batches`` (8) training batches of 16.
* **LoRA-SB** (``lorasb``): ``peft_ext.LoraSBConfig(r=24, init="gradient")`` (α = r; A and B frozen, only the 24×24 R
  and the head train) initialised by ``peft_ext.init.lora_sb_init`` from the summed gradient of ``--lorasb-samples``
  (32) training snippets; AdamW at ``--lorasb-lr`` (1e-2: R-only training needs larger steps than LoRA's 2e-3 in this
  budget; the same value in ``scripts/repro_lowrank.py``).

Every optimizer is checked to hold every trainable parameter (the head included). Reported per method: the first
logged step (logging every ``--p1-log-steps`` = 5 steps; the Trainer logs the mean loss of those steps) at which the
smoothed training loss — the mean of the last ``--p1-smooth`` (4) logged values, i.e. about the last 20 steps — is at
most ``--target-loss`` (0.55), or "not reached"; the wall time to that step (train time × step / total steps); final
eval accuracy and loss; train time (``Trainer.train``); trainable parameters; optimizer-state bytes (every tensor in
``optimizer.state`` after training: AdamW's two moments per parameter, LoRA-Pro's full-size moments per pair).

Rerun (from the repository root)::

    .venv/bin/python scripts/bench_optimizers.py                # every method, ~6-8 min on 2 busy cores
    .venv/bin/python scripts/bench_optimizers.py --p1-methods lora,lorapro
    .venv/bin/python scripts/bench_optimizers.py --quick        # 64 / 32 snippets, 1 epoch: a smoke test (< 1 min)
    .venv/bin/python scripts/bench_optimizers.py --threads 2 --out results/bench_optimizers_2t.json

Options: ``--quick`` (the sizes above become 64 train / 32 eval snippets, 1 epoch, logging every step, smoothing over
2 logs), ``--threads`` (default 1: ``torch.set_num_threads``; on a machine other processes keep busy one thread
avoids OpenMP threads spinning on descheduled siblings), ``--seed`` (0), ``--out``, and the sizes, learning rates and
method settings named above (``--help`` lists them with their defaults). The markdown table is printed; everything
(settings, environment, load averages, per-method loss curves) is written to ``--out`` (default
``results/bench_optimizers.json``; the results sit under its ``part1`` key) with ``peft_ext._io.atomic_write_json``.
``HF_HUB_OFFLINE=1`` is set; nothing is downloaded (the data and model helpers read local caches). Runs are short:
numbers show early-training behaviour at one seed, not converged quality, and timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import benchlib  # first: it sets HF_HUB_OFFLINE before transformers is imported
import torch
import transformers
from benchlib import fmt, optimizer_state_bytes, seed_everything, trainable_param_count, unique_params
from peft import LoraConfig, TaskType, get_peft_model
from transformers import Trainer

P1_METHODS = ("lora", "loraga", "lorasb", "lorapro", "allora")
P1_LABELS = {"lora": "LoRA", "loraga": "LoRA-GA (paper init)", "lorasb": "LoRA-SB r=24", "lorapro": "LoRA-Pro",
             "allora": "ALLoRA"}
FULL_SIZES = dict(p1_train=1600, p1_eval=600, p1_epochs=2.0, p1_log_steps=5, p1_smooth=4)
QUICK_SIZES = dict(p1_train=64, p1_eval=32, p1_epochs=1.0, p1_log_steps=1, p1_smooth=2)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse the command line; sizes left unset take the full-run or ``--quick`` defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    benchlib.add_common_options(p, out="results/bench_optimizers.json",
                                quick_help="tiny sizes: a smoke test in under a minute")
    p.add_argument("--p1-train", type=int, help=f"training snippets (default {FULL_SIZES['p1_train']})")
    p.add_argument("--p1-eval", type=int, help=f"eval snippets (default {FULL_SIZES['p1_eval']})")
    p.add_argument("--p1-epochs", type=float, help=f"epochs (default {FULL_SIZES['p1_epochs']:g})")
    p.add_argument("--p1-log-steps", type=int, help=f"Trainer logging_steps (default {FULL_SIZES['p1_log_steps']})")
    p.add_argument("--p1-smooth", type=int, help=f"logged losses averaged for the target test (default "
                   f"{FULL_SIZES['p1_smooth']})")
    p.add_argument("--p1-methods", default=",".join(P1_METHODS), help="comma-separated subset of "
                   f"{','.join(P1_METHODS)}")
    p.add_argument("--target-loss", type=float, default=0.55, help="smoothed train-loss target (default 0.55)")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA AdamW lr, also LoRA-Pro's head lr (2e-3)")
    p.add_argument("--lorapro-lr", type=float, default=1e-4, help="LoRA-Pro lr of the LoRA pairs (1e-4)")
    p.add_argument("--allora-lr", type=float, default=2e-3, help="ALLoRA lr (2e-3)")
    p.add_argument("--allora-eta", type=float, default=2.0, help="ALLoRA eta (2.0)")
    p.add_argument("--loraga-batches", type=int, default=8, help="LoRA-GA gradient-estimation batches of 16 (8)")
    p.add_argument("--lorasb-lr", type=float, default=1e-2, help="LoRA-SB AdamW lr (1e-2)")
    p.add_argument("--lorasb-samples", type=int, default=32, help="LoRA-SB gradient-estimation snippets (32)")
    args = p.parse_args(argv)
    benchlib.apply_sizes(args, FULL_SIZES, QUICK_SIZES)
    args.p1_methods = benchlib.parse_choices(p, "--p1-methods", args.p1_methods, P1_METHODS, "method")
    benchlib.set_threads(p, args.threads)
    return args


def load_sentiment(args: argparse.Namespace):
    """Tokenizer plus tokenized train / eval splits (the first ``p1_train`` / ``p1_eval`` snippets, max_length 64)."""
    from transformers import AutoTokenizer

    from peft_ext.data import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return (tokenizer, *benchlib.sentiment_data(tokenizer, args.p1_train, args.p1_eval, args.seed, max_length=64))


def build_p1_model(method: str, args: argparse.Namespace, data_for_init=None):
    """A seeded MiniLM classifier wrapped in PEFT with the method's LoRA config, and the method's optimizer.

    Returns ``(model, optimizer, settings)``; ``settings`` records config and learning rates for the JSON. Raises if
    the optimizer misses any trainable parameter (the classifier head in ``modules_to_save`` must be in it).
    """
    from transformers import AutoModelForSequenceClassification

    from peft_ext.data import minilm_path
    from peft_ext.optim import allora_lora_config, create_allora_optimizer, create_lorapro_optimizer

    seed_everything(args.seed)  # identical head init and LoRA A init for every method
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    targets = ["query", "value"]
    if method == "allora":
        config = allora_lora_config(r=8, target_modules=targets, task_type=TaskType.SEQ_CLS)
    elif method == "lorasb":
        from peft_ext import LoraSBConfig

        config = LoraSBConfig(r=24, init="gradient", target_modules=targets, task_type=TaskType.SEQ_CLS)
    else:  # LoRA-Pro: no dropout, as in the paper and the official code (its equivalent gradient assumes none)
        dropout = 0.0 if method == "lorapro" else 0.1
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                            task_type=TaskType.SEQ_CLS)
    model = get_peft_model(base, config)
    init_note = None
    if method in ("loraga", "lorasb"):
        from transformers import DataCollatorWithPadding

        tokenizer, train = data_for_init[0], data_for_init[1]
        collate = DataCollatorWithPadding(tokenizer)
        if method == "loraga":
            from peft_ext.init import lora_ga_init

            n = min(args.loraga_batches * 16, len(train))
            batches = [collate([train[i] for i in range(j, min(j + 16, n))]) for j in range(0, n, 16)]
            lora_ga_init(model, batches, direction="ArB2r", scale="stable", gamma=16)
            init_note = f"lora_ga_init on {len(batches)} batches of 16"
        else:
            from peft_ext.init import lora_sb_init

            loader = torch.utils.data.DataLoader(train, batch_size=16, collate_fn=collate)
            total = int(args.p1_epochs * len(train) / 16)
            lora_sb_init(model, loader, num_samples=args.lorasb_samples, lr=args.lorasb_lr, total_steps=total)
            init_note = f"lora_sb_init on {args.lorasb_samples} snippets"
    if method in ("lora", "loraga"):
        optimizer = torch.optim.AdamW(
            unique_params(p for p in model.parameters() if p.requires_grad), lr=args.lora_lr, weight_decay=0.0
        )
        lrs = {"all": args.lora_lr}
    elif method == "lorasb":
        optimizer = torch.optim.AdamW(
            unique_params(p for p in model.parameters() if p.requires_grad), lr=args.lorasb_lr, weight_decay=0.0
        )
        lrs = {"all": args.lorasb_lr}
    elif method == "lorapro":
        optimizer = create_lorapro_optimizer(model, lr=args.lorapro_lr)
        for group in optimizer.param_groups:
            if not group.get("lorapro", False):
                group["lr"] = args.lora_lr  # head (modules_to_save): same lr as in the LoRA run
        lrs = {"lora_pairs": args.lorapro_lr, "other (head)": args.lora_lr}
    elif method == "allora":
        optimizer = create_allora_optimizer(model, lr=args.allora_lr, eta=args.allora_eta, weight_decay=0.0)
        lrs = {"all": args.allora_lr, "eta": args.allora_eta}
    else:
        raise ValueError(method)
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_opt]
    if missing:
        raise RuntimeError(f"{method}: optimizer misses trainable parameters {missing[:5]}")
    head = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    settings = {
        "init": init_note,
        "lora_config": {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                        "target_modules": sorted(config.target_modules), "modules_to_save": config.modules_to_save},
        "optimizer": type(optimizer).__name__,
        "lr": lrs,
        "head_params_in_optimizer": head,
    }
    return model, optimizer, settings


def steps_to_target(log_history: list[dict], target: float, window: int) -> tuple[Optional[int], list]:
    """First logged step whose smoothed loss (mean of the last ``window`` logged losses) is <= ``target``.

    Returns ``(step or None, [(step, loss, smoothed), ...])``.
    """
    curve, losses, hit = [], [], None
    for entry in log_history:
        if "loss" in entry and "step" in entry and "eval_loss" not in entry:
            losses.append(float(entry["loss"]))
            smoothed = sum(losses[-window:]) / len(losses[-window:])
            curve.append((int(entry["step"]), losses[-1], smoothed))
            if hit is None and smoothed <= target:
                hit = int(entry["step"])
    return hit, curve


def run_p1_method(method: str, data, args: argparse.Namespace, workdir: str) -> dict:
    """Train one method with ``Trainer`` on the shared budget and evaluate it; returns its result row."""
    from transformers import DataCollatorWithPadding

    tokenizer, train, test = data
    model, optimizer, settings = build_p1_model(method, args, data)
    n_trainable = trainable_param_count(model)
    targs = benchlib.training_arguments(
        os.path.join(workdir, f"p1-{method}"), args.seed,
        per_device_train_batch_size=16, per_device_eval_batch_size=64, num_train_epochs=args.p1_epochs,
        learning_rate=args.lora_lr, logging_steps=args.p1_log_steps,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=train, eval_dataset=test, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=benchlib.accuracy_metrics,
        optimizers=(optimizer, None),
    )
    load_before = benchlib.load_average()
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    metrics = trainer.evaluate()
    total_steps = int(out.global_step)
    hit, curve = steps_to_target(trainer.state.log_history, args.target_loss, args.p1_smooth)
    row = {
        "method": method,
        "status": "ran",
        "steps": total_steps,
        "steps_to_target": hit,
        "time_to_target_s": None if hit is None else train_s * hit / total_steps,
        "final_train_loss_smoothed": curve[-1][2] if curve else None,
        "eval_accuracy": metrics.get("eval_accuracy"),
        "eval_loss": metrics.get("eval_loss"),
        "train_s": train_s,
        "s_per_step": train_s / max(total_steps, 1),
        "trainable_params": n_trainable,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "loss_curve": [{"step": s, "loss": loss, "smoothed": sm} for s, loss, sm in curve],
        "load_average_before": load_before,
        **settings,
    }
    del trainer, model, optimizer
    return row


def run_part1(args: argparse.Namespace, workdir: str) -> dict:
    """Run every requested method on the same data and budget."""
    data = load_sentiment(args)
    rows = []
    for method in args.p1_methods:
        print(f"[part 1] {method} ...", flush=True)
        row = run_p1_method(method, data, args, workdir)
        print(f"[part 1] {method}: {row['steps']} steps in {row['train_s']:.1f} s, eval acc "
              f"{row['eval_accuracy']:.3f}", flush=True)
        rows.append(row)
    return {
        "settings": {
            "model": "all-MiniLM-L6-v2", "train_snippets": args.p1_train, "eval_snippets": args.p1_eval,
            "max_length": 64, "batch_size": 16, "epochs": args.p1_epochs, "schedule": "linear, no warm-up",
            "logging_steps": args.p1_log_steps, "smooth_window_logs": args.p1_smooth, "target_loss": args.target_loss,
            "seed": args.seed,
        },
        "rows": rows,
    }


def part1_table(result: dict) -> str:
    """Markdown table of the results."""
    target = result["settings"]["target_loss"]
    head = ["method", "lr", f"steps to loss ≤ {target:g}", "time to target s", "final eval acc", "final eval loss",
            "train s", "s/step", "trainable params", "optimizer state MiB"]
    rows = []
    for r in result["rows"]:
        if r["status"] != "ran":
            rows.append([P1_LABELS.get(r["method"], r["method"]), r["status"]] + ["–"] * (len(head) - 2))
            continue
        lr = ", ".join(f"{k} {v:g}" if k != "all" else f"{v:g}" for k, v in r["lr"].items())
        rows.append([
            P1_LABELS[r["method"]], lr,
            f"{r['steps_to_target']} / {r['steps']}" if r["steps_to_target"] is not None else
            f"not reached / {r['steps']}",
            fmt(r["time_to_target_s"], ".1f"), fmt(r["eval_accuracy"], ".3f"), fmt(r["eval_loss"], ".4f"),
            fmt(r["train_s"], ".1f"), fmt(r["s_per_step"], ".3f"), f"{r['trainable_params']:,}",
            fmt(r["optimizer_state_bytes"] / benchlib.MIB, ".2f"),
        ])
    return benchlib.markdown(head, rows)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark, print the table and write the JSON."""
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return benchlib.run_training_benchmark("bench_optimizers", args, argv, "part1",
                                           "Part 1 — MiniLM sentiment, equal budget", run_part1, part1_table)


if __name__ == "__main__":
    sys.exit(main())
