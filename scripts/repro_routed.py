"""MoLA against LoRA at equal active parameters on a mixed multi-task set built from offline corpora (issue 6).

Paper: *Higher Layers Need More LoRA Experts* (MoLA, https://arxiv.org/abs/2402.08562; official code
https://github.com/GCYZSL/MoLA). The paper fine-tunes LLaMA-2-7B with LoRA experts on q/k/v/o/gate/up/down, top-2
routing, and finds that putting more experts in higher layers (MoLA-▽: 2/4/6/8 experts by depth quarter) beats the
same number of experts spread evenly. This script runs the same comparison at CPU scale.

Model: SmolLM2-135M-Instruct (``peft_ext.data.smollm2_path()``, float32, 30 decoder layers), or with ``--quick`` a
tiny random Llama with MiniLM's tokenizer (mechanics only). Data: one causal-LM mixture of three tasks, each an
equal share, shuffled together with a fixed seed, the loss on the answer tokens only:

* **sentiment**: VADER movie-review snippets (``peft_ext.data.load_movie_reviews``) as
  ``"Review: <text>\\nSentiment:"`` → ``" positive"`` / ``" negative"``;
* **gsm**: GSM-style word problems from reasoning-gym (``peft_ext.data.load_gsm``), question → worked solution;
* **bfcl**: function-calling requests from bfcl-eval (``peft_ext.data.load_bfcl``), request + function specs → call.

Variants (adapters on q/k/v/o of every layer; same seed, data order, steps, batch size and learning rate):

* **LoRA r=16** (``peft.LoraConfig``, α = 32): 16 active rank per token;
* ``mola_inverted_triangle``, **MoLA-▽** (``peft_ext.MolaConfig``; the paper's "inverted triangle"): r = 8 experts,
  top-2 (16 active rank per token, as LoRA r=16), experts per layer 2/4/6/8 by depth quarter, the load-balancing loss
  at weight ``--balance-weight``;
* ``mola_uniform``, **MoLA uniform**: the same with 5 experts in every layer (about the same total expert count as
  MoLA-▽);
* ``mola_triangle``, **MoLA-△** (not run by default): the reverse allocation, 8/6/4/2.

Reported per variant: trainable parameters (total and active per token), eval loss per task (token-weighted over
``--n-eval`` held-out items per task), sentiment accuracy (is the log-probability of " positive" above that of
" negative" at the answer position), train time and s/step. For the MoLA variants the expert load of every layer is
measured on each task's eval items (``peft_ext.tuners._shared.routing.routing_statistics``, averaged over the
layer's q/k/v/o routers) and plotted per task to ``--plot`` (a heat map: decoder layer × expert, share of routing
slots), together with the per-layer load imbalance (coefficient of variation of the load).

Rerun (from the repository root)::

    .venv/bin/python scripts/repro_routed.py                      # SmolLM2, ~8-12 minutes on 2 CPU cores
    .venv/bin/python scripts/repro_routed.py --quick              # tiny random Llama, < 1 minute (smoke test)
    .venv/bin/python scripts/repro_routed.py --steps 150 --n-train 200

Everything is written to ``--out`` (default ``results/repro_routed.json``) through ``peft_ext._io.atomic_write_json``,
the plot through ``atomic_savefig``. ``HF_HUB_OFFLINE=1`` is set; nothing is downloaded. One seed and a short budget:
the numbers show early-training behaviour, not converged quality.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Optional

import benchlib  # first: it sets HF_HUB_OFFLINE before transformers is imported
import torch
from benchlib import pad_batch

import peft_ext
from peft_ext._io import atomic_savefig, atomic_write_json
from peft_ext.tuners._shared.routing import routing_statistics

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TASKS = ["sentiment", "gsm", "bfcl"]
# variant -> MoLA experts per layer (a depth pattern: layer i gets pattern[4·i // L]); None: plain LoRA r=16
VARIANTS = {"lora": None, "mola_inverted_triangle": "2,4,6,8", "mola_uniform": 5, "mola_triangle": "8,6,4,2"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random Llama and a few steps: a smoke test")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per variant")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=80, help="training items per task")
    p.add_argument("--n-eval", type=int, default=24, help="eval items per task")
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--balance-weight", type=float, default=0.01, help="MoLA load-balancing loss weight")
    p.add_argument("--variants", default="lora,mola_inverted_triangle,mola_uniform",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default="results/repro_routed.json")
    p.add_argument("--plot", default="results/repro_routed_load.png")
    args = p.parse_args(argv)
    unknown = [v for v in (v.strip() for v in args.variants.split(",")) if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown variant(s) {unknown}; allowed: {', '.join(VARIANTS)}")
    if args.quick:
        args.steps, args.n_train, args.n_eval, args.max_length = min(args.steps, 6), 8, 4, 96
    return args


def load_model(quick: bool, seed: int):
    """(tokenizer, causal LM): SmolLM2-135M-Instruct, or a tiny random Llama (6 layers) with MiniLM's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from peft_ext.data import minilm_path
    from peft_ext.data.smollm import smollm2_path

    torch.manual_seed(seed)
    if quick:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                             pad_token_id=tokenizer.pad_token_id)
        model = AutoModelForCausalLM.from_config(config)
    else:
        folder = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def task_pairs(n_train: int, n_eval: int, seed: int) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{task: {"train": [(prompt, target)], "eval": [...]}} from the three offline corpora."""
    from peft_ext.data import load_movie_reviews
    from peft_ext.data.bfcl import load_bfcl
    from peft_ext.data.gsm import load_gsm
    from peft_ext.runner import causal_lm_pairs

    out = {}
    reviews = load_movie_reviews(seed=seed)
    for split, key, n in (("train", "train", n_train), ("test", "eval", n_eval)):
        rows = reviews[split].select(range(n))
        out.setdefault("sentiment", {})[key] = [
            (f"Review: {text}\nSentiment:", " positive" if label == 1 else " negative")
            for text, label in zip(rows["text"], rows["label"])
        ]
    for name, loader in (("gsm", load_gsm), ("bfcl", load_bfcl)):
        data = loader(seed=seed)
        for split, key, n in (("train", "train", n_train), ("test", "eval", n_eval)):
            rows = data[split].select(range(min(n, len(data[split]))))
            out.setdefault(name, {})[key] = causal_lm_pairs(name, rows[:])
    return out


def encode(tokenizer, prompt: str, target: str, max_length: int) -> dict:
    """Token ids of prompt + target + eos, labels -100 on the prompt; cut to ``max_length`` from the left of the
    prompt so the answer survives."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(target + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    a = a[: max_length // 2]
    p = p[-(max_length - len(a)):]
    return {"input_ids": p + a, "labels": [-100] * len(p) + a, "prompt_len": len(p)}


