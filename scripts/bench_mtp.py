"""Multi-token prediction (gated LoRA + sampler, https://arxiv.org/abs/2507.11851) on SmolLM2-135M-Instruct, CPU:
accepted tokens per forward and wall-clock speed-up of speculative decoding against plain greedy ``generate()``.

The run: SmolLM2's own greedy answers to ``--train-prompts`` GSM-style questions (``peft_ext.data.load_gsm``) are the
training data; a gated LoRA (the ``configs/mtp_gated.yaml`` preset: r=16, alpha=32, dropout 0.05, every attention
and MLP projection), the sampler head and the ``<mask>`` row train for ``--steps`` steps or ``--time-budget``
seconds, whichever ends first; then ``--eval-prompts`` held-out questions are answered one at a time by plain greedy
``generate()`` and by ``mtp_generate`` (linear and quadratic verification), timed alternately, outputs compared token
for token.

    .venv/bin/python scripts/bench_mtp.py --out results/bench_mtp.json          # ~15 min on a busy 2-core CPU
    .venv/bin/python scripts/bench_mtp.py --quick --out /tmp/bench_mtp.json     # smoke test, ~2 min

``--threads`` (default 1: on a shared 2-core machine one OpenMP thread was ~10x faster than two, which spin on
descheduled siblings). The JSON (``peft_ext._io.atomic_write_json``) holds the budget, the seed, the loss history,
per-prompt decoding records, load averages and versions; a markdown table is printed. ``HF_HUB_OFFLINE=1`` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import torch  # noqa: E402

from peft_ext._io import atomic_write_json  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = {"train_prompts": 32, "gen_tokens": 64, "steps": 80, "time_budget": 540.0, "eval_prompts": 4, "eval_tokens": 64}
QUICK = {"train_prompts": 4, "gen_tokens": 16, "steps": 2, "time_budget": 60.0, "eval_prompts": 1, "eval_tokens": 12}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--out", default="results/bench_mtp.json", help="JSON output (default results/bench_mtp.json)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), help=f"default {value} ({QUICK[key]} quick)")
    p.add_argument("--num-masks", type=int, default=4, help="k (default 4)")
    p.add_argument("--blocks-per-sequence", type=int, default=16, help="mask blocks per sequence per step (16)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step (2)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (1e-3)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_ext import GatedLoraConfig
    from peft_ext.data import smollm2_path
    from peft_ext.data.gsm import load_gsm
    from peft_ext.trainers.mtp import (
        MTPConfig,
        MTPModel,
        measure_decoding,
        mtp_prompt,
        self_generate,
        train_mtp,
    )

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    benchlib.seed_everything(args.seed)
    load_start = benchlib.load_average()
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(base, GatedLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    config = MTPConfig(
        num_masks=args.num_masks,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        blocks_per_sequence=args.blocks_per_sequence,
        train_prompts=args.train_prompts,
        gen_tokens=args.gen_tokens,
        eval_prompts=args.eval_prompts,
        eval_tokens=args.eval_tokens,
    )
    mtp = MTPModel(model, num_masks=config.num_masks)
    gsm = load_gsm(n_train=args.train_prompts, n_test=max(args.eval_prompts, 1), seed=args.seed)
    t0 = time.perf_counter()
    data = self_generate(
        model, tokenizer, [mtp_prompt(tokenizer, q) for q in gsm["train"]["question"]], args.gen_tokens, batch_size=4
    )
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    history = train_mtp(
        mtp, data, config, tokenizer.pad_token_id, seed=args.seed, progress=True, max_seconds=args.time_budget
    )
    train_s = time.perf_counter() - t0
    prompts = [mtp_prompt(tokenizer, q) for q in gsm["test"]["question"][: args.eval_prompts]]
    decoding = {
        v: measure_decoding(mtp, tokenizer, prompts, args.eval_tokens, verification=v) for v in ("linear", "quadratic")
    }
    tail = history[-10:]
    payload = {
        "model": "SmolLM2-135M-Instruct (float32, CPU)",
        "paper": "https://arxiv.org/abs/2507.11851",
        "seed": args.seed,
        "threads": args.threads,
        "budget": {
            "train_prompts": args.train_prompts,
            "gen_tokens": args.gen_tokens,
            "steps_run": len(history),
            "steps_max": args.steps,
            "time_budget_s": args.time_budget,
            "batch_size": args.batch_size,
            "blocks_per_sequence": args.blocks_per_sequence,
            "num_masks": args.num_masks,
            "lr": args.lr,
            "self_generation_s": gen_s,
            "train_s": train_s,
        },
        "final_train": {k: sum(r[k] for r in tail) / len(tail) for k in tail[0] if k != "step"} if tail else {},
        "decoding": decoding,
        "history": history,
        "load_average": {"start": load_start, "end": benchlib.load_average()},
        "versions": benchlib.versions(),
    }
    path = atomic_write_json(args.out, payload)
    head = [
        "verification",
        "tokens / forward",
        "draft acceptance",
        "identical to generate()",
        "plain s",
        "MTP s",
        "speed-up",
    ]
    rows = [
        [
            v,
            benchlib.fmt(d["tokens_per_forward"], ".2f"),
            benchlib.fmt(d["acceptance_rate"], ".2f"),
            f"{d['identical'] * d['prompts']:.0f}/{d['prompts']}",
            benchlib.fmt(d["plain_s"], ".1f"),
            benchlib.fmt(d["mtp_s"], ".1f"),
            benchlib.fmt(d["speedup"], ".2f") + "x",
        ]
        for v, d in decoding.items()
        if d
    ]
    print(
        f"MTP on SmolLM2-135M-Instruct, CPU ({args.threads} thread), seed {args.seed}: {len(history)} steps in "
        f"{train_s:.0f} s on {args.train_prompts} self-generated answers ({args.gen_tokens} tokens), k="
        f"{args.num_masks}; {args.eval_prompts} held-out prompts x {args.eval_tokens} tokens"
    )
    print(benchlib.markdown(head, rows))
    print(f"written: {path}")
    return payload


if __name__ == "__main__":
    main()
