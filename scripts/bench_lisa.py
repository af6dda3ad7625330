"""LISA (layerwise importance sampling) against LoRA on SmolLM2-135M-Instruct with GSM-style problems, equal budget.

What it measures: ``SmolLM2-135M-Instruct`` (``peft_ext.data.smollm2_path()``, float32) on GSM-style problems
(``peft_ext.data.load_gsm(n_train, n_test, seed)``). A training example is the chat-templated question (user turn,
generation prompt) followed by ``answer_cot`` and ``<|im_end|>``; the loss is on the answer tokens only (prompt
labels are -100), sequences are cut to ``--p2-max-length`` (192). Batch 4, ``--p2-steps`` (20) optimizer steps, linear
schedule to 0, ``transformers.Trainer`` with its default AdamW (weight decay 0). The default of 20 steps on 80 items
(one epoch) kept this benchmark (then LISA and LoRA) near 7 minutes on 2 busy cores; ``lisa_keep`` adds one LISA run,
about a third more; ``--p2-steps 30 --p2-train 120`` is the longer run. Variants (``lisa``, ``lisa_keep`` and
``lora`` by default; ``--part2-variants lisa,lisa_keep,lisa_hybrid,lora,full`` adds the hybrid mode and full FT):

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
* **LoRA** (``lora``): ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0, target_modules=q,k,v,o_proj,
  task_type=CAUSAL_LM)``, lr ``--p2-lora-lr`` (1e-3).
* **Full FT** (``full``, opt-in, ~2x slower per step than LoRA): every parameter, lr ``--full-lr`` (1e-5).

Each variant runs in its own subprocess of this script (``--part2-variant NAME --json FILE``), so its peak resident
set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read at the end of that process) is its own: Python, torch,
the model, data, the evaluation and the training, nothing of the other variants. The RSS just after loading model and
data is reported too, so the training's share is visible. Also reported: the token-weighted mean eval loss on the
first ``--p2-test`` (32) test items before and after training, train time, the largest number of parameters that
required grad at the end of any step, and the largest optimizer state (bytes of ``optimizer.state`` tensors, at the
end of each step; ``lisa`` drops the state of switched-off blocks, ``lisa_keep`` keeps it).

Rerun (from the repository root)::

    .venv/bin/python scripts/bench_lisa.py                     # lisa, lisa_keep, lora: ~9 min on 2 busy cores
    .venv/bin/python scripts/bench_lisa.py --part2-variants lisa,lora
    .venv/bin/python scripts/bench_lisa.py --quick             # 8 items, 2 steps: a smoke test (~1 min)
    .venv/bin/python scripts/bench_lisa.py --threads 2 --out results/bench_lisa_2t.json

Options: ``--quick`` (8 train / 8 test items, 2 steps, 96 tokens, logging every step), ``--threads`` (default 1:
``torch.set_num_threads``, also in the variants' subprocesses; on a machine other processes keep busy one thread
avoids OpenMP threads spinning on descheduled siblings), ``--seed`` (0), ``--out``, ``--p2-batch`` (4), and the sizes,
learning rates and LISA settings named above (``--lisa-layers`` γ, ``--lisa-interval`` K; ``--help`` lists them with
their defaults). The markdown table is printed; everything (settings, environment, load averages, per-variant
results with loss curves and LISA's layer history) is written to ``--out`` (default ``results/bench_lisa.json``; the
results sit under its ``part2`` key) with ``peft_ext._io.atomic_write_json``. ``HF_HUB_OFFLINE=1`` is set; nothing is
downloaded (the data and model helpers read local caches). Runs are short: numbers show early-training behaviour at
one seed, not converged quality, and timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import benchlib  # first: it sets HF_HUB_OFFLINE before transformers is imported
import torch
import transformers
from benchlib import fmt, optimizer_state_bytes, seed_everything, trainable_param_count, unique_params
from peft import LoraConfig, TaskType, get_peft_model
from transformers import Trainer, TrainerCallback

from peft_ext._io import atomic_write_json

P2_VARIANTS = ("lisa", "lisa_keep", "lisa_hybrid", "lora", "full")
P2_DEFAULT_VARIANTS = ("lisa", "lisa_keep", "lora")  # full FT is ~2x slower per step: opt in with --part2-variants
P2_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
P2_LABELS = {"lisa": "LISA (γ=2, K=10, full-param)", "lisa_keep": "LISA, state kept (official)",
             "lisa_hybrid": "LISA hybrid + LoRA r=8", "lora": "LoRA r=8 q,k,v,o", "full": "Full FT"}
LISA_LABEL_TAILS = {"lisa": "full-param", "lisa_keep": "full-param, state kept (official)",
                    "lisa_hybrid": "hybrid: base of sampled + LoRA r=8 elsewhere"}
FULL_SIZES = dict(p2_train=80, p2_test=32, p2_steps=20, p2_max_length=192, p2_log_steps=5)
QUICK_SIZES = dict(p2_train=8, p2_test=8, p2_steps=2, p2_max_length=96, p2_log_steps=1)
# settings a variant's subprocess gets from this run's command line (besides --threads, --seed and --quick)
CHILD_OPTIONS = ("p2_train", "p2_test", "p2_steps", "p2_max_length", "p2_log_steps", "p2_batch", "lisa_lr",
                 "lisa_layers", "lisa_interval", "p2_lora_lr", "full_lr")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse the command line; sizes left unset take the full-run or ``--quick`` defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    benchlib.add_common_options(p, out="results/bench_lisa.json", quick_help="tiny sizes: a smoke test in about a "
                                "minute")
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
    p.add_argument("--p2-lora-lr", type=float, default=1e-3, help="LoRA lr (1e-3)")
    p.add_argument("--full-lr", type=float, default=1e-5, help="full fine-tuning lr (1e-5)")
    # internal: one variant in this process
    p.add_argument("--part2-variant", choices=P2_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    benchlib.apply_sizes(args, FULL_SIZES, QUICK_SIZES)
    args.part2_variants = benchlib.parse_choices(p, "--part2-variants", args.part2_variants, P2_VARIANTS, "variant")
    if args.part2_variant and not args.json:
        p.error("--part2-variant needs --json")
    benchlib.set_threads(p, args.threads)
    return args


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
        if all(label == -100 for label in labels[1:]):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, {"n": len(examples), "truncated": truncated, "dropped": dropped}


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
    """Train one variant in this process and return its result (called in the ``--part2-variant`` child)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_ext.callbacks import LisaCallback
    from peft_ext.data import load_gsm, smollm2_path

    rss_start = benchlib.rss_mib()
    seed_everything(args.seed)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    data = load_gsm(args.p2_train, args.p2_test, args.seed)
    train, train_info = gsm_examples(tokenizer, data["train"], args.p2_max_length)
    test, test_info = gsm_examples(tokenizer, data["test"], args.p2_max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = functools.partial(benchlib.pad_batch, pad_id=pad_id)

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
    rss_loaded = benchlib.rss_mib()

    loss_before = eval_loss(model, test, collate)
    with tempfile.TemporaryDirectory(prefix="bench_lisa_") as tmp:
        targs = benchlib.training_arguments(
            tmp, args.seed, per_device_train_batch_size=args.p2_batch, max_steps=args.p2_steps, learning_rate=lr,
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
        "peak_rss_mib": benchlib.peak_rss_mib(),
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
    """Command line of the subprocess that runs one variant with this run's settings."""
    argv = [sys.executable, os.path.abspath(__file__), "--part2-variant", variant, "--json", json_path,
            "--threads", str(args.threads), "--seed", str(args.seed)]
    for name in CHILD_OPTIONS:
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.quick:
        argv.append("--quick")
    return argv


def run_part2(args: argparse.Namespace, workdir: str) -> dict:
    """Run every variant in its own subprocess and collect the results (a failed child gives an error row)."""
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


def part2_table(result: dict) -> str:
    """Markdown table of the results."""
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
            label, r.get("lr_label") or f"{r['lr']:g}", fmt(r["eval_loss_before"], ".4f"),
            fmt(r["eval_loss_after"], ".4f"), fmt(r["eval_loss_after"] - r["eval_loss_before"], "+.4f"),
            fmt(r["train_s"], ".1f"), fmt(r["s_per_step"], ".2f"), f"{r['max_trainable_params']:,}",
            fmt(r["peak_rss_mib"], ".0f"), fmt(r["rss_after_load_mib"], ".0f"),
            fmt(r["max_optimizer_state_bytes"] / benchlib.MIB, ".1f"),
        ])
    return benchlib.markdown(head, rows)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the variants, print the table and write the JSON (or, as a child, run one variant)."""
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.part2_variant:
        atomic_write_json(args.json, run_part2_variant(args.part2_variant, args))
        return 0
    return benchlib.run_training_benchmark("bench_lisa", args, argv, "part2",
                                           "Part 2 — SmolLM2-135M-Instruct on GSM-style problems", run_part2,
                                           part2_table)


if __name__ == "__main__":
    sys.exit(main())
