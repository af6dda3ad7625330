"""Short, equal-budget training runs of peft-ext's optimizers and LISA on two small real tasks.

Part 1 — sentiment with ``all-MiniLM-L6-v2`` (``peft_ext.data.minilm_path()``, ``AutoModelForSequenceClassification``,
2 labels) on the VADER movie-review snippets (``peft_ext.data.load_movie_reviews(seed)``). Every method gets the same
budget: the same seed, the first ``--p1-train`` (1,600) training snippets and the first ``--p1-eval`` (600) test
snippets, ``max_length`` 64, batch 16, ``--p1-epochs`` (2) epochs, a linear schedule without warm-up to 0, through
``transformers.Trainer`` with ``optimizers=(optimizer, None)`` (the Trainer adds the linear schedule). Methods:

* **LoRA**: ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"], task_type=SEQ_CLS)``
  and ``torch.optim.AdamW`` (weight decay 0) at ``--lora-lr`` (2e-3) over every trainable parameter.
* **LoRA-Pro**: the same LoRA config but ``lora_dropout=0`` (the paper and official code; LoRA-Pro's equivalent
  gradient assumes no dropout and warns otherwise), and ``peft_ext.optim.create_lorapro_optimizer``. LoRA-Pro's
  update is, to first order, a full-size Adam step projected onto the LoRA tangent space, so its learning rate lives
  on the full fine-tuning scale: ``--lorapro-lr`` (1e-4, the scale of the LoRA-GA / LoRA-Pro GLUE runs). Its second
  parameter group (everything that is not a LoRA pair: the classifier head, which ``task_type=SEQ_CLS`` puts in
  ``modules_to_save``) gets the LoRA run's ``--lora-lr``, so the head is not what the comparison measures.
  LoRA-Pro is slower per step (full-size moments, r×r solves), so time-to-target is reported beside steps.
* **ALLoRA**: ``peft_ext.optim.allora_lora_config(r=8, ...)`` (dropout 0, scaling 1) and
  ``peft_ext.optim.create_allora_optimizer(model, lr, eta=2.0, weight_decay=0)`` at ``--allora-lr`` (2e-3); the head
  is in its plain-AdamW group.
* **LoRA-GA (paper init)**: the LoRA run's config, optimizer and learning rate, with the adapter initialised by
  ``peft_ext.init.lora_ga_init`` (the official initialisation: direction ArB2r, "stable" scale with γ = 16, no
  singular values; the base weights offset so the start equals the base model) from the mean gradient of
  ``--loraga-batches`` (8) training batches of 16.
* **LoRA-SB**: ``peft_ext.LoraSBConfig(r=24, init="gradient")`` (α = r; A and B frozen, only the 24×24 R and the head
  train) initialised by ``peft_ext.init.lora_sb_init`` from the summed gradient of ``--lorasb-samples`` (32)
  training snippets; AdamW at ``--lorasb-lr`` (1e-2: R-only training needs larger steps than LoRA's 2e-3 in this
  budget; the same value in ``scripts/repro_lowrank.py``).

Every optimizer is checked to hold every trainable parameter (the head included). Reported per method: the first
logged step (logging every ``--p1-log-steps`` = 5 steps; the Trainer logs the mean loss of those steps) at which the
smoothed training loss — the mean of the last ``--p1-smooth`` (4) logged values, i.e. about the last 20 steps — is at
most ``--target-loss`` (0.55), or "not reached"; the wall time to that step (train time × step / total steps); final
eval accuracy and loss; train time (``Trainer.train``); trainable parameters; optimizer-state bytes (every tensor in
``optimizer.state`` after training: AdamW's two moments per parameter, LoRA-Pro's full-size moments per pair).

Part 2 — ``SmolLM2-135M-Instruct`` (``peft_ext.data.smollm2_path()``, float32) on GSM-style problems
(``peft_ext.data.load_gsm(n_train, n_test, seed)``). A training example is the chat-templated question (user turn,
generation prompt) followed by ``answer_cot`` and ``<|im_end|>``; the loss is on the answer tokens only (prompt
labels are -100), sequences are cut to ``--p2-max-length`` (192). Batch 4, ``--p2-steps`` (20) optimizer steps, linear
schedule to 0, ``transformers.Trainer`` with its default AdamW (weight decay 0). The default of 20 steps on 80 items
(one epoch) kept part 2 (then LISA and LoRA) near 7 minutes on 2 busy cores (the whole run took 800 s there;
``lisa_keep`` adds one LISA run, about a third more part 2);
``--p2-steps 30 --p2-train 120`` is the longer run. Variants (``lisa``, ``lisa_keep`` and ``lora`` by default;
``--part2-variants lisa,lisa_keep,lisa_hybrid,lora,full`` adds the hybrid mode and full FT):

* **LISA** (``lisa``): full-parameter, ``peft_ext.callbacks.LisaCallback(n_layers=2, interval_steps=10, seed)``
  (γ = 2, K = 10; embeddings / final norm / tied LM head always train), lr ``--lisa-lr`` (1e-5); the model is not
  wrapped in PEFT. Switched-off blocks lose their Adam state (``reset_state=True``, our default).
* **LISA, state kept** (``lisa_keep``): the same with ``reset_state=False``, as the official callback behaves: the
  Adam state of every block ever active stays allocated, so its optimizer-state column grows with the blocks visited
  (the memory the reset saves).
* **LISA hybrid** (``lisa_hybrid``, opt-in): the LoRA model below plus ``LisaCallback(mode="hybrid")``: the γ sampled
  blocks train their base weights (lr ``--lisa-lr``), every other block its LoRA adapter (lr ``--p2-lora-lr``),
  embeddings / norm / head always (lr ``--lisa-lr``); the optimizer is built over
  ``peft_ext.callbacks.lisa.lisa_parameters(model, mode="hybrid")`` in those two groups.
* **LoRA**: ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0, target_modules=q,k,v,o_proj, task_type=CAUSAL_LM)``,
  lr ``--p2-lora-lr`` (1e-3).
* **Full FT** (opt-in, ~2x slower per step than LoRA): every parameter, lr ``--full-lr`` (1e-5).

Each variant runs in its own subprocess of this script (``--part2-variant NAME --json FILE``), so its peak resident
set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read at the end of that process) is its own: Python, torch,
the model, data, the evaluation and the training, nothing of the other variants. The RSS just after loading model and
data is reported too, so the training's share is visible. Also reported: the token-weighted mean eval loss on the
first ``--p2-test`` (32) test items before and after training, train time, the largest number of parameters that
required grad at the end of any step, and the largest optimizer state (bytes of ``optimizer.state`` tensors, at the
end of each step; ``lisa`` drops the state of switched-off blocks, ``lisa_keep`` keeps it).

Rerun (from the repository root)::

    .venv/bin/python scripts/bench_training.py                 # both parts, ~15-17 min on 2 busy cores
    .venv/bin/python scripts/bench_training.py --part 1        # MiniLM sentiment only
    .venv/bin/python scripts/bench_training.py --part 2 --part2-variants lisa,lora
    .venv/bin/python scripts/bench_training.py --quick         # tiny sizes: a smoke test (< 2 minutes)
    .venv/bin/python scripts/bench_training.py --threads 2 --out results/bench_training_2t.json

Markdown tables are printed; everything (settings, environment, load averages, per-method loss curves, subprocess
results) is written to ``--out`` (default ``results/bench_training.json``) with ``peft_ext._io.atomic_write_json``.
``--threads`` (default 1) calls ``torch.set_num_threads``; on a machine other processes keep busy one thread avoids
OpenMP threads spinning on descheduled siblings. ``HF_HUB_OFFLINE=1`` is set; nothing is downloaded (the data and
model helpers read local caches). Runs are short: numbers show early-training behaviour at one seed, not converged
quality, and timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from peft_ext._io import atomic_write_json  # noqa: E402

MIB = 2**20
P1_METHODS = ("lora", "loraga", "lorasb", "lorapro", "allora")
P2_VARIANTS = ("lisa", "lisa_keep", "lisa_hybrid", "lora", "full")
P2_DEFAULT_VARIANTS = ("lisa", "lisa_keep", "lora")  # full FT is ~2x slower per step: opt in with --part2-variants
P2_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

FULL_SIZES = dict(
    p1_train=1600, p1_eval=600, p1_epochs=2.0, p1_log_steps=5, p1_smooth=4,
    p2_train=80, p2_test=32, p2_steps=20, p2_max_length=192, p2_log_steps=5,
)
QUICK_SIZES = dict(
    p1_train=64, p1_eval=32, p1_epochs=1.0, p1_log_steps=1, p1_smooth=2,
    p2_train=8, p2_test=8, p2_steps=2, p2_max_length=96, p2_log_steps=1,
)


# ------------------------------------------------------------------------------------------------------ common
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse the command line; sizes left unset take the full-run or ``--quick`` defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in under 2 minutes")
    p.add_argument("--part", choices=["1", "2", "all"], default="all", help="which part to run (default all)")
    p.add_argument("--out", default="results/bench_training.json", help="JSON output path")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; also for part 2's "
                   "subprocesses)")
    p.add_argument("--seed", type=int, default=0, help="seed of data splits, model init and training (default 0)")
    # part 1
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
    # part 2
    p.add_argument("--p2-train", type=int, help=f"GSM training items (default {FULL_SIZES['p2_train']})")
    p.add_argument("--p2-test", type=int, help=f"GSM eval items (default {FULL_SIZES['p2_test']})")
    p.add_argument("--p2-steps", type=int, help=f"optimizer steps (default {FULL_SIZES['p2_steps']})")
    p.add_argument("--p2-max-length", type=int, help=f"tokens per example (default {FULL_SIZES['p2_max_length']})")
    p.add_argument("--p2-log-steps", type=int, help=f"Trainer logging_steps (default {FULL_SIZES['p2_log_steps']})")
    p.add_argument("--p2-batch", type=int, default=4, help="train batch size (default 4)")
    p.add_argument("--part2-variants", default=",".join(P2_DEFAULT_VARIANTS), help="comma-separated subset of "
                   f"{','.join(P2_VARIANTS)} (default {','.join(P2_DEFAULT_VARIANTS)}; add full for full FT)")
    p.add_argument("--lisa-lr", type=float, default=1e-5, help="LISA AdamW lr (1e-5)")
    p.add_argument("--lisa-layers", type=int, default=2, help="LISA gamma (2)")
    p.add_argument("--lisa-interval", type=int, default=10, help="LISA K (10)")
    p.add_argument("--p2-lora-lr", type=float, default=1e-3, help="part-2 LoRA lr (1e-3)")
    p.add_argument("--full-lr", type=float, default=1e-5, help="full fine-tuning lr (1e-5)")
    # internal: one part-2 variant in this process
    p.add_argument("--part2-variant", choices=P2_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = QUICK_SIZES if args.quick else FULL_SIZES
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.p1_methods = [m.strip() for m in args.p1_methods.split(",") if m.strip()]
    args.part2_variants = [v.strip() for v in args.part2_variants.split(",") if v.strip()]
    for m in args.p1_methods:
        if m not in P1_METHODS:
            p.error(f"--p1-methods: unknown method {m!r}")
    for v in args.part2_variants:
        if v not in P2_VARIANTS:
            p.error(f"--part2-variants: unknown variant {v!r}")
    if args.part2_variant and not args.json:
        p.error("--part2-variant needs --json")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    return args


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (``transformers.set_seed``)."""
    transformers.set_seed(seed)


