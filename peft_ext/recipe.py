"""Training recipes: one YAML file names the model, the data, the method and its config, the training arguments and
the evaluation. ``load_recipe`` validates it strictly: an unknown or misspelt key, a wrong type or an unknown method
gives one ``RecipeError`` naming the key and what is allowed.

Example (``recipes/quickstart.yaml``)::

    name: quickstart
    output_dir: out/quickstart
    model: {name: minilm, task: seq_cls, num_labels: 2}
    data: {name: movie_reviews, max_train: 1600, max_length: 64}
    method:
      name: dylora
      config: {r: 8, lora_alpha: 16, target_modules: [query, value]}
    training: {num_train_epochs: 2, learning_rate: 0.002, per_device_train_batch_size: 16}
    evaluation: {ranks: all, baseline: true, plot: true}

A ``trainer:`` section (``trainer: {name: mrdpo, rounds: 3, ...}`` or just ``trainer: mrdpo``) runs a training recipe
from ``peft_ext.trainers`` instead of the plain Trainer: the TRL ones sft, dpo, mrdpo, grpo, sft_grpo (causal LMs on
gsm; ``recipes/mrdpo_gsm.yaml``, ``recipes/gazal_gsm.yaml``) and the own-loop ones in ``OWN_LOOP_TRAINERS`` (mtp,
planner, lorid, unlearning, continual), whose settings are ``trainer.args``. The application recipes (issue
"application papers": LoRAT, MoRE, ...) are own-loop trainers too, one module per paper in ``peft_ext/apps``: the
trainer name is the module name, and the module's ``RECIPE`` dict names its config class, entry point and the
``data.name`` / ``model.task`` / extra ``model.name`` values it accepts (``app_trainer_names``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import pkgutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

MODEL_NAMES = ("minilm", "smollm2", "tiny-llama", "tiny-bert")
TASKS = ("seq_cls", "causal_lm")
DATA_NAMES = ("movie_reviews", "gsm", "bfcl", "toy_sentiment")


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key, the value and what is allowed."""


@dataclass
class ModelSection:
    """Which base model to adapt."""

    name: str = field(
        default="minilm",
        metadata={"help": f"One of {MODEL_NAMES} (offline models and tiny random test models) or a local folder."},
    )
    task: str = field(
        default="seq_cls",
        metadata={"help": "seq_cls: sequence classification; causal_lm: next-token prediction; an application "
                  "recipe (peft_ext/apps) may name its own (vision, retrieval, multimodal)."},
    )
    num_labels: int = field(default=2, metadata={"help": "Number of classes for seq_cls."})
    quantization: Optional[Literal["4bit", "8bit"]] = field(
        default=None, metadata={"help": "Load the base model in bitsandbytes 4-bit or 8-bit."}
    )


@dataclass
class DataSection:
    """Which offline data set to train and evaluate on."""

    name: str = field(default="movie_reviews", metadata={"help": f"One of {DATA_NAMES}."})
    max_train: Optional[int] = field(default=None, metadata={"help": "Use at most this many training examples."})
    max_eval: Optional[int] = field(default=None, metadata={"help": "Use at most this many evaluation examples."})
    max_length: int = field(default=64, metadata={"help": "Truncate inputs to this many tokens."})
    seed: int = field(default=0, metadata={"help": "Seed of the train/test split."})


@dataclass
class MethodSection:
    """Which method to train: 'lora' (plain PEFT LoRA) or a peft-ext method, and its config arguments."""

    name: str = field(default="lora", metadata={"help": "'lora' or a registered peft-ext method name."})
    config: dict = field(default_factory=dict, metadata={"help": "Keyword arguments of the method's config class."})


