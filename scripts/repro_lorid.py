"""LoRID (arXiv 2508.13037, official code https://github.com/Xinhe-Li/LoRID) on SmolLM2-135M-Instruct, CPU, offline:
IR greedy vs IR majority vote vs the LoRID consistency loop at equal sample budget, on GSM-style problems.

The run is ``recipes/lorid_gsm.yaml`` (``peft-ext train`` runs the same): three LoRA adapters (IR, KG, DR) trained one
after the other, then every test problem is sampled as the official ``src/predict.py`` does (T=1.5, top-p 0.9, top-k
50; N samples per module, DR_j reading KG_j's knowledge) and scored by the loop (official optimistic scoring and the
strict majority of the intersection), by IR greedy (1 sample) and by IR majority vote over the 3·j samples the loop
used on that problem and over 3·N samples. ``--eval-seconds`` bounds the evaluation (it stops after the problem during
which the budget ran out); the JSON says how many problems ran.

    .venv/bin/python scripts/repro_lorid.py --out results/repro_lorid.json    # ~15 min on a busy 2-core CPU
    .venv/bin/python scripts/repro_lorid.py --quick --out /tmp/lorid.json     # smoke test, ~2 min

Writes the JSON atomically (table, markdown, budget, per-problem answers, example generations, load averages,
versions, the command) and prints the markdown table. One torch thread (``--threads``): on the shared 2-core machine
one thread is faster than two.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import torch  # noqa: E402

from peft_ext._io import atomic_write_json  # noqa: E402

QUICK = ["trainer.args.steps=1", "trainer.args.eval_problems=1", "trainer.args.max_new_tokens=16",
         "trainer.args.max_iterations=2", "data.max_train=4"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "lorid_gsm.yaml"), help="recipe (lorid_gsm.yaml)")
    p.add_argument("--out", default="results/repro_lorid.json", help="JSON output (results/repro_lorid.json)")
    p.add_argument("--output-dir", default=None, help="run folder (default: the recipe's output_dir)")
    p.add_argument("--eval-seconds", type=float, default=420.0, help="evaluation time budget in seconds (420)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--resume", action="store_true", help="reuse whole adapters of an earlier run in the folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. --set trainer.args.eval_problems=10 (repeatable)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from peft_ext.recipe import load_recipe
    from peft_ext.trainers.lorid import markdown_table, train_lorid_recipe

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = (QUICK if args.quick else []) + list(args.set)
    overrides.append(f"trainer.args.eval_time_budget_s={args.eval_seconds}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    recipe = load_recipe(args.recipe, overrides=overrides)
    load_before = benchlib.load_average()
    began = time.time()
    metrics = train_lorid_recipe(recipe, resume=args.resume)
    wall = time.time() - began
    budget = {**metrics["budget"], "wall_time_s": wall, "threads": args.threads,
              "load_average_before": load_before, "load_average_after": benchlib.load_average()}
    table = markdown_table(metrics["table"])
    first = metrics["per_problem"][0] if metrics["per_problem"] else {}
    payload = {
        "paper": metrics["paper"],
        "official_code": metrics["official_code"],
        "model": "SmolLM2-135M-Instruct (peft_ext.data.smollm2_path), fp32, CPU",
        "data": "gsm_symbolic (reasoning-gym) via peft_ext.data.load_gsm, seed 0; knowledge from "
                "peft_ext.data.gsm_knowledge (offline, not GPT-4o)",
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python scripts/repro_lorid.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "table": metrics["table"],
        "markdown": table,
        "mean_iterations": metrics["mean_iterations"],
        "met_rate": metrics["met_rate"],
        "budget": budget,
        "lorid": metrics["lorid"],
        "method": metrics["recipe"]["method"],
        "history": metrics["history"],
        "per_problem": [{k: v for k, v in p.items() if k != "example_texts"} for p in metrics["per_problem"]],
        "example_texts": first.get("example_texts"),
        "versions": benchlib.versions(),
    }
    atomic_write_json(args.out, payload)
    print(table)
    print(f"problems: {budget['eval_problems']}, mean iterations {metrics['mean_iterations']}, "
          f"wall {wall:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