def variant_config(name: str, balance_weight: float):
    """The PEFT config of a variant (see the module docstring)."""
    from peft import LoraConfig, TaskType

    if name not in VARIANTS:
        raise ValueError(f"variant {name!r} is unknown; allowed: {', '.join(VARIANTS)}")
    experts = VARIANTS[name]
    if experts is None:
        return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type=TaskType.CAUSAL_LM)
    return peft_ext.MolaConfig(r=8, lora_alpha=16, lora_dropout=0.0, num_experts=experts, top_k=2,
                               balance_loss_weight=balance_weight, target_modules=TARGETS,
                               task_type=TaskType.CAUSAL_LM)


def active_params(model, name: str) -> int:
    """Adapter parameters used per token: all of LoRA; for MoLA the routers plus top_k experts of each layer."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name == "lora":
        return total
    active = 0
    for n, p in model.named_parameters():
        if p.requires_grad and "router" in n:
            active += p.numel()
    cfg = model.peft_config["default"]
    for module in model.modules():
        if hasattr(module, "in_features") and hasattr(module, "last_load") and hasattr(module, "num_experts"):
            active += cfg.top_k * cfg.r * (module.in_features + module.out_features)
    return active


@torch.no_grad()
def evaluate(model, tokenizer, data, args) -> dict:
    """Token-weighted eval loss per task and sentiment accuracy; expert load per task for routed models."""
    model.eval()
    result, loads = {}, {}
    pos = tokenizer(" positive", add_special_tokens=False)["input_ids"][0]
    neg = tokenizer(" negative", add_special_tokens=False)["input_ids"][0]
    for task in TASKS:
        rows = [encode(tokenizer, p, t, args.max_length) for p, t in data[task]["eval"]]
        total, tokens, correct, layer_loads = 0.0, 0, 0, {}
        for start in range(0, len(rows), 8):
            chunk = rows[start : start + 8]
            batch = pad_batch(chunk, tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                     shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
            n = int((shift_labels != -100).sum())
            total, tokens = total + float(loss), tokens + n
            if task == "sentiment":
                for i, r in enumerate(chunk):
                    at = logits[i, r["prompt_len"] - 1]
                    truth = r["labels"][r["prompt_len"]]
                    correct += int((pos if at[pos] > at[neg] else neg) == truth)
            for module_name, per_adapter in routing_statistics(model).items():
                layer = _layer_index(module_name)
                if layer is None:
                    continue
                load = per_adapter["default"].float()
                layer_loads.setdefault(layer, []).append(load * len(chunk))
        result[task] = {"eval_loss": total / max(tokens, 1)}
        if task == "sentiment":
            result[task]["accuracy"] = correct / len(rows)
        if layer_loads:
            n_items = len(rows) * len(TARGETS)
            loads[task] = {layer: (torch.stack(v).sum(0) / n_items).tolist()
                           for layer, v in sorted(layer_loads.items())}
    return {"tasks": result, "expert_load": loads}


def _layer_index(module_name: str) -> Optional[int]:
    parts = module_name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def train_variant(name: str, base, tokenizer, data, args) -> dict:
    """Train one variant for ``args.steps`` optimizer steps on the shuffled task mixture; evaluate before/after."""
    import copy

    from peft import get_peft_model

    torch.manual_seed(args.seed)
    model = get_peft_model(copy.deepcopy(base), variant_config(name, args.balance_weight))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mixture = [(task, p, t) for task in TASKS for p, t in data[task]["train"]]
    random.Random(args.seed).shuffle(mixture)
    encoded = [encode(tokenizer, p, t, args.max_length) for _, p, t in mixture]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / args.steps)
    model.train()
    losses, aux = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        rows = [encoded[(step * args.batch_size + i) % len(encoded)] for i in range(args.batch_size)]
        batch = pad_batch(rows, tokenizer.pad_token_id)
        out = model(**batch)
        out.loss.backward()
        extra = model.base_model.aux_loss() if hasattr(model.base_model, "aux_loss") else None
        aux.append(float(extra) if extra is not None else 0.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    train_time = time.perf_counter() - start
    metrics = evaluate(model, tokenizer, data, args)
    return {
        "variant": name,
        "trainable_params": trainable,
        "active_params_per_token": active_params(model, name),
        "train_time_s": train_time,
        "s_per_step": train_time / args.steps,
        "train_loss_first10": statistics.mean(losses[:10]),
        "train_loss_last10": statistics.mean(losses[-10:]),
        "aux_loss_last10": statistics.mean(aux[-10:]),
        "loss_curve": losses,
        **metrics,
    }


def plot_loads(results: list[dict], path: str) -> Optional[str]:
    """Heat maps of per-layer expert load (one row of panels per MoLA variant, one column per task)."""
    routed = [r for r in results if r["expert_load"]]
    if not routed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(routed), len(TASKS) + 1, figsize=(4 * (len(TASKS) + 1), 3.2 * len(routed)),
                             squeeze=False)
    for row, res in zip(axes, routed):
        for ax, task in zip(row, TASKS):
            loads = res["expert_load"][task]
            layers = sorted(int(k) for k in loads)
            width = max(len(v) for v in loads.values())
            grid = torch.full((len(layers), width), float("nan"))
            for i, layer in enumerate(layers):
                v = torch.tensor(loads[layer] if layer in loads else loads[str(layer)])
                grid[i, : len(v)] = v / 2  # top-2: share of the two routing slots
            im = ax.imshow(grid.numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{res['variant']} — {task}")
            ax.set_xlabel("expert")
            ax.set_ylabel("decoder layer")
        fig.colorbar(im, ax=row[len(TASKS) - 1])
        ax = row[-1]
        for task in TASKS:
            loads = res["expert_load"][task]
            layers = sorted(int(k) for k in loads)
            cv = []
            for layer in layers:
                v = torch.tensor(loads[layer] if layer in loads else loads[str(layer)])
                cv.append(float(v.std(unbiased=False) / v.mean()) if v.numel() > 1 else 0.0)
            ax.plot(layers, cv, marker="o", label=task)
        ax.set_title(f"{res['variant']} — load imbalance (CV)")
        ax.set_xlabel("decoder layer")
        ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=90)
    plt.close(fig)
    return path


def table(results: list[dict]) -> str:
    head = ["variant", "trainable", "active / token", "sentiment acc", *[f"{t} eval loss" for t in TASKS],
            "s/step", "train loss first→last 10"]
    cells = []
    for r in results:
        t = r["tasks"]
        cells.append([
            r["variant"], f"{r['trainable_params']:,}", f"{r['active_params_per_token']:,}",
            f"{t['sentiment']['accuracy']:.3f}", *[f"{t[k]['eval_loss']:.3f}" for k in TASKS],
            f"{r['s_per_step']:.2f}", f"{r['train_loss_first10']:.3f} → {r['train_loss_last10']:.3f}",
        ])
    return benchlib.markdown(head, cells)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer, base = load_model(args.quick, args.seed)
    base.requires_grad_(False)
    data = task_pairs(args.n_train, args.n_eval, args.seed)
    results = []
    untrained = evaluate(base, tokenizer, data, args)
    for name in args.variants.split(","):
        print(f"training {name} ...", file=sys.stderr)
        results.append(train_variant(name.strip(), base, tokenizer, data, args))
        print(f"  {results[-1]['train_time_s']:.0f} s", file=sys.stderr)
    md = table(results)
    print("untrained: " + ", ".join(f"{t} loss {v['eval_loss']:.3f}" for t, v in untrained["tasks"].items())
          + f", sentiment acc {untrained['tasks']['sentiment']['accuracy']:.3f}")
    print(md)
    plot = plot_loads(results, args.plot)
    payload = {
        "description": "MoLA vs LoRA at equal active parameters on a sentiment/GSM/BFCL mixture; see the docstring "
        "of scripts/repro_routed.py.",
        "settings": vars(args),
        "untrained": untrained["tasks"],
        "results": results,
        "plot": plot,
        "table_markdown": md,
        "runtime_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}" + (f" and {plot}" if plot else "") + f" in {payload['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
