"""Continual learning with CoDyRA: a sequence of sentiment domains trained one after the other on one classifier, with
``increment_task()`` between tasks, against sequential plain LoRA (train, merge, next task).

Paper: *Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with
Dynamic Rank-Selective LoRA* (CoDyRA, https://arxiv.org/abs/2412.01004); official code
https://github.com/Artificer-AI-Lab/CoDyRA (``models/codyra.py``: ``train_model``, ``increment_task``).

Protocol (``train_continual_recipe``): tasks are domains (the VADER snippet domains on MiniLM, or synthetic toy domains
for tests); after training task ``j`` the model is evaluated on the test split of every task, giving the accuracy
matrix ``acc[j][i]`` (task ``i`` after training task ``j``). Reported: average accuracy (mean of the last row) and
forgetting (for each task but the last, the best accuracy it ever had minus its final accuracy, averaged), plus
backward transfer. Both methods use the same targets (including the classification head, so no separate head drifts
between tasks), rank, optimizer (AdamW, weight decay 0, cosine schedule), steps and data order; CoDyRA also runs its
threshold schedule (``CodyraThresholdCallback.step()`` after every optimizer step).

This module also holds the domain data and seq-cls loop helpers the O3 unlearning recipe shares.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

PAPER = "https://arxiv.org/abs/2412.01004"
CODE = "https://github.com/Artificer-AI-Lab/CoDyRA"
PROGRESS_FILE = "progress.json"

# Synthetic domains for seconds-long tests and tiny recipes (data.name: toy_sentiment): each domain has its own
# template and nouns, and shares the sentiment words, so the domains are distinct but the task is the same.
TOY_DOMAINS = {
    "movies": ("the {noun} of this film was {word}", ["plot", "cast", "script", "ending", "score"]),
    "tweets": ("omg today was {word} lol #{noun}", ["monday", "weekend", "coffee", "traffic", "gym"]),
    "products": ("this {noun} works and feels {word}", ["blender", "charger", "kettle", "headset", "mouse"]),
    "editorials": ("the senate {noun} proposal is {word}", ["budget", "tax", "housing", "energy", "trade"]),
}
TOY_POSITIVE = ["great", "wonderful", "superb", "delightful", "brilliant"]
TOY_NEGATIVE = ["awful", "boring", "terrible", "clumsy", "dreadful"]
DATA_NAMES = ("movie_reviews", "toy_sentiment")


# ---------------------------------------------------------------------------------------------------------- data
def toy_domain(domain: str, n: int = 96, seed: int = 0, test_fraction: float = 0.25):
    """A tiny synthetic sentiment domain (``TOY_DOMAINS``) as ``{"train": rows, "test": rows}`` of (text, label)."""
    if domain not in TOY_DOMAINS:
        raise ValueError(f"toy domain must be one of {sorted(TOY_DOMAINS)}; got {domain!r}.")
    template, nouns = TOY_DOMAINS[domain]
    rng = np.random.default_rng([seed, sorted(TOY_DOMAINS).index(domain)])
    rows = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        word = rng.choice(TOY_POSITIVE if label else TOY_NEGATIVE)
        rows.append((template.format(noun=rng.choice(nouns), word=word), label))
    cut = n - max(1, int(round(test_fraction * n)))
    return {"train": rows[:cut], "test": rows[cut:]}


def load_domains(recipe, domains: list[str], max_examples: Optional[int], neutral_margin: float) -> dict:
    """``{domain: {"train": [(text, label)], "test": [...]}}`` for the recipe's ``data.name``: ``movie_reviews`` = the
    VADER snippet domains (``peft_ext.data.load_vader_domain``), ``toy_sentiment`` = ``toy_domain``; cut to
    ``data.max_train`` / ``data.max_eval``."""
    spec = recipe.data
    out = {}
    for domain in domains:
        if spec.name == "toy_sentiment":
            splits = toy_domain(domain, n=max_examples or 96, seed=spec.seed)
        else:
            from ..data import load_vader_domain

            data = load_vader_domain(domain, seed=spec.seed, max_examples=max_examples, neutral_margin=neutral_margin)
            splits = {k: list(zip(data[k]["text"], (int(x) for x in data[k]["label"]))) for k in ("train", "test")}
        if spec.max_train is not None:
            splits["train"] = splits["train"][: spec.max_train]
        if spec.max_eval is not None:
            splits["test"] = splits["test"][: spec.max_eval]
        out[domain] = splits
    return out


def check_domains(field_name: str, domains, data_name: str) -> None:
    """A list of known domain names, without repeats (a ValueError naming ``field_name`` otherwise)."""
    from ..data import VADER_DOMAINS

    known = sorted(TOY_DOMAINS) if data_name == "toy_sentiment" else sorted(VADER_DOMAINS)
    if not isinstance(domains, (list, tuple)) or not domains:
        raise ValueError(f"{field_name} must be a non-empty list of domains from {known}; got {domains!r}.")
    bad = [d for d in domains if d not in known]
    if bad:
        raise ValueError(f"{field_name}: unknown domain(s) {bad}; allowed: {known}.")
    if len(set(domains)) != len(domains):
        raise ValueError(f"{field_name} must not repeat a domain; got {list(domains)}.")


def encode(tokenizer, rows, max_length: int) -> dict:
    """Tokenize (text, label) rows into padded tensors with ``labels``."""
    batch = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.tensor([y for _, y in rows], dtype=torch.long)
    return batch


def batches(rows, batch_size: int, seed: Optional[int] = None):
    """The rows in batches, shuffled with ``numpy.random.default_rng(seed)`` (None: in order)."""
    order = np.arange(len(rows)) if seed is None else np.random.default_rng(seed).permutation(len(rows))
    for start in range(0, len(rows), batch_size):
        yield [rows[i] for i in order[start:start + batch_size]]


@torch.no_grad()
def accuracy(model, tokenizer, rows, max_length: int, batch_size: int = 64, **call_kwargs) -> float:
    """Classification accuracy of ``model`` (eval mode) on (text, label) rows; ``call_kwargs`` go to each call."""
    was_training = model.training
    model.eval()
    correct = 0
    for chunk in batches(rows, batch_size):
        batch = encode(tokenizer, chunk, max_length)
        labels = batch.pop("labels")
        logits = model(**batch, **call_kwargs).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / max(1, len(rows))


def train_classifier(model, tokenizer, rows, *, epochs: int, batch_size: int, learning_rate: float, max_length: int,
                     seed: int, after_step=None, progress: Optional[str] = None, betas=(0.9, 0.999)) -> list[dict]:
    """A plain seq-cls loop over ``rows``: AdamW (weight decay 0) on the trainable parameters with a cosine schedule,
    ``outputs.loss`` (CE plus any auxiliary loss the tuner adds), ``after_step(step, max_steps)`` after every optimizer
    step. Seeded (``torch.manual_seed(seed)`` for dropout, data order per epoch). Returns the per-epoch history."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_classifier: the model has no trainable parameters.")
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=betas, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    torch.manual_seed(seed)
    model.train()
    history, step = [], 0
    for epoch in range(epochs):
        losses = []
        for chunk in batches(rows, batch_size, seed=seed * 1000 + epoch):
            batch = encode(tokenizer, chunk, max_length)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"train_classifier: the loss became {loss.item()} at step {step}.")
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(step, total)
            step += 1
            losses.append(loss.item())
        history.append({"epoch": epoch + 1, "steps": step, "loss": float(np.mean(losses))})
        if progress:
            print(f"  {progress} epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}", flush=True)
    model.eval()
    return history