def unique_params(params) -> list[torch.nn.Parameter]:
    """The parameters of an iterable with duplicates (tied weights) removed, in first-seen order."""
    return list({id(p): p for p in params}.values())


def trainable_param_count(model: torch.nn.Module) -> int:
    """Number of elements of the (unique) parameters that require grad."""
    return sum(p.numel() for p in unique_params(p for p in model.parameters() if p.requires_grad))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (unwrapping accelerate's ``AcceleratedOptimizer``)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )


def rss_mib() -> Optional[float]:
    """Current resident set size of this process in MiB (``/proc/self/status`` VmRSS), None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def load_average() -> Optional[list[float]]:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def training_arguments(output_dir: str, args: argparse.Namespace, **overrides) -> TrainingArguments:
    """Shared ``TrainingArguments``: CPU, no saving, no reporting, no progress bars, linear schedule, seeded."""
    kwargs = dict(
        output_dir=output_dir,
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        logging_strategy="steps",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def fmt(value: Any, spec: str = "") -> str:
    """Format a table cell: ``None`` as an en dash, numbers with ``spec``."""
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    return str(value)


def markdown(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table from a header and rows of cell strings."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ part 1
def load_sentiment(args: argparse.Namespace):
    """Tokenizer plus tokenized train / eval splits (the first ``p1_train`` / ``p1_eval`` snippets, max_length 64)."""
    from transformers import AutoTokenizer

    from peft_ext.data import load_movie_reviews, minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_movie_reviews(seed=args.seed)
    if args.p1_train > len(data["train"]) or args.p1_eval > len(data["test"]):
        raise SystemExit(f"asked for {args.p1_train}/{args.p1_eval} snippets; the splits have "
                         f"{len(data['train'])}/{len(data['test'])}")

    def tok(batch):
        return tokenizer(batch["text"], truncation=True, max_length=64)

    train = data["train"].select(range(args.p1_train)).map(tok, batched=True, remove_columns=["text", "rating"])
    test = data["test"].select(range(args.p1_eval)).map(tok, batched=True, remove_columns=["text", "rating"])
    return tokenizer, train.rename_column("label", "labels"), test.rename_column("label", "labels")


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
    """Train one part-1 method with ``Trainer`` on the shared budget and evaluate it; returns its result row."""
    import numpy as np
    from transformers import DataCollatorWithPadding

    tokenizer, train, test = data
    model, optimizer, settings = build_p1_model(method, args, data)
    n_trainable = trainable_param_count(model)
    targs = training_arguments(
        os.path.join(workdir, f"p1-{method}"), args,
        per_device_train_batch_size=16, per_device_eval_batch_size=64, num_train_epochs=args.p1_epochs,
        learning_rate=args.lora_lr, logging_steps=args.p1_log_steps,
    )

    def compute_metrics(pred):
        """Accuracy of the argmax prediction."""
        logits, labels = pred
        return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}

    trainer = Trainer(
        model=model, args=targs, train_dataset=train, eval_dataset=test, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
        optimizers=(optimizer, None),
    )
    load_before = load_average()
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
        "loss_curve": [{"step": s, "loss": l, "smoothed": sm} for s, l, sm in curve],
        "load_average_before": load_before,
        **settings,
    }
    del trainer, model, optimizer
    return row


def run_part1(args: argparse.Namespace, workdir: str) -> dict:
    """Run every part-1 method on the same data and budget."""
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


P1_LABELS = {"lora": "LoRA", "loraga": "LoRA-GA (paper init)", "lorasb": "LoRA-SB r=24", "lorapro": "LoRA-Pro",
             "allora": "ALLoRA"}


def part1_table(result: dict) -> str:
    """Markdown table of part 1."""
    target = result["settings"]["target_loss"]
    head = ["method", "lr", f"steps to loss ≤ {target:g}", "time to target s", "final eval acc", "final eval loss",
            "train s", "s/step", "trainable params", "optimizer state MiB"]
    rows = []
    for r in result["rows"]:
        if r["status"] != "ran":
            rows.append([r["label"], r["status"]] + ["–"] * (len(head) - 2))
            continue
        lr = ", ".join(f"{k} {v:g}" if k != "all" else f"{v:g}" for k, v in r["lr"].items())
        rows.append([
            P1_LABELS[r["method"]], lr,
            f"{r['steps_to_target']} / {r['steps']}" if r["steps_to_target"] is not None else
            f"not reached / {r['steps']}",
            fmt(r["time_to_target_s"], ".1f"), fmt(r["eval_accuracy"], ".3f"), fmt(r["eval_loss"], ".4f"),
            fmt(r["train_s"], ".1f"), fmt(r["s_per_step"], ".3f"), f"{r['trainable_params']:,}",
            fmt(r["optimizer_state_bytes"] / MIB, ".2f"),
        ])
    return markdown(head, rows)


# ------------------------------------------------------------------------------------------------------ part 2
def gsm_examples(tokenizer, rows, max_length: int) -> tuple[list[dict], dict]:
    """Tokenize GSM rows: chat-templated question + ``answer_cot`` + ``<|im_end|>``, labels only on the answer.

    Returns the examples and counts of truncated / dropped ones (dropped: no answer token fits in ``max_length``).
    """
    end = tokenizer.eos_token or ""
    examples, truncated, dropped = [], 0, 0
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(row["answer_cot"] + end, add_special_tokens=False)["input_ids"]
        ids = (p_ids + a_ids)[:max_length]
        labels = ([-100] * len(p_ids) + a_ids)[:max_length]
        if len(p_ids) + len(a_ids) > max_length:
            truncated += 1
        if all(l == -100 for l in labels[1:]):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, {"n": len(examples), "truncated": truncated, "dropped": dropped}


def pad_collate(pad_id: int):
    """A collator that right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) to the batch maximum."""

    def collate(batch: list[dict]) -> dict:
        """Pad one batch of examples into tensors."""
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


@torch.no_grad()
def eval_loss(model, examples: list[dict], collate, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over the answer tokens of ``examples``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size])
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch, use_cache=False).loss) * n
        count += n
    model.train()
    return total / max(count, 1)


class StepStats(TrainerCallback):
    """Records, at the end of every optimizer step, the largest optimizer state and trainable-parameter count."""

    def __init__(self, model):
        """Watch ``model`` (for the trainable-parameter count)."""
        self.model = model
        self.max_state_bytes = 0
        self.max_trainable = 0

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        """Update the maxima from the optimizer and the model as they are after this step."""
        if optimizer is not None:
            self.max_state_bytes = max(self.max_state_bytes, optimizer_state_bytes(optimizer))
        self.max_trainable = max(self.max_trainable, trainable_param_count(self.model))


def run_part2_variant(variant: str, args: argparse.Namespace) -> dict:
    """Train one part-2 variant in this process and return its result (called in the ``--part2-variant`` child)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_ext.callbacks import LisaCallback
    from peft_ext.data import load_gsm, smollm2_path

    rss_start = rss_mib()
    seed_everything(args.seed)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    data = load_gsm(args.p2_train, args.p2_test, args.seed)
    train, train_info = gsm_examples(tokenizer, data["train"], args.p2_max_length)
    test, test_info = gsm_examples(tokenizer, data["test"], args.p2_max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = pad_collate(pad_id)

    callbacks: list = []
    optimizers = (None, None)  # the Trainer's default AdamW unless set below
    lr_label = None
    lisa = None
    if variant in ("lisa", "lisa_keep"):
        lr = args.lisa_lr
        lisa = LisaCallback(model, n_layers=args.lisa_layers, interval_steps=args.lisa_interval, seed=args.seed,
                            reset_state=variant == "lisa", mode="full")
        callbacks.append(lisa)
    elif variant in ("lora", "lisa_hybrid"):
        lr = args.p2_lora_lr
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=list(P2_LORA_TARGETS), task_type=TaskType.CAUSAL_LM))
        if variant == "lisa_hybrid":
            from peft_ext.callbacks.lisa import lisa_parameters

            lr = args.lisa_lr
            names = {id(p): n for n, p in model.named_parameters()}
            params = lisa_parameters(model, mode="hybrid")
            lora = [p for p in params if "lora_" in names[id(p)]]
            base = [p for p in params if "lora_" not in names[id(p)]]
            optimizers = (torch.optim.AdamW([{"params": base, "lr": args.lisa_lr},
                                             {"params": lora, "lr": args.p2_lora_lr}], weight_decay=0.0), None)
            lr_label = f"{args.lisa_lr:g} base / {args.p2_lora_lr:g} LoRA"
            lisa = LisaCallback(model, n_layers=args.lisa_layers, interval_steps=args.lisa_interval, seed=args.seed,
                                mode="hybrid")
            callbacks.append(lisa)
    elif variant == "full":
        lr = args.full_lr
    else:
        raise ValueError(variant)
    stats = StepStats(model)
    callbacks.append(stats)
    rss_loaded = rss_mib()

    loss_before = eval_loss(model, test, collate)
    with tempfile.TemporaryDirectory(prefix="bench_training_p2_") as tmp:
        targs = training_arguments(
            tmp, args, per_device_train_batch_size=args.p2_batch, max_steps=args.p2_steps, learning_rate=lr,
            logging_steps=args.p2_log_steps, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collate, callbacks=callbacks,
                          optimizers=optimizers)
        t0 = time.perf_counter()
        out = trainer.train()
        train_s = time.perf_counter() - t0
        optim_name = str(targs.optim) if optimizers[0] is None else type(optimizers[0]).__name__
        final_state = optimizer_state_bytes(trainer.optimizer)
        log = [e for e in trainer.state.log_history if "loss" in e]
    loss_after = eval_loss(model, test, collate)
    result = {
        "variant": variant,
        "lr": lr,
        "lr_label": lr_label,
        "optimizer": optim_name,
        "steps": int(out.global_step),
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "train_s": train_s,
        "s_per_step": train_s / max(int(out.global_step), 1),
        "total_params": sum(p.numel() for p in unique_params(model.parameters())),
        "max_trainable_params": stats.max_trainable,
        "max_optimizer_state_bytes": stats.max_state_bytes,
        "final_optimizer_state_bytes": final_state,
        "peak_rss_mib": peak_rss_mib(),
        "rss_at_start_mib": rss_start,
        "rss_after_load_mib": rss_loaded,
        "train_examples": train_info,
        "test_examples": test_info,
        "train_log": [{"step": e["step"], "loss": e["loss"]} for e in log],
        "threads": torch.get_num_threads(),
    }
    if lisa is not None:
        result["lisa"] = {"n_layers": args.lisa_layers, "interval_steps": args.lisa_interval, "mode": lisa.mode,
                          "reset_state": lisa.reset_state, "total_layers": lisa.total_layers,
                          "history": lisa.history}
    return result


