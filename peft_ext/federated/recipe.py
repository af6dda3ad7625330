"""Federated recipes: one YAML file names the model, the adapter method, the data and its non-IID client split, the
FLASC settings and the engine (Flower simulation on Ray, or the in-process loop). ``run_federated_recipe`` runs it and
writes ``metrics.json`` (accuracy and bytes up/down per round), ``accuracy_vs_bytes.png`` and the final adapter.

Example (``recipes/flasc_sentiment.yaml``)::

    name: flasc_sentiment
    output_dir: out/flasc_sentiment
    model: {name: minilm, task: seq_cls, num_labels: 2}
    method: {name: lora, config: {r: 8, lora_alpha: 16, target_modules: [query, value]}}
    data: {source: vader, num_clients: 10, dirichlet_alpha: 0.5, max_per_domain: 400}
    flasc: {rounds: 10, clients_per_round: 5, dl_density: 0.25, ul_density: 0.25}
    engine: {name: flower}
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np

from ..recipe import MethodSection, ModelSection, RecipeError, _build, method_config_class
from .flasc import FlascConfig, FlascServer, client_seed, run_local

logger = logging.getLogger(__name__)

DATA_SOURCES = ("vader", "toy_sentiment")
FEDERATED_MODELS = ("minilm", "tiny-bert")


@dataclass
class FederatedDataSection:
    """The data set and its seeded Dirichlet non-IID split over clients."""

    source: Literal["vader", "toy_sentiment"] = field(
        default="vader",
        metadata={"help": "vader: the VADER snippet domains (peft_ext.data.load_vader_domain); toy_sentiment: a "
                  "tiny synthetic set for tests."},
    )
    domains: list = field(
        default_factory=lambda: ["movies", "tweets", "products", "editorials"],
        metadata={"help": "vader: which domains to pool (movies, tweets, products, editorials)."},
    )
    max_per_domain: Optional[int] = field(
        default=None, metadata={"help": "vader: keep at most this many snippets per domain (before the test split)."}
    )
    test_size: float = field(default=0.2, metadata={"help": "vader: fraction of each domain held out for evaluation."})
    max_eval: Optional[int] = field(default=None, metadata={"help": "Evaluate on at most this many test examples."})
    max_length: int = field(default=64, metadata={"help": "Truncate inputs to this many tokens."})
    num_clients: int = field(default=10, metadata={"help": "Number of clients (Flower supernodes) to split over."})
    dirichlet_alpha: float = field(
        default=0.5, metadata={"help": "Concentration of the per-class Dirichlet split (smaller = more non-IID)."}
    )
    min_client_examples: int = field(
        default=2, metadata={"help": "Redraw the split until every client holds at least this many examples."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the domain splits and of the Dirichlet split."})


@dataclass
class EngineSection:
    """Where the rounds run."""

    name: Literal["flower", "local"] = field(
        default="flower",
        metadata={"help": "flower: Flower's simulation engine (Ray), one supernode per client; local: the same pure "
                  "functions in this process (no Ray)."},
    )
    client_cpus: float = field(default=1.0, metadata={"help": "flower: CPUs Ray reserves per ClientApp actor."})
    ray_cpus: Optional[int] = field(
        default=None, metadata={"help": "flower: CPUs Ray may use in all (null = Ray's default, all of them)."}
    )


@dataclass
class FederatedEvaluation:
    """What to record."""

    eval_every: int = field(default=1, metadata={"help": "Evaluate the global adapter every this many rounds."})
    plot: bool = field(default=True, metadata={"help": "Write accuracy_vs_bytes.png (needs matplotlib)."})
    save_adapter: bool = field(default=True, metadata={"help": "Save the final global adapter into output_dir."})


@dataclass
class FederatedRecipe:
    """A federated FLASC run (``peft-ext federate RECIPE``)."""

    name: str = field(default="flasc", metadata={"help": "Name of the run, used in result files."})
    paper: str = field(
        default="", metadata={"help": "The paper this recipe reproduces (title and link); `peft-ext recipes` lists it."}
    )
    tiny: Optional[str] = field(
        default=None,
        metadata={"help": "A full-size recipe's seconds-long variant: a file name in the same folder (the test suite "
                  "runs it end to end)."},
    )
    output_dir: str = field(default="out/flasc", metadata={"help": "Folder for metrics.json, plot, adapter."})
    seed: int = field(default=0, metadata={"help": "Seed of the base model head and the adapter initialisation."})
    model: ModelSection = field(default_factory=ModelSection, metadata={"help": "The base model (seq_cls)."})
    method: MethodSection = field(default_factory=MethodSection, metadata={"help": "The adapter (any tuner)."})
    data: FederatedDataSection = field(default_factory=FederatedDataSection, metadata={"help": "Data and split."})
    flasc: FlascConfig = field(default_factory=FlascConfig, metadata={"help": "FLASC settings (FlascConfig)."})
    engine: EngineSection = field(default_factory=EngineSection, metadata={"help": "Flower simulation or local."})
    evaluation: FederatedEvaluation = field(default_factory=FederatedEvaluation, metadata={"help": "Recording."})


def federated_recipe_from_dict(data: dict) -> FederatedRecipe:
    """Validate a mapping into a ``FederatedRecipe``; a ``RecipeError`` names the key and what is allowed."""
    if not isinstance(data, dict):
        raise RecipeError(f"A federated recipe must be a mapping of sections; got {type(data).__name__}.")
    data = copy.deepcopy(data)
    try:
        recipe = _build(FederatedRecipe, data, "")
    except RecipeError:
        raise
    except (ValueError, TypeError) as exc:  # FlascConfig.__post_init__
        raise RecipeError(f"flasc: {exc}") from exc
    _validate(recipe)
    return recipe


def load_federated_recipe(path_or_dict: Union[str, Path, dict]) -> FederatedRecipe:
    """Read and validate a federated recipe from a YAML file (or a mapping)."""
    if isinstance(path_or_dict, FederatedRecipe):
        return path_or_dict
    if isinstance(path_or_dict, dict):
        return federated_recipe_from_dict(path_or_dict)
    import yaml

    path = Path(path_or_dict)
    if not path.is_file():
        raise RecipeError(f"Recipe file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        raise RecipeError(f"Recipe file {str(path)!r} is empty (see recipes/tiny_flasc.yaml).")
    return federated_recipe_from_dict(data)


def _validate(recipe: FederatedRecipe) -> None:
    from ..recipe import method_names

    if recipe.model.name not in FEDERATED_MODELS and not Path(recipe.model.name).is_dir():
        raise RecipeError(f"model.name must be one of {list(FEDERATED_MODELS)} or a local folder; "
                          f"got {recipe.model.name!r}.")
    if recipe.model.task != "seq_cls":
        raise RecipeError(f"model.task must be 'seq_cls' for federated sentiment; got {recipe.model.task!r}.")
    if recipe.method.name not in method_names():
        raise RecipeError(f"method.name must be one of {method_names()}; got {recipe.method.name!r}.")
    config_cls = method_config_class(recipe.method.name)
    allowed = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for name in recipe.method.config:
        if name not in allowed:
            from ..recipe import unknown_key_error

            raise unknown_key_error(f"method.config.{name}", name, allowed)
    data = recipe.data
    from ..data import VADER_DOMAINS

    for domain in data.domains:
        if domain not in VADER_DOMAINS:
            raise RecipeError(f"data.domains: unknown domain {domain!r}; allowed: {sorted(VADER_DOMAINS)}.")
    if not data.domains:
        raise RecipeError("data.domains must name at least one domain.")
    checks = [("data.num_clients", data.num_clients, 1), ("data.max_length", data.max_length, 2),
              ("data.min_client_examples", data.min_client_examples, 1),
              ("evaluation.eval_every", recipe.evaluation.eval_every, 1)]
    for key, value, low in checks:
        if value < low:
            raise RecipeError(f"{key} must be an integer >= {low}; got {value!r}.")
    if data.max_per_domain is not None and data.max_per_domain < 10:
        raise RecipeError(f"data.max_per_domain must be >= 10 or null; got {data.max_per_domain!r}.")
    if data.max_eval is not None and data.max_eval < 1:
        raise RecipeError(f"data.max_eval must be >= 1 or null; got {data.max_eval!r}.")
    if not 0 < data.test_size < 1:
        raise RecipeError(f"data.test_size must lie in (0, 1); got {data.test_size!r}.")
    if not data.dirichlet_alpha > 0:
        raise RecipeError(f"data.dirichlet_alpha must be > 0; got {data.dirichlet_alpha!r}.")
    if recipe.flasc.clients_per_round > data.num_clients:
        raise RecipeError(f"flasc.clients_per_round ({recipe.flasc.clients_per_round}) exceeds data.num_clients "
                          f"({data.num_clients}).")
    if not recipe.engine.client_cpus > 0:
        raise RecipeError(f"engine.client_cpus must be > 0; got {recipe.engine.client_cpus!r}.")


def recipe_to_dict(recipe: FederatedRecipe) -> dict:
    """The recipe as plain data (result files, Flower run config)."""
    return dataclasses.asdict(recipe)


# ----------------------------------------------------------------------------------------------------- data split


def dirichlet_split(labels, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list:
    """Seeded non-IID split: for each class, its shuffled examples are cut among clients in proportions drawn from
    ``Dirichlet(alpha · 1)``; redrawn (same generator) until every client holds at least ``min_size`` examples.
    Returns one sorted index array per client."""
    labels = np.asarray(labels)
    if len(labels) < num_clients * min_size:
        raise ValueError(f"dirichlet_split: {len(labels)} examples cannot give {num_clients} clients "
                         f"{min_size} each.")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"dirichlet_split: no split with {min_size} examples per client after 1000 draws; raise "
                     "data.dirichlet_alpha or lower data.num_clients.")


# ------------------------------------------------------------------------------------------------ model and data


class FlascTask:
    """What a recipe needs on either side: the PEFT model (same seed everywhere, so every party holds the same frozen
    base), the client partitions and the central test set. Built once per process (``get_task``)."""

    def __init__(self, recipe: FederatedRecipe):
        import torch
        from peft import get_peft_model

        from ..recipe import Recipe
        from ..runner.data import build_peft_config, load_tokenizer_and_model

        self.recipe, self.cfg = recipe, recipe.flasc
        base_recipe = Recipe(name=recipe.name, seed=recipe.seed, model=recipe.model, method=recipe.method)
        self.tokenizer, base = load_tokenizer_and_model(base_recipe)
        torch.manual_seed(recipe.seed)
        self.model = get_peft_model(base, build_peft_config(base_recipe))
        self.initial_state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        train, test = self._load_texts()
        enc = self.tokenizer(train["text"], truncation=True, max_length=recipe.data.max_length)
        self.train_ids, self.train_labels = enc["input_ids"], np.asarray(train["label"], dtype=np.int64)
        enc = self.tokenizer(test["text"], truncation=True, max_length=recipe.data.max_length)
        self.test_ids, self.test_labels = enc["input_ids"], np.asarray(test["label"], dtype=np.int64)
        self.partitions = dirichlet_split(self.train_labels, recipe.data.num_clients, recipe.data.dirichlet_alpha,
                                          recipe.data.seed, recipe.data.min_client_examples)

    def _load_texts(self):
        data = self.recipe.data
        if data.source == "toy_sentiment":
            from ..runner.data import toy_sentiment

            split = toy_sentiment(seed=data.seed)
            train = {"text": list(split["train"]["text"]), "label": list(split["train"]["label"])}
            test = {"text": list(split["test"]["text"]), "label": list(split["test"]["label"])}
        else:
            from ..data import load_vader_domain

            train, test = {"text": [], "label": []}, {"text": [], "label": []}
            for domain in data.domains:
                split = load_vader_domain(domain, test_size=data.test_size, seed=data.seed,
                                          max_examples=data.max_per_domain)
                for out, part in ((train, split["train"]), (test, split["test"])):
                    out["text"].extend(part["text"])
                    out["label"].extend(int(v) for v in part["label"])
        if data.max_eval is not None and len(test["text"]) > data.max_eval:  # a seeded subset, all domains mixed
            keep = np.sort(np.random.default_rng(data.seed).permutation(len(test["text"]))[: data.max_eval])
            test = {k: [v[i] for i in keep] for k, v in test.items()}
        return train, test

    def _collate(self, ids, labels):
        import torch

        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
        return dict(batch)

    def client_batches(self, client_id: int, rnd: int) -> list:
        """Client ``client_id``'s batches in round index ``rnd`` (its partition, shuffled with the client seed)."""
        idx = self.partitions[client_id]
        order = np.random.default_rng(client_seed(self.cfg.seed, rnd, client_id)).permutation(idx)
        size = self.cfg.client_batch
        return [self._collate([self.train_ids[i] for i in order[s:s + size]], self.train_labels[order[s:s + size]])
                for s in range(0, len(order), size)]

    def evaluate(self, state: dict, batch_size: int = 64) -> dict:
        """Accuracy and mean loss of the model with adapter ``state`` on the central test set."""
        import torch

        from .flasc import trainable_parameters

        params = trainable_parameters(self.model)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
        self.model.eval()
        correct, loss_sum = 0, 0.0
        with torch.no_grad():
            for s in range(0, len(self.test_ids), batch_size):
                batch = self._collate(self.test_ids[s:s + batch_size], self.test_labels[s:s + batch_size])
                out = self.model(**batch)
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                loss_sum += float(out.loss) * len(batch["labels"])
        n = max(len(self.test_ids), 1)
        return {"accuracy": correct / n, "eval_loss": loss_sum / n}