def continual_metrics(matrix: list[list[float]]) -> dict:
    """Average accuracy (mean of the last row), forgetting (mean over all tasks but the last of the best earlier
    accuracy minus the final one; Chaudhry et al.) and backward transfer (mean of final minus just-trained accuracy)
    of an accuracy matrix ``acc[j][i]`` = task ``i`` after training task ``j`` (square, T x T)."""
    acc = np.asarray(matrix, dtype=float)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] == 0:
        raise ValueError(f"continual_metrics: the accuracy matrix must be square T x T; got shape {acc.shape}.")
    t = acc.shape[0]
    final = acc[-1]
    forgetting = [acc[:t - 1, i].max() - final[i] for i in range(t - 1)]
    bwt = [final[i] - acc[i, i] for i in range(t - 1)]
    return {
        "average_accuracy": float(final.mean()),
        "forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
        "backward_transfer": float(np.mean(bwt)) if bwt else 0.0,
    }


def load_progress(folder: Path) -> dict:
    """The progress record a resumable recipe keeps in ``folder`` (empty when there is none)."""
    path = folder / PROGRESS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_progress(folder: Path, progress: dict) -> None:
    from .._io import atomic_write_json

    atomic_write_json(folder / PROGRESS_FILE, progress)


def seqcls_model(recipe):
    """The recipe's tokenizer and seq-cls base model (``peft_ext.runner.load_tokenizer_and_model``), in eval mode."""
    from ..runner import load_tokenizer_and_model

    tokenizer, model = load_tokenizer_and_model(recipe)
    return tokenizer, model.eval()


