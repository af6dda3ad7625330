"""O3 unlearning (arXiv 2407.10223, official code https://github.com/GCYZSL/O3-LLM-UNLEARNING) on MiniLM over the four
VADER snippet domains, CPU, offline: the forgotten domains' accuracy with the OOD gate and with the adapter always on,
and the kept domain's.

The run is ``recipes/o3_unlearning.yaml`` (``peft-ext train`` runs the same): the classifier is trained on every
domain, then movies, tweets and products are unlearned one request after the other; after each request every domain's
test accuracy is measured with the gate (each input's ``ood_weight`` from the requests' detectors) and without it.

    .venv/bin/python scripts/repro_unlearning.py --out results/repro_unlearning.json   # ~5 minutes, one thread
    .venv/bin/python scripts/repro_unlearning.py --quick --out /tmp/o3.json            # smoke test

Writes the JSON atomically (tables, markdown, budget, load averages, versions, the command) and prints the table.
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

QUICK = ["trainer.args.max_examples=40", "trainer.args.base_epochs=1", "trainer.args.epochs=1"]


def markdown(metrics: dict) -> str:
    domains = list(metrics["base"])
    forgotten = [r["forget"] for r in metrics["requests"]]
    head = "| after | " + " | ".join(f"{d}{' (forgotten)' if d in forgotten else ''}" for d in domains) + " |"
    lines = [head, "|---|" + "---|" * len(domains)]
    lines.append("| base classifier | " + " | ".join(f"{metrics['base'][d]:.3f}" for d in domains) + " |")
    for r in metrics["requests"]:
        lines.append(f"| forget {r['forget']}: gated | " + " | ".join(f"{r['gated'][d]:.3f}" for d in domains) + " |")
        lines.append(f"| forget {r['forget']}: no gate | "
                     + " | ".join(f"{r['ungated'][d]:.3f}" for d in domains) + " |")
        lines.append(f"| forget {r['forget']}: mean gate | "
                     + " | ".join(f"{r['mean_gate'][d]:.2f}" for d in domains) + " |")
    lines.append("| majority-class rate | " + " | ".join(f"{metrics['majority_class_rate'][d]:.3f}" for d in domains)
                 + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from peft_ext.recipe import load_recipe
    from peft_ext.trainers.unlearning import train_unlearning_recipe

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "o3_unlearning.yaml"))
    p.add_argument("--out", default="results/repro_unlearning.json")
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
    began = time.time()
    metrics = train_unlearning_recipe(recipe, resume=args.resume)
    wall = time.time() - began
    table = markdown(metrics)
    payload = {
        "paper": metrics["paper"],
        "official_code": metrics["official_code"],
        "model": "all-MiniLM-L6-v2 (peft_ext.data.minilm_path), fp32, CPU",
        "data": "VADER snippet domains (peft_ext.data.load_vader_domain, seed 0, neutral_margin 0.5)",
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python scripts/repro_unlearning.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "markdown": table,
        "base": metrics["base"],
        "requests": [{k: v for k, v in r.items() if k != "history"} for r in metrics["requests"]],
        "summary": metrics["summary"],
        "majority_class_rate": metrics["majority_class_rate"],
        "domain_sizes": metrics["domain_sizes"],
        "unlearning": metrics["unlearning"],
        "method": metrics["recipe"]["method"],
        "budget": {**metrics["budget"], "wall_time_s": wall, "threads": args.threads,
                   "load_average_before": load_before, "load_average_after": benchlib.load_average()},
        "history": {r["forget"]: r["history"] for r in metrics["requests"]},
        "versions": benchlib.versions(),
    }
    atomic_write_json(args.out, payload)
    print(table)
    print(f"wall {wall:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