def child_argv(variant: str, json_path: str, args: argparse.Namespace) -> list[str]:
    """Command line of the subprocess that runs one part-2 variant with this run's settings."""
    argv = [sys.executable, os.path.abspath(__file__), "--part2-variant", variant, "--json", json_path,
            "--threads", str(args.threads), "--seed", str(args.seed)]
    for name in ("p2_train", "p2_test", "p2_steps", "p2_max_length", "p2_log_steps", "p2_batch", "lisa_lr",
                 "lisa_layers", "lisa_interval", "p2_lora_lr", "full_lr"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.quick:
        argv.append("--quick")
    return argv


def run_part2(args: argparse.Namespace, workdir: str) -> dict:
    """Run every part-2 variant in its own subprocess and collect the results (a failed child gives an error row)."""
    rows = []
    for variant in args.part2_variants:
        json_path = os.path.join(workdir, f"p2-{variant}.json")
        print(f"[part 2] {variant} (subprocess) ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(child_argv(variant, json_path, args), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not os.path.exists(json_path):
            tail = (proc.stdout + proc.stderr)[-3000:]
            print(f"[part 2] {variant} FAILED (rc {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
            rows.append({"variant": variant, "error": f"rc {proc.returncode}", "output_tail": tail})
            continue
        with open(json_path) as f:
            row = json.load(f)
        row["subprocess_wall_s"] = wall
        print(f"[part 2] {variant}: {row['steps']} steps in {row['train_s']:.1f} s, eval loss "
              f"{row['eval_loss_before']:.4f} -> {row['eval_loss_after']:.4f}, peak RSS {row['peak_rss_mib']:.0f} MiB",
              flush=True)
        rows.append(row)
    return {
        "settings": {
            "model": "SmolLM2-135M-Instruct (float32)", "train_items": args.p2_train, "test_items": args.p2_test,
            "steps": args.p2_steps, "batch_size": args.p2_batch, "max_length": args.p2_max_length,
            "schedule": "linear, no warm-up", "loss": "answer_cot tokens (+ <|im_end|>) only", "seed": args.seed,
            "memory": "ru_maxrss of a separate process per variant",
        },
        "rows": rows,
    }


P2_LABELS = {"lisa": "LISA (γ=2, K=10, full-param)", "lisa_keep": "LISA, state kept (official)",
             "lisa_hybrid": "LISA hybrid + LoRA r=8", "lora": "LoRA r=8 q,k,v,o", "full": "Full FT"}
LISA_LABEL_TAILS = {"lisa": "full-param", "lisa_keep": "full-param, state kept (official)",
                    "lisa_hybrid": "hybrid: base of sampled + LoRA r=8 elsewhere"}


def part2_table(result: dict) -> str:
    """Markdown table of part 2."""
    head = ["variant", "lr", "eval loss before", "eval loss after", "Δ", "train s", "s/step",
            "trainable params (max)", "peak RSS MiB", "RSS after load MiB", "optimizer state MiB (max)"]
    rows = []
    for r in result["rows"]:
        label = P2_LABELS.get(r["variant"], r["variant"])
        if "error" in r:
            rows.append([label, f"FAILED: {r['error']}"] + ["–"] * (len(head) - 2))
            continue
        if r["variant"] in LISA_LABEL_TAILS:
            label = (f"LISA (γ={r['lisa']['n_layers']}, K={r['lisa']['interval_steps']}, "
                     f"{LISA_LABEL_TAILS[r['variant']]})")
        rows.append([
            label, r.get("lr_label") or f"{r['lr']:g}", fmt(r["eval_loss_before"], ".4f"), fmt(r["eval_loss_after"], ".4f"),
            fmt(r["eval_loss_after"] - r["eval_loss_before"], "+.4f"), fmt(r["train_s"], ".1f"),
            fmt(r["s_per_step"], ".2f"), f"{r['max_trainable_params']:,}", fmt(r["peak_rss_mib"], ".0f"),
            fmt(r["rss_after_load_mib"], ".0f"), fmt(r["max_optimizer_state_bytes"] / MIB, ".1f"),
        ])
    return markdown(head, rows)


# ------------------------------------------------------------------------------------------------------ main
def environment() -> dict:
    """Versions and machine facts for the JSON."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: Optional[list[str]] = None) -> int:
    """Run the requested parts, print the tables and write the JSON (or, as a child, one part-2 variant)."""
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.part2_variant:
        atomic_write_json(args.json, run_part2_variant(args.part2_variant, args))
        return 0
    t_start = time.perf_counter()
    payload: dict = {
        "benchmark": "bench_training", "argv": sys.argv[1:] if argv is None else argv, "quick": args.quick,
        "environment": environment(), "load_average_start": load_average(),
    }
    tables = []
    with tempfile.TemporaryDirectory(prefix="bench_training_") as workdir:
        if args.part in ("1", "all"):
            t0 = time.perf_counter()
            payload["part1"] = run_part1(args, workdir)
            payload["part1"]["wall_s"] = time.perf_counter() - t0
            tables.append(("Part 1 — MiniLM sentiment, equal budget", part1_table(payload["part1"])))
        if args.part in ("2", "all"):
            t0 = time.perf_counter()
            payload["part2"] = run_part2(args, workdir)
            payload["part2"]["wall_s"] = time.perf_counter() - t0
            tables.append(("Part 2 — SmolLM2-135M-Instruct on GSM-style problems", part2_table(payload["part2"])))
    payload["load_average_end"] = load_average()
    payload["wall_s"] = time.perf_counter() - t_start
    for title, table in tables:
        print(f"\n### {title}\n\n{table}")
    print(f"\nwall time {payload['wall_s']:.0f} s; load average start {payload['load_average_start']}, end "
          f"{payload['load_average_end']}")
    path = atomic_write_json(args.out, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