def adapter_kwargs(recipe) -> dict:
    """``method.config`` with no task type: a generic ``PeftModel`` (PEFT's seq-cls wrapper would add a trainable copy
    of the head that no adapter gate or task fold controls)."""
    kwargs = dict(recipe.method.config)
    kwargs.pop("task_type", None)
    kwargs.setdefault("target_modules", ["query", "value", "classifier"])
    return kwargs


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class ContinualConfig:
    """Settings of the CoDyRA continual-learning recipe (https://arxiv.org/abs/2412.01004): which tasks, how long each
    is trained, and the sequential plain-LoRA baseline."""

    tasks: list = field(
        default_factory=lambda: ["movies", "tweets", "products", "editorials"],
        metadata={"help": "The task sequence: sentiment domains trained in this order (VADER domains for data.name "
                  "movie_reviews; the synthetic toy domains for toy_sentiment)."},
    )
    max_examples: Optional[int] = field(
        default=1000, metadata={"help": "Examples per domain before the train/test split (seeded subset); null = all."}
    )
    neutral_margin: float = field(
        default=0.5, metadata={"help": "VADER domains: drop snippets with |rating| <= this (near-neutral ones)."}
    )
    epochs: int = field(default=2, metadata={"help": "Epochs per task (both methods)."})
    batch_size: int = field(default=16, metadata={"help": "Examples per optimizer step."})
    learning_rate: float = field(
        default=2e-3, metadata={"help": "AdamW learning rate (both methods; cosine per task)."})
    baseline: bool = field(
        default=True,
        metadata={"help": "Also run sequential plain PEFT LoRA (same targets and rank, lora_alpha = baseline_alpha), "
                  "merged into the base after each task."},
    )
    baseline_alpha: Optional[float] = field(
        default=None, metadata={"help": "lora_alpha of the baseline LoRA; null = its rank (scale 1, like CoDyRA)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the accuracy evaluation."})

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ContinualConfig.{name} must be an integer >= 1; got {value!r}.")
        if self.max_examples is not None and (
            isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 4
        ):
            raise ValueError(
                f"ContinualConfig.max_examples must be null or an integer >= 4; got {self.max_examples!r}.")
        for name in ("learning_rate", "neutral_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name == "learning_rate" and value == 0):
                bound = "> 0" if name == "learning_rate" else ">= 0"
                raise ValueError(f"ContinualConfig.{name} must be a finite number {bound}; got {value!r}.")
        if self.baseline_alpha is not None and (isinstance(self.baseline_alpha, bool)
                                                or not isinstance(self.baseline_alpha, (int, float))
                                                or not self.baseline_alpha > 0):
            raise ValueError(
                f"ContinualConfig.baseline_alpha must be null or a number > 0; got {self.baseline_alpha!r}.")
        if not isinstance(self.tasks, (list, tuple)) or len(self.tasks) < 2:
            raise ValueError(f"ContinualConfig.tasks must list at least two domains; got {self.tasks!r}.")
        self.tasks = list(self.tasks)


def continual_config_from_recipe(recipe) -> ContinualConfig:
    """``ContinualConfig`` from ``trainer.args`` (unknown keys: a ValueError naming them and the allowed ones)."""
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, ContinualConfig)


