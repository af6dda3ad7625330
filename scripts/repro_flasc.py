"""FLASC reproduction on CPU: MiniLM + LoRA on the VADER sentiment snippets (movies, tweets, products, editorials)
split over clients by a seeded Dirichlet non-IID split; dense FedAvg and FedAdam against FLASC at densities 0.25 and
0.1 (download = upload density): test accuracy against total bytes communicated (indices + values actually sent).

All runs share one model, one data split and one client-sampling seed. The rounds run with the pure functions in this
process (``peft_ext.federated.run_local``); tests/test_federated.py shows the Flower simulation gives the same global
adapter bit for bit. Writes results/repro_flasc.json and out/repro_flasc/accuracy_vs_bytes.png atomically.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/repro_flasc.py          # ~12 CPU min (4 forked runs, 1 thread each)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/repro_flasc.py --quick    # a smoke run (2 rounds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

RUNS = {  # label -> FlascConfig overrides
    "FedAvg (dense)": {"server_opt": "sgd", "server_lr": 1.0},
    "FedAdam (dense)": {"server_opt": "adamw"},
    "FLASC d=0.25": {"server_opt": "adamw", "dl_density": 0.25, "ul_density": 0.25},
    "FLASC d=0.1": {"server_opt": "adamw", "dl_density": 0.1, "ul_density": 0.1},
}


def run_one(label: str, args) -> dict:
    """One FLASC configuration (``RUNS[label]``) on the process's task; its result record."""
    from peft_ext.federated import FlascConfig, FlascServer, run_local
    from peft_ext.federated.recipe import get_task

    torch.set_num_threads(1)
    task = get_task(recipe_of(args))
    cfg = FlascConfig(**{"rounds": args.rounds, "clients_per_round": args.per_round, "client_lr": args.client_lr,
                         "client_epochs": args.client_epochs, "server_lr": args.adam_lr, "seed": args.seed,
                         **RUNS[label]})
    t0, c0 = time.time(), time.process_time()

    def on_round(record, server):
        if server.round % args.eval_every == 0 or server.round == cfg.rounds:
            record.update(task.evaluate(server.eval_state()))
        acc = f" acc {record['accuracy']:.4f}" if "accuracy" in record else ""
        print(f"  {label} round {record['round']}:{acc} loss {record['train_loss']:.4f} "
              f"up {record['bytes_up']:,} B down {record['bytes_down']:,} B ({time.time() - t0:.0f}s)", flush=True)

    server = FlascServer(task.initial_state, cfg, args.clients)
    _, history = run_local(task.model, args.clients, task.client_batches, cfg, server=server, on_round=on_round)
    evals = [r for r in history if "accuracy" in r]
    return {
        "config": {k: getattr(cfg, k) for k in ("server_opt", "server_lr", "client_lr", "client_momentum",
                                                "client_epochs", "client_batch", "dl_density", "ul_density",
                                                "rounds", "clients_per_round")},
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in evals),
        "accuracy_curve": [[r["round"], r["accuracy"]] for r in evals],
        "total_bytes": int(sum(r["bytes_up"] + r["bytes_down"] for r in history)),
        "total_bytes_up": int(sum(r["bytes_up"] for r in history)),
        "total_bytes_down": int(sum(r["bytes_down"] for r in history)),
        "total_entries": int(sum(r["entries_up"] + r["entries_down"] for r in history)),
        "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
        "rounds": history,
    }


