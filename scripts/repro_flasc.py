"""FLASC reproduction on CPU: MiniLM + LoRA on the VADER sentiment snippets (movies, tweets, products, editorials)
split over clients by a seeded Dirichlet non-IID split; dense FedAvg and FedAdam against FLASC at densities 0.25 and
0.1 (download = upload density): test accuracy against total bytes communicated (indices + values actually sent).

All runs share one model, one data split and one client-sampling seed. The rounds run with the pure functions in this
process (``peft_ext.federated.run_local``); tests/test_federated.py shows the Flower simulation gives the same global
adapter bit for bit. Writes results/repro_flasc.json and out/repro_flasc/accuracy_vs_bytes.png atomically.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/repro_flasc.py            # ~6 CPU minutes on one thread
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10, help="number of clients (10-20)")
    parser.add_argument("--per-round", type=int, default=3, help="clients sampled per round")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, sampling and initialisation")
    parser.add_argument("--max-per-domain", type=int, default=120)
    parser.add_argument("--max-length", type=int, default=32, help="tokens per snippet")
    parser.add_argument("--client-lr", type=float, default=0.3, help="client SGD lr (0.05 stays at chance in 8 rounds)")
    parser.add_argument("--adam-lr", type=float, default=0.01, help="server AdamW lr (FedAdam and FLASC)")
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 rounds, for a smoke test")
    parser.add_argument("--out", default=str(ROOT / "results" / "repro_flasc.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.rounds, args.eval_every = 2, 1

    from peft_ext._io import atomic_write_json
    from peft_ext.federated import FlascConfig, FlascServer, run_local
    from peft_ext.federated.recipe import get_task, load_federated_recipe, plot_accuracy_vs_bytes

    recipe = load_federated_recipe({
        "name": "repro_flasc", "seed": args.seed,
        "model": {"name": "minilm", "task": "seq_cls", "num_labels": 2},
        "method": {"name": "lora", "config": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}},
        "data": {"source": "vader", "max_per_domain": args.max_per_domain, "num_clients": args.clients,
                 "dirichlet_alpha": args.alpha, "max_length": args.max_length, "seed": args.seed},
        "flasc": {"clients_per_round": args.per_round},
        "engine": {"name": "local"},
    })
    t_build, c_build = time.time(), time.process_time()
    task = get_task(recipe)
    numel = sum(t.numel() for t in task.initial_state.values())
    sizes = [len(p) for p in task.partitions]
    print(f"{len(task.train_ids)} train / {len(task.test_ids)} test snippets; {args.clients} clients "
          f"(Dirichlet α={args.alpha}, seed {args.seed}; sizes {sizes}); {numel} exchanged parameters", flush=True)
    results = {}
    for label, overrides in RUNS.items():
        cfg = FlascConfig(**{"rounds": args.rounds, "clients_per_round": args.per_round, "client_lr": args.client_lr,
                             "server_lr": args.adam_lr, "seed": args.seed, **overrides})
        t0, c0 = time.time(), time.process_time()

        def evaluate(server, cfg=cfg):
            if server.round % args.eval_every == 0 or server.round == cfg.rounds:
                return task.evaluate(server.eval_state())
            return {}

        def on_round(record, server, label=label, t0=t0):
            record.update(evaluate(server))
            acc = f" acc {record['accuracy']:.4f}" if "accuracy" in record else ""
            print(f"  {label} round {record['round']}:{acc} loss {record['train_loss']:.4f} "
                  f"up {record['bytes_up']:,} B down {record['bytes_down']:,} B ({time.time() - t0:.0f}s)", flush=True)

        server = FlascServer(task.initial_state, cfg, args.clients)
        _, history = run_local(task.model, args.clients, task.client_batches, cfg, server=server, on_round=on_round)
        total = sum(r["bytes_up"] + r["bytes_down"] for r in history)
        results[label] = {
            "config": {k: getattr(cfg, k) for k in ("server_opt", "server_lr", "client_lr", "dl_density",
                                                    "ul_density", "rounds", "clients_per_round")},
            "final_accuracy": history[-1]["accuracy"],
            "best_accuracy": max(r["accuracy"] for r in history if "accuracy" in r),
            "total_bytes": int(total),
            "total_bytes_up": int(sum(r["bytes_up"] for r in history)),
            "total_bytes_down": int(sum(r["bytes_down"] for r in history)),
            "total_entries": int(sum(r["entries_up"] + r["entries_down"] for r in history)),
            "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
            "rounds": history,
        }
    base = task.evaluate(task.initial_state)["accuracy"]
    dense = results["FedAdam (dense)"]["total_bytes"]
    print("\n| run | final acc | best acc | total MB (up+down) | vs dense | values sent |\n|---|---|---|---|---|---|")
    for label, r in results.items():
        r["bytes_vs_dense"] = round(dense / r["total_bytes"], 2)
        print(f"| {label} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | {r['total_bytes'] / 1e6:.2f} | "
              f"{r['bytes_vs_dense']}x less | {r['total_entries']:,} |")
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
        "total_cpu_s": round(time.process_time() - c_build, 1),
    }
    plot = plot_accuracy_vs_bytes({k: v["rounds"] for k, v in results.items()},
                                  ROOT / "out" / "repro_flasc" / "accuracy_vs_bytes.png")
    payload["plot"] = str(plot.relative_to(ROOT)) if plot and plot.is_relative_to(ROOT) else str(plot)
    atomic_write_json(out, payload)
    print(f"wrote {out} ({payload['total_cpu_s']} CPU s, {payload['total_wall_s']} wall s)")


if __name__ == "__main__":
    main()