def check_recipe(recipe) -> None:
    """What ``trainer: continual`` needs besides its ``trainer.args``: a CoDyRA adapter on a seq-cls model, sentiment
    domains (``movie_reviews`` = VADER, ``toy_sentiment`` = synthetic)."""
    if recipe.method.name != "codyra":
        raise ValueError(f"trainer 'continual' needs method.name 'codyra'; got {recipe.method.name!r}.")
    if recipe.model.task != "seq_cls" or recipe.data.name not in DATA_NAMES:
        raise ValueError(f"trainer 'continual' needs model.task 'seq_cls' and data.name one of {list(DATA_NAMES)}; "
                         f"got {recipe.model.task!r} with {recipe.data.name!r}.")
    if recipe.model.quantization is not None:
        raise ValueError("trainer 'continual': increment_task folds tasks into the base weights; model.quantization "
                         "must be null.")
    config = continual_config_from_recipe(recipe)
    check_domains("trainer.args.tasks", config.tasks, recipe.data.name)


# ---------------------------------------------------------------------------------------------------------- runs
def _run_sequence(method: str, recipe, config: ContinualConfig, tokenizer, base_state, base, data, out: Path,
                  resume: bool, quiet: bool) -> dict:
    """Train ``config.tasks`` one after the other with ``method`` ('codyra' or 'lora'); resumable per task."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from ..callbacks.codyra import CodyraThresholdCallback
    from ..tuners.codyra import CodyraConfig, effective_rank, increment_task

    folder = out / method
    progress = load_progress(folder) if resume else {}
    done = progress.get("rows", [])
    model = copy.deepcopy(base)
    model.load_state_dict(base_state)  # the untouched base, whatever ran before
    kwargs = adapter_kwargs(recipe)
    if method == "codyra":
        peft_config = CodyraConfig(**kwargs)
    else:
        r = int(kwargs.get("r", 16))
        peft_config = LoraConfig(r=r, lora_alpha=config.baseline_alpha or r, target_modules=kwargs["target_modules"],
                                 lora_dropout=float(kwargs.get("lora_dropout", 0.0)))
    start = len(done)
    if method == "codyra":
        if start:
            model = PeftModel.from_pretrained(model, folder / f"task_{start}", is_trainable=True)
        else:
            torch.manual_seed(recipe.seed)
            model = get_peft_model(model, peft_config)
    else:
        for j in range(start):  # the merged base of the finished tasks, with the arithmetic of the first run
            model = PeftModel.from_pretrained(model, folder / f"task_{j + 1}").merge_and_unload()
    rows, histories, ranks = list(done), progress.get("history", []), progress.get("effective_rank", [])
    for j in range(start, len(config.tasks)):
        task = config.tasks[j]
        began = time.time()
        seed = recipe.seed * 100 + j
        if method == "lora":
            torch.manual_seed(seed)
            model = get_peft_model(model, copy.deepcopy(peft_config))
            step = None
        else:
            callback = CodyraThresholdCallback(model)
            step = callback.step
        history = train_classifier(
            model, tokenizer, data[task]["train"], epochs=config.epochs, batch_size=config.batch_size,
            learning_rate=config.learning_rate, max_length=recipe.data.max_length, seed=seed, after_step=step,
            progress=None if quiet else f"{method} task {j + 1}/{len(config.tasks)} ({task})")
        if method == "codyra":
            ranks.append(int(sum(effective_rank(model).values())))
            increment_task(model)  # fold the task into W; the next task's adapter starts at B = 0
        else:
            task_folder = folder / f"task_{j + 1}"
            _save_adapter(model, task_folder)
            model = model.merge_and_unload()
        row = [accuracy(model, tokenizer, data[t]["test"], recipe.data.max_length, config.eval_batch_size)
               for t in config.tasks]
        if method == "codyra":
            _save_adapter(model, folder / f"task_{j + 1}")
        rows.append(row)
        histories.append({"task": task, "time_s": time.time() - began, "epochs": history})
        save_progress(folder, {"rows": rows, "history": histories, "effective_rank": ranks})
        if not quiet:
            print(f"{method} after task {j + 1} ({task}): " + ", ".join(
                f"{t} {a:.3f}" for t, a in zip(config.tasks, row)), flush=True)
    result = {"accuracy_matrix": rows, **continual_metrics(rows), "history": histories}
    if method == "codyra":
        result["effective_rank_per_task"] = ranks
    return result


def _save_adapter(model, folder: Path) -> None:
    """``save_pretrained`` into a temporary sibling folder, then rename it into place (never a half-written adapter)."""
    import shutil
    import uuid

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        model.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _plot(results: dict, tasks: list[str], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .._io import atomic_savefig

    methods = [m for m in ("codyra", "lora") if m in results]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        acc = np.asarray(results[method]["accuracy_matrix"])
        image = ax.imshow(acc, vmin=0.4, vmax=1.0, cmap="viridis")
        for (j, i), value in np.ndenumerate(acc):
            ax.text(i, j, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize=7)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=7)
        r = results[method]
        ax.set_title(f"{method}: avg {r['average_accuracy']:.3f}, forgetting {r['forgetting']:.3f}", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def train_continual_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for CoDyRA continual learning (https://arxiv.org/abs/2412.01004), ``trainer: {name: continual,
    args: {...ContinualConfig...}}``: trains ``tasks`` in order with one CoDyRA adapter and ``increment_task()`` between
    tasks, and (``baseline``) sequential plain LoRA merged after each task; writes ``codyra/task_<j>/`` and
    ``lora/task_<j>/`` adapters, ``metrics.json`` (accuracy matrices, average accuracy, forgetting) and
    ``results.png``, each atomically. ``resume`` continues after the last finished task of each method."""
    from .._io import atomic_write_json
    from ..recipe import to_dict
    from ..runner.reporting import device_name

    check_recipe(recipe)
    config = continual_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, base = seqcls_model(recipe)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    data = load_domains(recipe, config.tasks, config.max_examples, config.neutral_margin)
    initial = [accuracy(base, tokenizer, data[t]["test"], recipe.data.max_length, config.eval_batch_size)
               for t in config.tasks]
    results = {}
    for method in ("codyra", "lora") if config.baseline else ("codyra",):
        results[method] = _run_sequence(method, recipe, config, tokenizer, base_state, base, data, out, resume, quiet)
    metrics = {
        "name": recipe.name,
        "trainer": "continual",
        "method": recipe.method.name,
        "seed": recipe.seed,
        "paper": PAPER,
        "official_code": CODE,
        "continual": asdict(config),
        "tasks": config.tasks,
        "task_sizes": {t: {"train": len(data[t]["train"]), "test": len(data[t]["test"])} for t in config.tasks},
        "initial_accuracy": initial,
        "methods": results,  # not "results": comparison_record reads that key as a list of evaluations
        "budget": {"wall_time_s": time.time() - began, "epochs_per_task": config.epochs,
                   "batch_size": config.batch_size},
        "device": device_name(),
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot:
        _plot(results, config.tasks, out / "results.png")
    if not quiet:
        for method, r in results.items():
            print(f"continual — {method}: average accuracy {r['average_accuracy']:.3f}, forgetting "
                  f"{r['forgetting']:.3f}, backward transfer {r['backward_transfer']:.3f}")
        print(f"metrics: {out / 'metrics.json'}")
    return metrics