@dataclass
class EvaluationSection:
    """What to evaluate after training."""

    ranks: Optional[Union[str, list]] = field(
        default=None, metadata={"help": "DyLoRA: 'all' or a list of ranks to evaluate the adapter at."}
    )
    baseline: bool = field(default=True, metadata={"help": "Also evaluate the model before training."})
    plot: bool = field(default=True, metadata={"help": "Write a PNG plot of the results (needs matplotlib)."})
    generate: int = field(
        default=0,
        metadata={"help": "causal_lm on gsm/bfcl: greedy-generate answers for this many eval examples and score them "
                  "with the data set's scorer (accuracy); 0 = eval loss only."},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Token budget of each generated answer."})


TRAINER_NAMES = ("sft", "dpo", "mrdpo", "grpo", "sft_grpo", "mtp", "planner", "lorid", "unlearning", "continual")

# Trainers with their own loop (not one TRL trainer): name -> (module under peft_ext.trainers, config class, recipe
# entry point, allowed data.name values, allowed model.task values). ``trainer.args`` holds the config class's fields;
# the module may define ``check_recipe(recipe)`` raising ValueError for what else it needs (a method, say).
OWN_LOOP_TRAINERS = {
    "mtp": ("mtp", "MTPConfig", "train_mtp_recipe", ("gsm",), ("causal_lm",)),
    "planner": ("planner", "PlannerConfig", "train_planner_recipe", ("bfcl",), ("causal_lm",)),
    "lorid": ("lorid", "LoRIDConfig", "train_lorid_recipe", ("gsm",), ("causal_lm",)),
    # data.name movie_reviews: these two read all four VADER domains (peft_ext.data.load_vader_domain)
    "unlearning": ("unlearning", "UnlearningConfig", "train_unlearning_recipe", ("movie_reviews", "toy_sentiment"),
                   ("seq_cls",)),
    "continual": ("continual", "ContinualConfig", "train_continual_recipe", ("movie_reviews", "toy_sentiment"),
                  ("seq_cls",)),
}


def trainer_args_config(recipe, config_cls):
    """``config_cls(**recipe.trainer.args)`` for an own-loop trainer; unknown keys: a ValueError naming them and the
    allowed ones (``peft-ext train`` validates the same before anything loads)."""
    args = dict(getattr(recipe.trainer, "args", {}) or {})
    allowed = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"trainer.args: unknown {config_cls.__name__} key(s) {unknown}; allowed: {sorted(allowed)}.")
    return config_cls(**args)


def app_trainer_names() -> list[str]:
    """The application recipes' trainer names: the modules of ``peft_ext/apps`` (not those starting with ``_``)."""
    folder = Path(__file__).resolve().parent / "apps"
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if not m.name.startswith("_"))


def trainer_names() -> list[str]:
    """Every ``trainer.name`` a recipe may use."""
    return list(TRAINER_NAMES) + app_trainer_names()


def _app_module(name: str):
    import importlib

    module = importlib.import_module(f"peft_ext.apps.{name}")
    spec = getattr(module, "RECIPE", None)
    if not isinstance(spec, dict) or not {"config", "entry", "data", "tasks"} <= set(spec):
        raise TypeError(f"peft_ext.apps.{name} must define RECIPE = dict(config=..., entry=..., data=(...), "
                        "tasks=(...), models=(...)).")
    return module, spec


def own_loop_trainer(name: str):
    """``(module, config class, entry point)`` of an own-loop trainer (imports its module)."""
    import importlib

    if name in OWN_LOOP_TRAINERS:
        module_name, config_name, entry = OWN_LOOP_TRAINERS[name][:3]
        module = importlib.import_module(f"peft_ext.trainers.{module_name}")
        return module, getattr(module, config_name), getattr(module, entry)
    module, spec = _app_module(name)
    return module, spec["config"], spec["entry"]


def own_loop_accepts(name: str) -> tuple:
    """``(data names, model tasks, extra model names)`` an own-loop trainer accepts."""
    if name in OWN_LOOP_TRAINERS:
        return OWN_LOOP_TRAINERS[name][3], OWN_LOOP_TRAINERS[name][4], ()
    spec = _app_module(name)[1]
    return tuple(spec["data"]), tuple(spec["tasks"]), tuple(spec.get("models", ()))


