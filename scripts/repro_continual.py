"""CoDyRA continual learning (arXiv 2412.01004, official code https://github.com/Artificer-AI-Lab/CoDyRA) on MiniLM over
the four VADER snippet domains, CPU, offline: the accuracy matrix (task i after training task j), average accuracy and
forgetting of CoDyRA with ``increment_task()`` against sequential plain LoRA merged after each task.

The run is ``recipes/codyra_continual.yaml`` (``peft-ext train`` runs the same).

    .venv/bin/python scripts/repro_continual.py --out results/repro_continual.json   # ~10 CPU minutes
    .venv/bin/python scripts/repro_continual.py --quick --out /tmp/continual.json    # smoke test

Writes the JSON atomically (matrices, markdown, budget, load averages, versions, the command) and prints the tables.
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

QUICK = ["trainer.args.max_examples=40", "trainer.args.epochs=1"]


def markdown(metrics: dict) -> str:
    tasks = metrics["tasks"]
    lines = []
    for method, r in metrics["methods"].items():
        lines.append(f"**{method}** — average accuracy {r['average_accuracy']:.3f}, forgetting {r['forgetting']:.3f}, "
                     f"backward transfer {r['backward_transfer']:.3f}")
        lines.append("")
        lines.append("| after training | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        lines.append("| (untrained head) | " + " | ".join(f"{a:.3f}" for a in metrics["initial_accuracy"]) + " |")
        for t, row in zip(tasks, r["accuracy_matrix"]):
            lines.append(f"| {t} | " + " | ".join(f"{a:.3f}" for a in row) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: Optional[list[str]] = None) -> int:
    from peft_ext.recipe import load_recipe
    from peft_ext.trainers.continual import train_continual_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "codyra_continual.yaml"))
    p.add_argument("--out", default="results/repro_continual.json")
    p.add_argument("--output-dir", default=None, help="run folder (default: the recipe's output_dir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in the folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = (QUICK if args.quick else []) + list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    recipe = load_recipe(args.recipe, overrides=overrides)
    load_before = benchlib.load_average()
    began, cpu_began = time.time(), time.process_time()
    metrics = train_continual_recipe(recipe, resume=args.resume)
    wall, cpu = time.time() - began, time.process_time() - cpu_began
    table = markdown(metrics)
    payload = {
        "paper": metrics["paper"],
        "official_code": metrics["official_code"],
        "model": "all-MiniLM-L6-v2 (peft_ext.data.minilm_path), fp32, CPU",
        "data": "VADER snippet domains (peft_ext.data.load_vader_domain, seed 0, neutral_margin 0.5)",
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python scripts/repro_continual.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "markdown": table,
        "tasks": metrics["tasks"],
        "task_sizes": metrics["task_sizes"],
        "initial_accuracy": metrics["initial_accuracy"],
        "results": metrics["methods"],
        "continual": metrics["continual"],
        "method": metrics["recipe"]["method"],
        "budget": {**metrics["budget"], "wall_time_s": wall, "cpu_time_s": cpu, "threads": args.threads,
                   "load_average_before": load_before, "load_average_after": benchlib.load_average()},
        "versions": benchlib.versions(),
    }
    atomic_write_json(args.out, payload)
    print(table)
    print(f"wall {wall:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
