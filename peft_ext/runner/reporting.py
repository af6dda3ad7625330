"""What a run reports: the results table, the plot, the model card's facts, and the record in the layout of PEFT's
``method_comparison`` results; deriving one method's recipe from another's for ``peft-ext compare``."""

from __future__ import annotations

import dataclasses
import platform
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional


from .._io import atomic_savefig
from ..recipe import Recipe, method_config_class


def format_table(metrics: dict) -> str:
    """A plain-text table of the evaluated ranks, with the untrained baseline beside it."""
    has_acc = any("accuracy" in row for row in metrics["results"])
    head = f"{'rank':>10} | {'eval loss':>9}" + (f" | {'accuracy':>8}" if has_acc else "")
    lines = [f"{metrics['method']} — {metrics['name']}", head, "-" * len(head)]
    rows = ([{"rank": "untrained", **metrics["baseline"]}] if metrics.get("baseline") else []) + metrics["results"]
    for row in rows:
        rank = "adapter" if row["rank"] is None else row["rank"]
        line = f"{rank!s:>10} | {row['eval_loss']:9.4f}"
        if has_acc:
            line += f" | {row.get('accuracy', float('nan')):8.4f}"
        lines.append(line)
    return "\n".join(lines)


def plot_ranks(metrics: dict, path: Path) -> Optional[Path]:
    """A PNG of accuracy (or eval loss) by rank, the untrained baseline as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = metrics["results"]
    key = "accuracy" if "accuracy" in rows[0] else "eval_loss"
    xs = [row["rank"] if row["rank"] is not None else 0 for row in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [row[key] for row in rows], marker="o", label=metrics["method"])
    if metrics.get("baseline") and key in metrics["baseline"]:
        ax.axhline(metrics["baseline"][key], linestyle="--", color="grey", label="untrained")
    ax.set_xlabel("evaluation rank" if rows[0]["rank"] is not None else "")
    ax.set_ylabel(key)
    ax.set_title(metrics["name"])
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


TINY_MODELS = {
    "tiny-bert": "a randomly initialised 2-layer BERT (hidden size 64) that peft-ext builds from its config for tests",
    "tiny-llama": "a randomly initialised 2-layer Llama (hidden size 64) that peft-ext builds from its config for "
                  "tests",
}


def device_name(cpu: str = "CPU") -> str:
    """The GPU a run used (CUDA device 0), else ``cpu``: the ``device`` every ``metrics.json`` records."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu


def card_run_facts(recipe: Recipe, args, n_train: int, n_eval: int, rows: list, baseline: Optional[dict], result,
                   train_time: float) -> dict:
    """What the model card records about a run: data and split, training arguments, results (``peft_ext.card``)."""
    from ..card import TRAINING_ARGS, dataset_facts

    values = args.to_dict()
    chosen = [k for k in TRAINING_ARGS if k in values] + sorted(k for k in recipe.training if k not in TRAINING_ARGS)
    training = {}
    for key in chosen:
        value = values.get(key, recipe.training.get(key))
        if key == "max_steps" and value is not None and value <= 0:
            continue
        if "dir" in key or "path" in key or "token" in key or "hub" in key:  # never the machine's paths or secrets
            continue
        training[key] = value
    base = None if baseline is None else {
        "eval_loss": baseline["eval_loss"],
        **({"accuracy": baseline["eval_accuracy"]} if "eval_accuracy" in baseline else {}),
    }
    return {
        "name": recipe.name,
        "base_description": TINY_MODELS.get(recipe.model.name, ""),
        "data": dataset_facts(recipe.data.name, recipe.data.seed, n_train, n_eval, recipe.data.max_length),
        "training": training,
        "results": rows,
        "baseline": base,
        "generate": recipe.evaluation.generate or None,
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_time": train_time,
        "device": device_name(),
    }


def _plain(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix == ".safetensors")


def _peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def comparison_record(metrics: dict, status: str = "success", error_msg: str = "") -> dict:
    """One run in the layout of PEFT's ``method_comparison`` results (``run_info``, ``train_info``, ``meta_info``)."""
    import peft
    import torch
    import transformers

    from ..version import __version__

    final = metrics.get("results", [{}])[-1] if metrics.get("results") else {}
    return {
        "run_info": {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "total_time": metrics.get("total_time"),
            "experiment_name": f"{metrics.get('method')}/{metrics.get('name')}",
            "train_config": metrics.get("recipe"),
            "peft_config": metrics.get("peft_config"),
            "error_msg": error_msg,
        },
        "train_info": {
            "cpu_memory_max" if not torch.cuda.is_available() else "cuda_memory_max": metrics.get("peak_memory_bytes"),
            "train_time": metrics.get("train_time"),
            "file_size": metrics.get("checkpoint_size"),
            "num_trainable_params": metrics.get("num_trainable_params"),
            "num_total_params": metrics.get("num_total_params"),
            "status": status,
            "metrics": [
                {
                    "step": metrics.get("train_steps"),
                    "test accuracy": final.get("accuracy"),
                    "test loss": final.get("eval_loss"),
                    "train loss": metrics.get("train_loss"),
                    "tokens / sec": metrics.get("tokens_per_sec"),
                    "rank": final.get("rank"),
                }
            ],
            "results_by_rank": metrics.get("results"),
        },
        "meta_info": {
            "package_info": {
                "peft-ext-version": __version__,
                "peft-version": peft.__version__,
                "transformers-version": transformers.__version__,
                "torch-version": torch.__version__,
            },
            "system_info": {
                "system": platform.system(),
                "release": platform.release(),
                "machine": platform.machine(),
                "processor": platform.processor(),
                "python": sys.version.split()[0],
                "gpu": device_name(cpu=""),
            },
        },
    }


def derive_method_recipe(recipe: Recipe, method: str) -> Recipe:
    """The recipe with ``method`` swapped in: keeps the config keys the new method accepts (target modules, rank,
    alpha, ...) and fills the rest from the method's example settings; evaluation ranks only for DyLoRA."""
    cls = method_config_class(method)
    accepted = {f.name for f in dataclasses.fields(cls) if f.init}
    config = {}
    if method != "lora":
        from ..registry import get_method

        config.update(get_method(method).example_kwargs)
    config.update({k: v for k, v in recipe.method.config.items() if k in accepted})
    ranks = recipe.evaluation.ranks if method == "dylora" else None
    return dataclasses.replace(
        recipe,
        output_dir=str(Path(recipe.output_dir) / method),
        method=dataclasses.replace(recipe.method, name=method, config=config),
        evaluation=dataclasses.replace(recipe.evaluation, ranks=ranks, plot=False),
    )