@dataclass
class TrainerSection:
    """Which TRL training recipe to run (``peft_ext/trainers``); ``name: null`` keeps the plain transformers Trainer.

    ``trainer: mrdpo`` is short for ``trainer: {name: mrdpo}``. Which model task and data each accepts:
    ``OWN_LOOP_TRAINERS`` for the own-loop trainers, causal LMs on ``data.name: gsm`` for the TRL ones.
    """

    name: Optional[str] = field(
        default=None,
        metadata={"help": "sft: TRL SFT; dpo: one round of DPO on pairs from the model; mrdpo: multi-round DPO with "
                  "merge-and-reinit (video-SALMONN 2); grpo: GRPO; sft_grpo: SFT then GRPO on the same adapter "
                  "(Gazal-R1); mtp: multi-token prediction with gated LoRA (trainer.args = MTPConfig fields); "
                  "planner: Octo-planner, one adapter per function domain merged into a planner plus an action "
                  "adapter (trainer.args = PlannerConfig fields); lorid: LoRID's three interacting adapters with the "
                  "consistency loop (trainer.args = LoRIDConfig fields); unlearning: O3 sequential unlearning "
                  "requests with the OOD gate (UnlearningConfig); continual: CoDyRA over a sequence of tasks against "
                  "sequential LoRA (ContinualConfig); a module name of peft_ext/apps: that application recipe "
                  "(its RECIPE config); null: the plain Trainer."},
    )
    sft_steps: int = field(
        default=0,
        metadata={"help": "SFT steps before the preference/RL stage (sft, sft_grpo: the SFT stage; dpo/mrdpo: an SFT "
                  "warm-up merged into the base before round 1; 0 = none)."},
    )
    rounds: int = field(default=3, metadata={"help": "mrdpo: number of rounds (dpo: always 1)."})
    steps_per_round: int = field(default=20, metadata={"help": "dpo/mrdpo: optimizer steps per round."})
    grpo_steps: int = field(default=20, metadata={"help": "grpo/sft_grpo: GRPO optimizer steps."})
    beta: Optional[float] = field(
        default=None, metadata={"help": "DPO β (default 0.1) or GRPO KL β (default 0.04); null = the recipe default."}
    )
    ce_weight: float = field(default=0.1, metadata={"help": "dpo/mrdpo: λ of the CE term on the ground truth."})
    num_samples: int = field(
        default=4, metadata={"help": "dpo/mrdpo: answers sampled per problem to build each round's pairs."}
    )
    prompts_per_round: Optional[int] = field(
        default=None,
        metadata={"help": "dpo/mrdpo: problems per round, a new window of the training set each round; null = all."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature for pairs and GRPO completions."})
    max_new_tokens: int = field(
        default=128, metadata={"help": "Token budget of sampled answers (pairs) and GRPO completions."}
    )
    rewards: list = field(
        default_factory=list,
        metadata={"help": "grpo/sft_grpo: names from peft_ext.rewards.REWARDS (accuracy, format, cosine_length, "
                  "repetition); required."},
    )
    reward_weights: Optional[list] = field(
        default=None, metadata={"help": "grpo/sft_grpo: one weight per reward; null = all 1."}
    )
    num_generations: int = field(default=4, metadata={"help": "grpo/sft_grpo: completions per prompt (a group)."})
    rebirth: bool = field(
        default=False,
        metadata={"help": "mrdpo: after the rounds, SFT the pre-DPO model on the mrDPO model's answers (rebirth)."},
    )
    args: dict = field(
        default_factory=dict,
        metadata={"help": "Extra keywords of the TRL config (MrDPOConfig, GazalSFTConfig, GazalGRPOConfig), or the "
                  "settings of an own-loop trainer (MTPConfig, PlannerConfig, LoRIDConfig, UnlearningConfig, "
                  "ContinualConfig)."},
    )


@dataclass
class Recipe:
    """A whole training run. See the module docstring for an example."""

    name: str = field(default="run", metadata={"help": "Name of the run, used in result files."})
    paper: str = field(
        default="", metadata={"help": "The paper this recipe reproduces (title and link); `peft-ext recipes` lists it."}
    )
    tiny: Optional[str] = field(
        default=None,
        metadata={"help": "A full-size recipe's seconds-long variant: a file name in the same folder (the test suite "
                  "runs it end to end)."},
    )
    output_dir: str = field(default="out/run", metadata={"help": "Folder for checkpoints, adapter, metrics, plot."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and rank sampling."})
    model: ModelSection = field(default_factory=ModelSection, metadata={"help": "The base model."})
    data: DataSection = field(default_factory=DataSection, metadata={"help": "The data."})
    method: MethodSection = field(default_factory=MethodSection, metadata={"help": "The method."})
    training: dict = field(default_factory=dict, metadata={"help": "transformers.TrainingArguments keywords."})
    evaluation: EvaluationSection = field(default_factory=EvaluationSection, metadata={"help": "The evaluation."})
    trainer: TrainerSection = field(
        default_factory=TrainerSection, metadata={"help": "A TRL training recipe (mrdpo, sft_grpo, ...) instead of the "
                                                  "plain Trainer."}
    )


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "true/false"}
    return names.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _check_type(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, key)
            except RecipeError:
                continue
        raise RecipeError(f"{key} must be {_type_name(tp)}; got {value!r}.")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise RecipeError(f"{key} must be {_type_name(tp)}; got {value!r}.")
    if tp is type(None):
        if value is None:
            return None
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp in (str, bool, dict, list) and isinstance(value, tp):
        return value
    elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, key)
    raise RecipeError(f"{key} must be {_type_name(tp)}; got {value!r}.")


def unknown_key_error(key: str, name: str, allowed) -> RecipeError:
    """A RecipeError for an unknown key, with the closest allowed names."""
    close = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listed = sorted(allowed) if len(allowed) <= 30 else "the fields of transformers.TrainingArguments"
    return RecipeError(f"Unknown key {key!r}.{hint} Allowed: {listed}.")


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in allowed:
            raise unknown_key_error(key, str(name), allowed)
        kwargs[name] = _check_type(value, hints[name], key)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {part!r} is not a section.")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["training.learning_rate=1e-3", ...]`` → ``[("training.learning_rate", 0.001), ...]`` (values read as YAML)."""
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set takes key=value (e.g. training.learning_rate=1e-3); got {item!r}.")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        parsed.append((key.strip(), value))
    return parsed


def recipe_from_dict(data: dict, overrides: Optional[list[str]] = None) -> Recipe:
    """Validate a recipe mapping (after applying ``--set`` overrides) into a ``Recipe``."""
    if not isinstance(data, dict):
        raise RecipeError(f"A recipe must be a mapping of sections; got {type(data).__name__}.")
    data = copy.deepcopy(data)
    if isinstance(data.get("trainer"), str):  # `trainer: mrdpo` is short for `trainer: {name: mrdpo}`
        data["trainer"] = {"name": data["trainer"]}
    for key, value in parse_overrides(overrides or []):
        if key == "trainer" and isinstance(value, str):
            key = "trainer.name"
        _set_dotted(data, key, value)
    recipe = _build(Recipe, data, "")
    _validate_semantics(recipe)
    return recipe


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Recipe:
    """Read and validate a YAML recipe; ``overrides`` are ``key=value`` strings with dotted keys."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        raise RecipeError(f"Recipe file {str(path)!r} is empty; it needs at least a 'method' section "
                          "(see recipes/tiny.yaml).")
    return recipe_from_dict(data, overrides)


def method_names() -> list[str]:
    """The methods a recipe may name: 'lora' and every registered peft-ext method."""
    from .registry import list_methods

    return ["lora"] + [spec.name for spec in list_methods()]


def _validate_semantics(recipe: Recipe) -> None:
    from transformers import TrainingArguments

    if recipe.method.name not in method_names():
        raise RecipeError(f"method.name must be one of {method_names()}; got {recipe.method.name!r}.")
    config_cls = method_config_class(recipe.method.name)
    allowed = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for name in recipe.method.config:
        if name not in allowed:
            raise unknown_key_error(f"method.config.{name}", name, allowed)
    try:  # the config's own checks (ranges, types) before any model is loaded
        config_cls(**recipe.method.config)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"method.config: {exc}") from exc
    app = recipe.trainer.name in app_trainer_names()
    data_names, tasks, model_names = own_loop_accepts(recipe.trainer.name) if app else (DATA_NAMES, TASKS, ())
    if recipe.data.name not in data_names:
        raise RecipeError(f"data.name must be one of {list(data_names)}; got {recipe.data.name!r}.")
    if recipe.model.task not in tasks:
        raise RecipeError(f"model.task must be one of {list(tasks)}; got {recipe.model.task!r}.")
    model_names = MODEL_NAMES + tuple(model_names)
    if recipe.model.name not in model_names and not Path(recipe.model.name).is_dir():
        raise RecipeError(
            f"model.name must be one of {list(model_names)} or a local folder; got {recipe.model.name!r}.")
    training_fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init} - {"output_dir"}
    for name in recipe.training:
        if name not in training_fields:
            raise unknown_key_error(f"training.{name}", name, training_fields)
    _check_training_types(recipe.training, TrainingArguments)
    if recipe.evaluation.generate < 0:
        raise RecipeError(f"evaluation.generate must be an integer >= 0; got {recipe.evaluation.generate!r}.")
    if recipe.evaluation.generate and (recipe.model.task != "causal_lm" or recipe.data.name not in ("gsm", "bfcl")):
        raise RecipeError("evaluation.generate applies to model.task 'causal_lm' with data.name 'gsm' or 'bfcl'; "
                          f"got {recipe.model.task!r} with {recipe.data.name!r}.")
    _validate_trainer(recipe)
    ranks = recipe.evaluation.ranks
    if isinstance(ranks, str) and ranks != "all":
        raise RecipeError(f"evaluation.ranks must be 'all', a list of integers or null; got {ranks!r}.")
    if isinstance(ranks, list) and not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in ranks):
        raise RecipeError(f"evaluation.ranks must list integers >= 1; got {ranks!r}.")


def trainer_config_class(name: str):
    """The TRL config class a ``trainer.name`` builds (for validating ``trainer.args``)."""
    if name in ("dpo", "mrdpo"):
        from .trainers.mrdpo import MrDPOConfig

        return MrDPOConfig
    if name in OWN_LOOP_TRAINERS or name in app_trainer_names():
        return own_loop_trainer(name)[1]
    if name == "sft":
        from .trainers.gazal import GazalSFTConfig

        return GazalSFTConfig
    from .trainers.gazal import GazalGRPOConfig

    return GazalGRPOConfig


def _validate_trainer(recipe: Recipe) -> None:
    """The ``trainer`` section: known trainer, causal LM on GSM, positive counts, rewards for GRPO, TRL keywords."""
    t = recipe.trainer
    if t.name is None:
        changed = [f.name for f in dataclasses.fields(TrainerSection)
                   if f.name != "name" and getattr(t, f.name) != getattr(TrainerSection(), f.name)]
        if changed:
            raise RecipeError(
                f"trainer.{changed[0]} applies only with trainer.name set (one of {list(TRAINER_NAMES)}).")
        return
    if t.name not in trainer_names():
        raise RecipeError(f"trainer.name must be one of {trainer_names()} or null; got {t.name!r}.")
    own_loop = t.name in OWN_LOOP_TRAINERS or t.name in app_trainer_names()
    data_names, tasks = own_loop_accepts(t.name)[:2] if own_loop else (("gsm",), ("causal_lm",))
    if recipe.model.task not in tasks or recipe.data.name not in data_names:
        raise RecipeError(f"trainer {t.name!r} needs model.task {' or '.join(repr(k) for k in tasks)} and data.name "
                          f"{' or '.join(repr(d) for d in data_names)}; got {recipe.model.task!r} with "
                          f"{recipe.data.name!r}.")
    if recipe.evaluation.ranks is not None:
        raise RecipeError(f"evaluation.ranks does not apply with trainer {t.name!r}.")
    if own_loop:
        _validate_own_loop(recipe)
        return
    minimum = {"rounds": 1, "steps_per_round": 1, "grpo_steps": 1, "num_samples": 1, "max_new_tokens": 1,
               "num_generations": 2, "sft_steps": 0}
    for key, low in minimum.items():
        if getattr(t, key) < low:
            raise RecipeError(f"trainer.{key} must be an integer >= {low}; got {getattr(t, key)!r}.")
    if t.prompts_per_round is not None and t.prompts_per_round < 1:
        raise RecipeError(f"trainer.prompts_per_round must be an integer >= 1 or null; got {t.prompts_per_round!r}.")
    for key in ("max_steps", "num_train_epochs", "output_dir"):
        if key in recipe.training:
            raise RecipeError(f"training.{key} does not apply with trainer {t.name!r}: the trainer section sets the "
                              "length (sft_steps, steps_per_round, grpo_steps).")
    if t.name in ("sft", "sft_grpo") and t.sft_steps < 1:
        raise RecipeError(f"trainer {t.name!r} needs trainer.sft_steps >= 1 (the SFT stage); got {t.sft_steps}.")
    if t.ce_weight < 0 or t.temperature < 0 or (t.beta is not None and t.beta < 0):
        raise RecipeError("trainer.ce_weight, trainer.temperature and trainer.beta must be >= 0.")
    if t.name in ("grpo", "sft_grpo"):
        from .rewards import REWARDS

        if not t.rewards:
            raise RecipeError(f"trainer {t.name!r} needs trainer.rewards: a list from {sorted(REWARDS)}.")
        unknown = [r for r in t.rewards if r not in REWARDS]
        if unknown:
            raise RecipeError(f"trainer.rewards: unknown {unknown}; choose from {sorted(REWARDS)}.")
        if t.reward_weights is not None and (len(t.reward_weights) != len(t.rewards) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in t.reward_weights)):
            raise RecipeError(f"trainer.reward_weights must be {len(t.rewards)} numbers (one per reward); got "
                              f"{t.reward_weights!r}.")
    elif t.rewards or t.reward_weights is not None:
        raise RecipeError(f"trainer.rewards applies to grpo and sft_grpo, not {t.name!r}.")
    if t.rebirth and t.name != "mrdpo":
        raise RecipeError(f"trainer.rebirth applies to mrdpo, not {t.name!r}.")
    try:
        config_cls = trainer_config_class(t.name)
    except ImportError as exc:
        raise RecipeError(f"trainer {t.name!r} needs TRL: pip install 'peft-ext[trl,data]' ({exc}).") from exc
    allowed = {f.name for f in dataclasses.fields(config_cls) if f.init} - {"output_dir"}
    for name in t.args:
        if name not in allowed:
            raise unknown_key_error(f"trainer.args.{name}", name, allowed)
    _check_training_types(t.args, config_cls)


def _validate_own_loop(recipe: Recipe) -> None:
    """An own-loop trainer (mtp, planner, lorid): settings come from ``trainer.args`` (its config class's fields), the
    other trainer keys and ``training.*`` do not apply; the trainer module's ``check_recipe`` adds its own needs."""
    t = recipe.trainer
    try:
        module, config_cls, _ = own_loop_trainer(t.name)
    except ImportError as exc:
        raise RecipeError(f"trainer {t.name!r} needs its extras: pip install 'peft-ext[trl,data]' ({exc}).") from exc
    if recipe.training:
        raise RecipeError(f"training.* does not apply with trainer {t.name!r}: set trainer.args "
                          f"({config_cls.__name__} fields).")
    defaults = TrainerSection()
    for f in dataclasses.fields(TrainerSection):
        if f.name not in ("name", "args") and getattr(t, f.name) != getattr(defaults, f.name):
            raise RecipeError(f"trainer.{f.name} does not apply with trainer {t.name!r}: set trainer.args "
                              f"({config_cls.__name__} fields).")
    allowed = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for name in t.args:
        if name not in allowed:
            raise unknown_key_error(f"trainer.args.{name}", name, allowed)
    try:
        config_cls(**t.args)
        if hasattr(module, "check_recipe"):
            module.check_recipe(recipe)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"trainer.args: {exc}" if not str(exc).startswith("trainer") else str(exc)) from exc


def _check_training_types(training: dict, args_cls) -> None:
    """Reject ``training`` values whose type does not match the ``TrainingArguments`` field (bool, int, float, str)."""
    import typing

    hints = typing.get_type_hints(args_cls)
    for name, value in training.items():
        hint = hints.get(name)
        allowed = set(typing.get_args(hint)) if typing.get_args(hint) else {hint}
        if value is None and type(None) in allowed:
            continue
        ok = None
        if bool in allowed:
            ok = isinstance(value, bool)
        if ok is not True and int in allowed:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if ok is not True and float in allowed:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok is not True and str in allowed:
            ok = None if ok is None else isinstance(value, str)
        if ok is False:
            kinds = " or ".join(t.__name__ for t in (bool, int, float, str) if t in allowed)
            raise RecipeError(f"training.{name} must be {kinds}; got {value!r}.")


def method_config_class(name: str):
    """The config class of a method name ('lora' → ``peft.LoraConfig``)."""
    if name == "lora":
        from peft import LoraConfig

        return LoraConfig
    from .registry import get_method

    return get_method(name).config_cls


def to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data (for result files)."""
    return dataclasses.asdict(recipe)