_TASKS: dict = {}


def get_task(recipe: Union[FederatedRecipe, dict]) -> FlascTask:
    """The process-wide ``FlascTask`` of a recipe (built on first use; Ray actors reuse theirs across rounds)."""
    recipe = load_federated_recipe(recipe) if not isinstance(recipe, FederatedRecipe) else recipe
    key = json.dumps(recipe_to_dict(recipe), sort_keys=True, default=str)
    if key not in _TASKS:
        _TASKS.clear()
        _TASKS[key] = FlascTask(recipe)
    return _TASKS[key]


# ---------------------------------------------------------------------------------------------------------- runner


class RoundRecorder:
    """Progress per round, a resumable checkpoint and metrics.json after every round (all written atomically)."""

    def __init__(self, recipe: FederatedRecipe, task: FlascTask, quiet: bool, history: Optional[list] = None):
        self.recipe, self.task, self.quiet = recipe, task, quiet
        self.out = Path(recipe.output_dir)
        self.history = list(history or [])
        self.t0 = time.time()

    def evaluate(self, server: FlascServer) -> dict:
        """Central evaluation of this round's global adapter (every ``eval_every`` rounds and at the last)."""
        rnd = server.round
        if rnd % self.recipe.evaluation.eval_every == 0 or rnd == self.recipe.flasc.rounds:
            return self.task.evaluate(server.eval_state())
        return {}

    def __call__(self, record: dict, server: FlascServer) -> None:
        import torch

        from .._io import atomic_write, atomic_write_json

        self.history.append(record)
        total = sum(r["bytes_up"] + r["bytes_down"] for r in self.history)
        if not self.quiet:
            acc = f"acc {record['accuracy']:.4f} | " if "accuracy" in record else ""
            print(f"[flasc] round {record['round']}/{self.recipe.flasc.rounds} | {acc}loss {record['train_loss']:.4f}"
                  f" | up {record['bytes_up']:,} B down {record['bytes_down']:,} B (total {total:,} B)"
                  f" | rejected {record['rejected']} | {time.time() - self.t0:.0f}s", flush=True)
        atomic_write(self.out / "checkpoint.pt",
                     lambda f: torch.save({"server": server.state_dict(), "history": self.history}, f), binary=True)
        atomic_write_json(self.out / "metrics.json", self.metrics())

    def metrics(self) -> dict:
        """metrics.json: the recipe, per-round records and totals."""
        rounds = self.history
        evals = [r for r in rounds if "accuracy" in r]
        return {
            "name": self.recipe.name,
            "recipe": recipe_to_dict(self.recipe),
            "rounds": rounds,
            "final_accuracy": evals[-1]["accuracy"] if evals else None,
            "total_bytes_up": int(sum(r["bytes_up"] for r in rounds)),
            "total_bytes_down": int(sum(r["bytes_down"] for r in rounds)),
            "total_rejected": int(sum(r["rejected"] for r in rounds)),
            "client_sizes": [int(len(p)) for p in self.task.partitions],
        }


