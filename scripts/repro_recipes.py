"""Reproduction of the trainer recipes on SmolLM2-135M-Instruct, GSM-style problems (reasoning-gym), CPU, offline.

Compares, from one shared SFT stage (LoRA r = 8 on q/k/v/o, worked solutions in <think>/<answer> tags):

* SFT only;
* single-round DPO (pairs sampled from the SFT model, ``rounds × steps`` steps in one round);
* mrDPO (``rounds`` rounds of ``steps`` steps; pairs re-sampled from each round's merged model, reference refreshed);
* SFT → GRPO (accuracy + format + cosine length + repetition rewards) on the same adapter.

Each is scored on the same held-out problems (greedy): accuracy (``score_gsm``), format rate, mean length (tokens),
repetition (share of repeated 3-grams); DPO rows also give the per-round reward margin, GRPO the mean reward. The
single-round DPO gets the same number of optimizer steps and problems as all mrDPO rounds together. The numbers are
whatever they are at this scale: a 135M model, a few dozen steps, tens of problems (``--help`` for the budget).

    python scripts/repro_recipes.py --out out/repro_recipes            # writes results.json and prints a table

The SFT stage is trained once and copied into each variant's output folder, which then resumes after it
(``peft_ext.trainers.run``'s resume), so every variant starts from the identical SFT adapter.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def base_recipe(args, out: Path) -> dict:
    return {
        "name": "repro", "output_dir": str(out), "seed": args.seed,
        "model": {"name": args.model, "task": "causal_lm"},
        "data": {"name": "gsm", "max_train": args.train, "max_eval": args.eval, "max_length": args.max_length},
        "method": {"name": "lora", "config": {"r": 8, "lora_alpha": 16,
                                              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        "training": {"learning_rate": args.lr, "per_device_train_batch_size": 4, "logging_steps": 1},
        "evaluation": {"baseline": False, "plot": False, "generate": args.eval, "max_new_tokens": args.max_new_tokens},
    }


def run(recipe: dict, resume: bool = False) -> dict:
    from peft_ext.recipe import recipe_from_dict
    from peft_ext.trainers.run import train_recipe

    return train_recipe(recipe_from_dict(recipe), resume=resume, quiet=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/repro_recipes")
    p.add_argument("--model", default="smollm2", help="smollm2, or a local model folder (tests use a tiny one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=48, help="training problems (SFT, DPO prompts, GRPO prompts)")
    p.add_argument("--eval", type=int, default=16, help="held-out problems scored after each stage/round")
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="DPO steps per mrDPO round")
    p.add_argument("--prompts-per-round", type=int, default=8)
    p.add_argument("--samples", type=int, default=2, help="answers sampled per problem for the pairs")
    p.add_argument("--grpo-steps", type=int, default=6)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the DPO / GRPO stages")
    p.add_argument("--sft-lr", type=float, default=2e-3,
                   help="learning rate of the shared SFT stage (at 5e-4 for 20 steps the LoRA did not learn the tags)")
    p.add_argument("--max-length", type=int, default=256, help="prompt token budget (completions add max-new-tokens)")
    p.add_argument("--only", default="sft,dpo,mrdpo,grpo", help="comma-separated subset of sft,dpo,mrdpo,grpo")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared 2-core machine one thread generated ~10x faster than two)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from peft_ext._io import atomic_write_json

    out = Path(args.out)
    only = set(args.only.split(","))
    start = time.time()
    results: dict = {"budget": vars(args), "device": "CPU" if not torch.cuda.is_available() else "GPU", "runs": {}}

    sft_dir = out / "sft"
    recipe = base_recipe(args, sft_dir)
    recipe["trainer"] = {"name": "sft", "sft_steps": args.sft_steps, "max_new_tokens": args.max_new_tokens,
                         "args": {"learning_rate": args.sft_lr}}
    recipe["evaluation"]["baseline"] = True
    t0 = time.time()
    m = run(recipe, resume=True)
    results["runs"]["base"] = {"eval": m["baseline"]} if m["baseline"] else results["runs"].get("base")
    results["runs"]["sft"] = {"eval": m["stages"][-1]["eval"], "seconds": time.time() - t0}

    def from_sft(name: str, trainer: dict) -> dict:
        folder = out / name
        if not (folder / "stages" / "sft").is_dir():
            shutil.copytree(sft_dir / "stages" / "sft", folder / "stages" / "sft")
        r = base_recipe(args, folder)
        r["trainer"] = trainer
        t = time.time()
        metrics = run(r, resume=True)
        return {"stages": metrics["stages"], "seconds": time.time() - t}

    dpo_common = {"sft_steps": args.sft_steps, "num_samples": args.samples, "max_new_tokens": args.max_new_tokens,
                  "temperature": 1.0, "ce_weight": 0.1}
    if "dpo" in only:
        results["runs"]["dpo"] = from_sft("dpo", {"name": "dpo", "steps_per_round": args.rounds * args.steps,
                                                  "prompts_per_round": args.rounds * args.prompts_per_round,
                                                  **dpo_common})
    if "mrdpo" in only:
        results["runs"]["mrdpo"] = from_sft("mrdpo", {"name": "mrdpo", "rounds": args.rounds,
                                                      "steps_per_round": args.steps,
                                                      "prompts_per_round": args.prompts_per_round, **dpo_common})
    if "grpo" in only:
        results["runs"]["sft_grpo"] = from_sft("sft_grpo", {
            "name": "sft_grpo", "sft_steps": args.sft_steps, "grpo_steps": args.grpo_steps,
            "num_generations": args.generations, "max_new_tokens": args.max_new_tokens,
            "rewards": ["accuracy", "format", "cosine_length", "repetition"], "reward_weights": [1.0, 0.5, 0.5, 0.5]})
    results["seconds"] = time.time() - start
    atomic_write_json(out / "results.json", results)
    print(table(results))
    return 0


def table(results: dict) -> str:
    """Markdown: one row per model (SFT, DPO, each mrDPO round, GRPO) with held-out metrics and train signal."""
    lines = ["| model | accuracy | format | mean length | repetition | train margin / reward |",
             "|---|---|---|---|---|---|"]

    def row(label, ev, signal=""):
        if not ev:
            return
        lines.append(f"| {label} | {ev['accuracy']:.3f} | {ev['format_rate']:.2f} | {ev['mean_length']:.1f} | "
                     f"{ev['repetition']:.3f} | {signal} |")

    runs = results["runs"]
    row(f"{results['budget']['model']} (no training)", (runs.get("base") or {}).get("eval"))
    row("SFT", runs["sft"]["eval"])
    for name, label in (("dpo", "SFT → DPO (1 round)"), ("mrdpo", "SFT → mrDPO")):
        for r in runs.get(name, {}).get("stages", []):
            if r["stage"].startswith("round"):
                tag = f"{label} {r['stage']}" if name == "mrdpo" else label
                row(tag, r.get("eval"), f"margin {r.get('margin', float('nan')):.3f}")
    for r in runs.get("sft_grpo", {}).get("stages", []):
        if r["stage"] == "grpo":
            row("SFT → GRPO", r.get("eval"), f"reward {r.get('reward', float('nan')):.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