def recipe_of(args) -> dict:
    """The federated recipe (as a mapping) of the script's arguments."""
    return {
        "name": "repro_flasc", "seed": args.seed,
        "model": {"name": "minilm", "task": "seq_cls", "num_labels": 2},
        "method": {"name": "lora", "config": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}},
        "data": {"source": "vader", "max_per_domain": args.max_per_domain, "num_clients": args.clients,
                 "dirichlet_alpha": args.alpha, "max_length": args.max_length, "seed": args.seed},
        "flasc": {"clients_per_round": args.per_round},
        "engine": {"name": "local"},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--clients", type=int, default=10, help="number of clients (10-20)")
    parser.add_argument("--per-round", type=int, default=3, help="clients sampled per round")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, sampling and initialisation")
    parser.add_argument("--max-per-domain", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per snippet")
    parser.add_argument("--client-lr", type=float, default=0.1, help="client SGD lr (momentum 0.9)")
    parser.add_argument("--adam-lr", type=float, default=0.01, help="server AdamW lr (FedAdam and FLASC)")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--client-epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--only", action="append", default=[], help="run only these labels (repeatable)")
    parser.add_argument("--jobs", type=int, default=4, help="runs in parallel (forked processes, one thread each)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, for a smoke test")
    parser.add_argument("--out", default=str(ROOT / "results" / "repro_flasc.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.rounds, args.eval_every = 2, 1

    from peft_ext._io import atomic_write_json
    from peft_ext.federated.recipe import get_task, load_federated_recipe, plot_accuracy_vs_bytes

    recipe = load_federated_recipe(recipe_of(args))
    t_build, c_build = time.time(), time.process_time()
    task = get_task(recipe)
    numel = sum(t.numel() for t in task.initial_state.values())
    sizes = [len(p) for p in task.partitions]
    print(f"{len(task.train_ids)} train / {len(task.test_ids)} test snippets; {args.clients} clients "
          f"(Dirichlet α={args.alpha}, seed {args.seed}; sizes {sizes}); {numel} exchanged parameters", flush=True)
    labels = [label for label in RUNS if not args.only or label in args.only]
    if args.jobs > 1:  # one forked worker per run: each inherits the built task (same model, data and split)
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(labels))) as pool:
            done = pool.starmap(run_one, [(label, args) for label in labels])
    else:
        done = [run_one(label, args) for label in labels]
    results = dict(zip(labels, done))
    base = task.evaluate(task.initial_state)["accuracy"]
    # the reference is a dense run (density 1 both ways) of this invocation; with --only and no dense run there is
    # none, and the ratio is left out rather than taken against the densest sparse run
    dense_bytes = [r["total_bytes"] for r in results.values()
                   if r["config"]["dl_density"] == 1.0 and r["config"]["ul_density"] == 1.0]
    dense = max(dense_bytes) if dense_bytes else None
    print("\n| run | final acc | best acc | total MB (up+down) | vs dense | values sent |\n|---|---|---|---|---|---|")
    for label, r in results.items():
        r["bytes_vs_dense"] = round(dense / r["total_bytes"], 2) if dense else None
        ratio = f"{r['bytes_vs_dense']}x less" if dense else "n/a (no dense run)"
        print(f"| {label} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | {r['total_bytes'] / 1e6:.2f} | "
              f"{ratio} | {r['total_entries']:,} |")
    print(f"(untrained adapter: {base:.4f}; {len(task.test_ids)} test snippets)")
    out = Path(args.out)
    payload = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python scripts/repro_flasc.py " + " ".join(sys.argv[1:]),
        "settings": vars(args) | {"model": "all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier head",
                                  "exchanged_parameters": numel, "client_sizes": sizes,
                                  "n_train": len(task.train_ids), "n_test": len(task.test_ids),
                                  "engine": "pure functions in-process (bit-identical to the Flower simulation)",
                                  "torch_threads": 1},
        "untrained_accuracy": base,
        "runs": results,
        "total_wall_s": round(time.time() - t_build, 1),
        "total_cpu_s": round(time.process_time() - c_build + sum(r["cpu_s"] for r in results.values()), 1),
    }
    plot = plot_accuracy_vs_bytes({k: v["rounds"] for k, v in results.items()},
                                  ROOT / "out" / "repro_flasc" / "accuracy_vs_bytes.png")
    payload["plot"] = str(plot.relative_to(ROOT)) if plot and plot.is_relative_to(ROOT) else str(plot)
    atomic_write_json(out, payload)
    print(f"wrote {out} ({payload['total_cpu_s']} CPU s, {payload['total_wall_s']} wall s)")


if __name__ == "__main__":
    main()