def plot_accuracy_vs_bytes(runs: dict, path) -> Optional[Path]:
    """Accuracy against cumulative bytes (up + down) for one or more runs ``{label: rounds}``; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .._io import atomic_savefig

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rounds in runs.items():
        total, xs, ys = 0, [], []
        for r in rounds:
            total += r["bytes_up"] + r["bytes_down"]
            if "accuracy" in r:
                xs.append(total / 2**20)
                ys.append(r["accuracy"])
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MiB communicated (up + down)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)


def _load_checkpoint(out: Path):
    import torch

    path = out / "checkpoint.pt"
    if not path.is_file():
        return None
    return torch.load(path, weights_only=False)


def run_federated_recipe(path_or_dict, resume: bool = False, quiet: bool = False) -> dict:
    """Run a federated recipe (YAML path, mapping or ``FederatedRecipe``) and return its metrics (also written to
    ``output_dir/metrics.json``). ``resume=True`` continues from ``output_dir/checkpoint.pt`` when present.

    Raises ``RecipeError`` (a ``ValueError``) for a bad recipe before anything runs."""
    recipe = load_federated_recipe(path_or_dict)
    out = Path(recipe.output_dir)
    ckpt = _load_checkpoint(out) if resume else None
    task = get_task(recipe)
    recorder = RoundRecorder(recipe, task, quiet, history=ckpt["history"] if ckpt else None)
    server = FlascServer(task.initial_state, recipe.flasc, recipe.data.num_clients)
    if ckpt:
        server.load_state_dict(ckpt["server"])
    if not quiet:
        sizes = [len(p) for p in task.partitions]
        print(f"[flasc] {recipe.name}: {recipe.data.num_clients} clients (Dirichlet α={recipe.data.dirichlet_alpha}, "
              f"seed {recipe.data.seed}; sizes {min(sizes)}..{max(sizes)}), {len(task.test_ids)} test examples, "
              f"engine {recipe.engine.name}, from round {server.round + 1}", flush=True)
    if server.round < recipe.flasc.rounds:
        if recipe.engine.name == "flower":
            try:
                from .flower import simulate
            except ImportError as exc:
                raise ImportError(f"engine.name 'flower' needs Flower with its Ray simulation engine: pip install "
                                  f"'peft-ext[federated]' (or set engine.name: local); {exc}") from exc

            simulate(recipe, server=server, on_round=recorder, evaluate=recorder.evaluate)
        else:
            def on_round(record, srv):
                record.update(recorder.evaluate(srv))
                recorder(record, srv)

            run_local(task.model, recipe.data.num_clients, task.client_batches, recipe.flasc, server=server,
                      on_round=on_round)
    metrics = recorder.metrics()
    if recipe.evaluation.plot:
        plot = plot_accuracy_vs_bytes({recipe.name: recorder.history}, out / "accuracy_vs_bytes.png")
        metrics["plot"] = str(plot) if plot else None
    if recipe.evaluation.save_adapter:
        import torch

        from ..runner.training import save_adapter
        from .flasc import trainable_parameters

        params = trainable_parameters(task.model)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(server.state()[name])
        save_adapter(task.model, task.tokenizer, out / "adapter")
        metrics["adapter_dir"] = str(out / "adapter")
    from .._io import atomic_write_json

    atomic_write_json(out / "metrics.json", metrics)
    return metrics
