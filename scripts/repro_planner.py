"""Octo-planner merge study on SmolLM2-135M-Instruct, BFCL, CPU, offline (https://arxiv.org/abs/2406.18082).

For the function subsets (domains) ``d_1 .. d_D`` of BFCL (``peft_ext.data.bfcl.function_subset``), trains

* one planner LoRA per domain (single-subset adapters, ``steps`` SFT steps each), and
* one jointly trained LoRA on the first ``m`` domains for ``m = 2 .. D`` (``m × steps`` steps: the same compute as the
  ``m`` single adapters together),

then merges the first ``m`` single adapters into one planner with every rule (PEFT's ``add_weighted_adapter`` rules
and LoRA-LEGO, ``peft_ext.merging.add_merged_adapter``, weights 1.0) and scores every adapter's greedy plans on
held-out rows of every domain: plan success (``plan_success``: the steps name exactly the ground-truth functions, one
step per call). In-domain = the rows of the domains an adapter was trained on / merged from, cross-domain = the rest.

    python scripts/repro_planner.py --out out/repro_planner --json results/repro_planner.json

prints a markdown table and writes the JSON (atomically). Adapters are kept under ``--out``; a rerun reuses the
finished ones. The numbers are whatever they are at this scale (a 135M model, tens of SFT steps, a few rows per
domain); ``--help`` lists the budget. Torch runs on one thread (faster than two on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DOMAINS = ("math", "finance", "leisure")
DEFAULT_RULES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "lego")


def make_recipe(args):
    from peft_ext.recipe import recipe_from_dict

    return recipe_from_dict({
        "name": "repro_planner", "output_dir": str(args.out), "seed": args.seed,
        "model": {"name": args.model, "task": "causal_lm"},
        "data": {"name": "bfcl", "max_train": args.train, "max_eval": args.eval},
        "method": {"name": "lora", "config": {"r": 8, "lora_alpha": 16,
                                              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        "trainer": {"name": "planner", "args": {
            "subsets": list(args.domains), "steps_per_subset": args.steps, "batch_size": args.batch,
            "learning_rate": args.lr, "max_length": args.max_length, "plan_tokens": args.plan_tokens,
            "eval_batch_size": args.eval_batch}},
        "evaluation": {"plot": False},
    })


def _setup(args):
    """Recipe, planner config and the BFCL rows per domain (every worker process rebuilds them the same way)."""
    import torch

    torch.set_num_threads(1)
    from peft_ext.trainers import planner as pl

    recipe = make_recipe(args)
    config = pl.planner_config_from_recipe(recipe)
    train_rows, eval_rows = pl.planner_splits(config, seed=args.seed, max_train=args.train, max_eval=args.eval)
    return recipe, config, train_rows, eval_rows


def _train_job(args, name: str, domains: list, steps: int, seed: int) -> dict:
    """Train one planner adapter on the rows of ``domains`` and save it under ``--out/name`` (a worker process)."""
    from peft_ext._io import adapter_folder_is_whole
    from peft_ext.runner import save_adapter
    from peft_ext.trainers import planner as pl

    folder = args.out / name
    if adapter_folder_is_whole(folder):
        return {"name": name, "reused": True}
    recipe, config, train_rows, _ = _setup(args)
    rows = [r for d in domains for r in train_rows[d]]
    start, cpu = time.time(), time.process_time()
    model, _, losses = pl.train_adapter(recipe, config, rows, pl.planner_examples, steps, seed)
    save_adapter(model, None, folder)
    return {"name": name, "rows": len(rows), "steps": steps, "train_s": time.time() - start,
            "cpu_s": time.process_time() - cpu, "final_loss": losses[-1]["loss"] if losses else None}


def _eval_job(args, folders: dict, jobs: list) -> dict:
    """Plan success per domain of each job: ``("adapter", name)`` or ``("merge", rule, [adapters])``."""
    from peft_ext.merging import add_merged_adapter
    from peft_ext.trainers import planner as pl

    recipe, config, _, eval_rows = _setup(args)
    model, tokenizer = pl.load_adapters(recipe, folders)
    rows = [r for d in args.domains for r in eval_rows[d]]
    out = {}
    for job in jobs:
        start = time.time()
        name = job[1] if job[0] == "adapter" else f"{job[1]}-{len(job[2])}"
        if job[0] == "merge":
            add_merged_adapter(model, job[2], job[1], name, density=config.density, seed=args.seed)
        values = pl.plan_scores(model, tokenizer, name, rows, config)
        if job[0] == "merge":
            model.delete_adapter(name)
        scores, i = {}, 0
        for d in args.domains:
            n = len(eval_rows[d])
            scores[d] = sum(values[i : i + n]) / n
            i += n
        out[name] = scores
        print(f"  {name}: " + ", ".join(f"{d} {v:.2f}" for d, v in scores.items()) + f" ({time.time() - start:.0f} s)",
              flush=True)
    return out


def _pool(jobs: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/repro_planner"), help="folder for the adapters")
    p.add_argument("--json", type=Path, default=None, help="also write the results JSON here")
    p.add_argument("--model", default="smollm2", help="smollm2, or tiny-llama / a local folder for a dry run")
    p.add_argument("--domains", nargs="+", default=list(DEFAULT_DOMAINS), help="function subsets, in merge order")
    p.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), help="merge rules")
    p.add_argument("--train", type=int, default=48, help="training rows per domain")
    p.add_argument("--eval", type=int, default=6, help="held-out rows per domain")
    p.add_argument("--steps", type=int, default=8, help="SFT steps per single-domain adapter")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--plan-tokens", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=12)
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes (one torch thread each; the CPU time is the same, the wall time shorter)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from peft_ext._io import adapter_folder_is_whole, atomic_write_json
    from peft_ext.trainers import planner as pl

    began = time.time()
    recipe, config, train_rows, eval_rows = _setup(args)
    domains = list(args.domains)

    train_jobs = [(f"single/{d}", [d], args.steps, args.seed + i) for i, d in enumerate(domains)]
    train_jobs += [(f"joint/{m}", domains[:m], args.steps * m, args.seed + 100 + m) for m in range(2, len(domains) + 1)]
    train_jobs = [job for job in train_jobs if not adapter_folder_is_whole(args.out / job[0])]  # a rerun reuses them
    train_jobs.sort(key=lambda job: -job[2])  # longest first, so the workers finish together
    timings = {}
    if train_jobs:
        with _pool(min(args.jobs, len(train_jobs))) as pool:
            for info in pool.map(_train_job, [args] * len(train_jobs), *zip(*train_jobs)):
                timings[info["name"]] = info
                print(f"trained {info}", flush=True)
    folders = {f"single-{d}": args.out / "single" / d for d in domains}
    folders.update({f"joint-{m}": args.out / "joint" / str(m) for m in range(2, len(domains) + 1)})
    eval_jobs = [("adapter", name) for name in folders]
    eval_jobs += [("merge", rule, [f"single-{d}" for d in domains[:m]]) for m in range(2, len(domains) + 1)
                  for rule in args.rules]
    chunks = [eval_jobs[i :: args.jobs] for i in range(args.jobs)]
    per_domain = {}
    with _pool(args.jobs) as pool:
        for scores in pool.map(_eval_job, [args] * len(chunks), [folders] * len(chunks), chunks):
            per_domain.update(scores)

    def split(scores: dict, m: int) -> tuple:
        inside = [scores[d] for d in domains[:m]]
        outside = [scores[d] for d in domains[m:]]
        return (sum(inside) / len(inside), sum(outside) / len(outside) if outside else None)

    table = []
    for m in range(1, len(domains) + 1):
        row = {"merged_domains": m, "domains": domains[:m],
               "single_in_domain": sum(per_domain[f"single-{d}"][d] for d in domains[:m]) / m}
        if m == 1:
            # one adapter merged is the adapter itself (every rule falls back to linear, weight 1)
            row["joint"] = row["merged"] = {"in": split(per_domain[f"single-{domains[0]}"], 1)[0],
                                            "cross": split(per_domain[f"single-{domains[0]}"], 1)[1]}
        else:
            inside, outside = split(per_domain[f"joint-{m}"], m)
            row["joint"] = {"in": inside, "cross": outside}
            row["merged"] = {}
            for rule in args.rules:
                inside, outside = split(per_domain[f"{rule}-{m}"], m)
                row["merged"][rule] = {"in": inside, "cross": outside}
        table.append(row)

    def cell(v: dict) -> str:
        return f"{v['in']:.2f} / " + ("—" if v["cross"] is None else f"{v['cross']:.2f}")

    header = "| merged domains | single-subset (in) | joint (in / cross) | " + " | ".join(args.rules) + " |"
    lines = [header, "|" + "---|" * (3 + len(args.rules))]
    for row in table:
        label = f"{row['merged_domains']} ({', '.join(row['domains'])})"
        if row["merged_domains"] == 1:
            merged = [cell(row["merged"])] * len(args.rules)
        else:
            merged = [cell(row["merged"][r]) for r in args.rules]
        lines.append(f"| {label} | {row['single_in_domain']:.2f} | {cell(row['joint'])} | " + " | ".join(merged) + " |")
    matrix = ["| single adapter \\ eval domain | " + " | ".join(domains) + " |", "|" + "---|" * (1 + len(domains))]
    for d in domains:
        matrix.append(f"| {d} | " + " | ".join(f"{per_domain[f'single-{d}'][e]:.2f}" for e in domains) + " |")
    markdown = "\n".join(lines) + "\n\n" + "\n".join(matrix)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "paper": pl.PAPER_URL,
        "command": "python scripts/repro_planner.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "domains": domains,
        "rules": args.rules,
        "rows": {d: {"train": len(train_rows[d]), "eval": len(eval_rows[d])} for d in domains},
        "settings": {"steps_per_domain": args.steps, "joint_steps": "m x steps", "batch_size": args.batch,
                     "learning_rate": args.lr, "lora": {"r": 8, "lora_alpha": 16,
                                                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                     "merge_weights": 1.0, "density": config.density, "lego_k": 8, "plan_tokens": args.plan_tokens,
                     "seed": args.seed, "torch_threads": 1, "worker_processes": args.jobs},
        "plan_success": per_domain,
        "table": table,
        "markdown": markdown,
        "training": timings,
        "wall_s": time.time() - began,
        "cpu_s": time.process_time() + children.ru_utime + children.ru_stime,  # this process + the finished workers
    }
    atomic_write_json(args.out / "results.json", result)
    if args.json is not None:
        atomic_write_json(args.json, result)
    print(markdown)
    print(f"wall {result['wall_s']:.0f} s, CPU {result['cpu_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
