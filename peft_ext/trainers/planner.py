"""Octo-planner: function-subset adapters merged into one planner, plus an action adapter (*Octo-planner: On-device
Language Model for Planner-Action Agents*, https://arxiv.org/abs/2406.18082; no public code, weights only).

The paper's agent splits a query into a plan of 1-5 steps, each mapped to one available function (the planner), and
lets an action model write each step's call. For several function domains it trains one LoRA per function subset
and merges them into one planner; the merge rule is not stated (UNCERTAIN), so every rule of PEFT's
``add_weighted_adapter`` is offered, plus LoRA-LEGO (``peft_ext.merging.add_lego_adapter``).

Here, on BFCL (``peft_ext.data.bfcl``):

* ``function_subset``: the domain of the row's ground-truth functions (``function_domain``: a documented keyword
  table over the function names, then descriptions; math, science, finance, society, leisure, other).
* Planner target: ``1. Call f\\n2. Call g`` - one numbered step per ground-truth call, naming its function
  (``plan_target``); BFCL's multiple / parallel queries give multi-step plans. The planner sees the query and the
  offered function names.
* Action target: the call of one step (``ground_truth_call`` of that call); the action model sees the query, the plan,
  the step and the compact signature of the step's function.
* One adapter per subset (TRL ``SFTTrainer``), merged (``add_merged_adapter``) into the ``planner`` adapter; one
  ``action`` adapter trained on every subset. A peft-ext tuner that exports to LoRA (``MethodSpec.lora_convertible``)
  is trained as itself, exported with PEFT's ``convert_to_lora`` at ``export_rank`` and merged through that LoRA.
* ``PlannerActionPipeline``: plan with the planner adapter, then one call per step with the action adapter; the calls
  are scored with ``score_bfcl`` (BFCL's AST checker, simplified), plans with ``plan_success`` (our matcher: the
  multiset of functions the steps name equals that of the ground-truth calls).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..merging.merge import IN_MODEL_RULES, add_merged_adapter

PAPER_URL = "https://arxiv.org/abs/2406.18082"
MERGE_RULES = IN_MODEL_RULES
PLANNER = "planner"
ACTION = "action"
DEFAULT_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")


def _is_int(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class PlannerConfig:
    """Settings of the Octo-planner recipe (https://arxiv.org/abs/2406.18082). UNCERTAIN in the paper (no code): the
    merge rule, its weights and the training length; the defaults are a CPU-sized choice."""

    subsets: Optional[list] = field(
        default=None,
        metadata={"help": "Function subsets (domains of peft_ext.data.bfcl.FUNCTION_DOMAINS, or 'other') to train one "
                  "adapter each, in merge order; null = every domain of FUNCTION_DOMAINS."},
    )
    categories: list = field(
        default_factory=lambda: list(DEFAULT_CATEGORIES),
        metadata={"help": "BFCL categories to load (load_bfcl names or aliases); multiple/parallel: multi-step plans."},
    )
    test_size: float = field(default=0.2, metadata={"help": "Share of the BFCL rows held out (load_bfcl test_size)."})
    merge_rule: str = field(
        default="ties",
        metadata={"help": f"How the subset adapters become the planner: one of {list(MERGE_RULES)} (PEFT's "
                  "add_weighted_adapter combination types, or 'lego' = LoRA-LEGO)."},
    )
    merge_weights: Optional[list] = field(
        default=None, metadata={"help": "One weight per subset adapter; null = 1.0 each (task arithmetic's sum)."}
    )
    density: float = field(
        default=0.5, metadata={"help": "Share of entries kept by ties / dare_* / magnitude_prune, in (0, 1]."}
    )
    majority_sign_method: str = field(
        default="total", metadata={"help": "ties / dare_ties sign election: 'total' or 'frequency'."}
    )
    svd_rank: Optional[int] = field(
        default=None, metadata={"help": "Rank of the *_svd merges; null = the largest input rank (PEFT's default)."}
    )
    lego_k: Optional[int] = field(
        default=None, metadata={"help": "Clusters (= merged rank) of the lego rule; null = the input rank."}
    )
    export_rank: Optional[int] = field(
        default=None,
        metadata={"help": "Rank of the LoRA a non-LoRA peft-ext tuner is exported to before merging; null = the "
                  "method's r (default 8)."},
    )
    steps_per_subset: int = field(default=20, metadata={"help": "SFT optimizer steps of each subset adapter."})
    action_steps: int = field(default=20, metadata={"help": "SFT optimizer steps of the action adapter."})
    batch_size: int = field(default=4, metadata={"help": "Examples per SFT step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of every adapter."})
    max_length: int = field(default=256, metadata={"help": "Truncate each SFT example to this many tokens."})
    plan_tokens: int = field(default=40, metadata={"help": "Token budget of a generated plan."})
    action_tokens: int = field(default=64, metadata={"help": "Token budget of one generated call."})
    max_plan_steps: int = field(
        default=5, metadata={"help": "Plan steps the pipeline acts on at most (the paper's plans have 1-5)."}
    )
    eval_end_to_end: int = field(
        default=8, metadata={"help": "Eval rows run through the planner -> action pipeline and scored (0 = none)."}
    )
    evaluate_single: bool = field(
        default=True,
        metadata={"help": "Also score each subset adapter on every subset (in-domain vs cross-domain plan success)."},
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts per batched greedy generation."})

    def __post_init__(self):
        from ..data.bfcl import FUNCTION_DOMAINS, OTHER_DOMAIN, _resolve_categories

        known = list(FUNCTION_DOMAINS) + [OTHER_DOMAIN]
        if self.subsets is not None:
            if not isinstance(self.subsets, (list, tuple)) or not self.subsets:
                raise ValueError(f"PlannerConfig.subsets must be a non-empty list of {known} or null; got "
                                 f"{self.subsets!r}.")
            bad = [s for s in self.subsets if s not in known]
            if bad or len(set(self.subsets)) != len(self.subsets):
                raise ValueError(f"PlannerConfig.subsets: unknown or repeated subset(s) {bad or self.subsets}; allowed "
                                 f"(each once): {known}.")
        if not isinstance(self.categories, (list, tuple)) or not self.categories:
            raise ValueError(f"PlannerConfig.categories must be a non-empty list of BFCL categories; got "
                             f"{self.categories!r}.")
        try:
            _resolve_categories(list(self.categories))
        except ValueError as exc:
            raise ValueError(f"PlannerConfig.categories: {exc}") from exc
        if not _is_number(self.test_size) or not 0 < self.test_size < 1:
            raise ValueError(f"PlannerConfig.test_size must be a number in (0, 1); got {self.test_size!r}.")
        if self.merge_rule not in MERGE_RULES:
            raise ValueError(f"PlannerConfig.merge_rule must be one of {list(MERGE_RULES)}; got {self.merge_rule!r}.")
        if self.merge_weights is not None:
            n = len(self.subsets) if self.subsets is not None else None
            if (not isinstance(self.merge_weights, (list, tuple)) or not all(_is_number(w) for w in self.merge_weights)
                    or (n is not None and len(self.merge_weights) != n)):
                raise ValueError(f"PlannerConfig.merge_weights must be null or a list of numbers, one per subset"
                                 f"{f' ({n})' if n else ''}; got {self.merge_weights!r}.")
        if not _is_number(self.density) or not 0 < self.density <= 1:
            raise ValueError(f"PlannerConfig.density must be a number in (0, 1]; got {self.density!r}.")
        if self.majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"PlannerConfig.majority_sign_method must be 'total' or 'frequency'; got "
                             f"{self.majority_sign_method!r}.")
        for name in ("svd_rank", "lego_k", "export_rank"):
            value = getattr(self, name)
            if value is not None and not _is_int(value, 1):
                raise ValueError(f"PlannerConfig.{name} must be null or an integer >= 1; got {value!r}.")
        for name in ("steps_per_subset", "action_steps", "batch_size", "max_length", "plan_tokens", "action_tokens",
                     "max_plan_steps", "eval_batch_size"):
            if not _is_int(getattr(self, name), 1):
                raise ValueError(f"PlannerConfig.{name} must be an integer >= 1; got {getattr(self, name)!r}.")
        if not _is_int(self.eval_end_to_end, 0):
            raise ValueError(f"PlannerConfig.eval_end_to_end must be an integer >= 0; got {self.eval_end_to_end!r}.")
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"PlannerConfig.learning_rate must be a number > 0; got {self.learning_rate!r}.")
        if not isinstance(self.evaluate_single, bool):
            raise ValueError(f"PlannerConfig.evaluate_single must be true or false; got {self.evaluate_single!r}.")

    def subset_names(self) -> list:
        """The subsets to train, in merge order (``subsets``, else every domain of ``FUNCTION_DOMAINS``)."""
        from ..data.bfcl import FUNCTION_DOMAINS

        return list(self.subsets) if self.subsets is not None else list(FUNCTION_DOMAINS)


# ---------------------------------------------------------------------------------------------------- prompts, plans
def _prompt(text: str, answer: str) -> str:
    # plain text, no chat template: both adapters are fine-tuned on this format, and on CPU the ~30 tokens of
    # SmolLM2's template (its default system prompt) per prompt would cost more than the query itself
    return f"{text}\n{answer}:\n"


def _functions(functions) -> list:
    """The offered functions as a list of BFCL specs (from the ``functions`` column's JSON or a list)."""
    if isinstance(functions, str):
        try:
            functions = json.loads(functions)
        except ValueError as exc:
            raise ValueError(f"functions is not valid JSON ({exc}); pass the BFCL 'functions' column.") from exc
    if not isinstance(functions, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str)
                                                  for f in functions):
        raise ValueError("functions must be a list of BFCL function specs, each a dict with a 'name'; got "
                         f"{str(functions)[:120]!r}.")
    return functions


def planner_prompt(question: str, functions) -> str:
    """The planner's prompt (https://arxiv.org/abs/2406.18082): the query and the offered function names."""
    names = ", ".join(f["name"] for f in _functions(functions))
    return _prompt(f"Functions: {names}\nQuery: {question}", "Plan")


def action_prompt(question: str, functions, steps: Sequence[str], index: int) -> str:
    """The action model's prompt for step ``index`` (0-based) of a plan: the query, the plan, the step, and the
    signature of the step's function (all offered signatures when the step names none)."""
    from ..data.bfcl import function_signature

    specs = _functions(functions)
    named = _step_function(steps[index], [f["name"] for f in specs])
    shown = [f for f in specs if f["name"] == named] or specs
    plan = "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    signatures = "\n".join(function_signature(f) for f in shown)
    return _prompt(f"Query: {question}\nPlan:\n{plan}\nFunction:\n{signatures}\nStep {index + 1} of {len(steps)}: "
                   f"{steps[index]}", "Call")


_STEP = re.compile(r"^\s*(?:step\s*)?(\d+)\s*[.):]\s*(.*?)\s*$", flags=re.IGNORECASE)


def _step_function(text: str, names: Sequence[str]) -> Optional[str]:
    """The offered function a step names: the longest name occurring in it as a whole word (dots allowed)."""
    hits = [n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", text)]
    return max(hits, key=len) if hits else None


@dataclass
class PlanStep:
    """One parsed plan step: its number as written, its text, and the offered function it names (None: none)."""

    number: int
    text: str
    function: Optional[str]


def parse_plan(text, functions=None) -> list[PlanStep]:
    """The numbered steps of a plan (``1. ...`` / ``2) ...`` / ``Step 3: ...`` lines, in order; other lines ignored).

    ``functions`` (the offered specs or their JSON) lets each step name a function; without it, the word after
    ``Call`` is taken. A text without numbered steps gives ``[]``; a non-string is a ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"parse_plan: the plan must be a string; got {type(text).__name__}.")
    names = [f["name"] for f in _functions(functions)] if functions is not None else None
    steps = []
    for line in text.splitlines():
        match = _STEP.match(line)
        if not match or not match.group(2):
            continue
        body = match.group(2)
        if names is not None:
            name = _step_function(body, names)
        else:
            called = re.match(r"call\s+([A-Za-z_][\w.]*)", body, flags=re.IGNORECASE)
            name = called.group(1) if called else None
        steps.append(PlanStep(int(match.group(1)), body, name))
    return steps


def plan_success(plan: str, answer: str, functions) -> float:
    """Our plan matcher (BFCL has no plan checker): 1.0 when the plan's steps name, as a multiset, exactly the
    functions of the ground-truth calls (one step per call; any order, as BFCL's parallel checker), else 0.0."""
    from ..data.bfcl import expected_function_names

    try:
        steps = parse_plan(plan, functions)
    except ValueError:
        return 0.0
    named = [s.function for s in steps]
    return float(None not in named and Counter(named) == Counter(expected_function_names(answer)))


# ---------------------------------------------------------------------------------------------------- data
def planner_examples(rows) -> dict:
    """Prompt/completion columns of the planner's SFT data (one example per BFCL row with at least one call)."""
    from ..data.bfcl import plan_target

    keep = [r for r in rows if json.loads(r["answer"])]
    return {"prompt": [planner_prompt(r["question"], r["functions"]) for r in keep],
            "completion": [plan_target(r["answer"]) for r in keep]}


def action_examples(rows) -> dict:
    """Prompt/completion columns of the action model's SFT data: one example per ground-truth call."""
    from ..data.bfcl import ground_truth_call, plan_steps, split_answer

    prompts, completions = [], []
    for r in rows:
        steps = plan_steps(r["answer"])
        for i, single in enumerate(split_answer(r["answer"])):
            prompts.append(action_prompt(r["question"], r["functions"], steps, i))
            completions.append(ground_truth_call(single))
    return {"prompt": prompts, "completion": completions}


def planner_splits(config: PlannerConfig, seed: int = 0, max_train: Optional[int] = None,
                   max_eval: Optional[int] = None) -> tuple[dict, dict]:
    """``({subset: train rows}, {subset: eval rows})`` of BFCL with the ``function_subset`` column, for the configured
    subsets (rows with no expected call dropped); ``max_train`` / ``max_eval`` cap the rows of each subset."""
    from ..data.bfcl import function_subset, load_bfcl

    data = load_bfcl(categories=list(config.categories), test_size=config.test_size, seed=seed)
    out = []
    for split, cap in (("train", max_train), ("test", max_eval)):
        by = {s: [] for s in config.subset_names()}
        for row in data[split].to_list():
            row["function_subset"] = function_subset(row)
            group = by.get(row["function_subset"])
            if group is not None and json.loads(row["answer"]) and (cap is None or len(group) < cap):
                group.append(row)
        empty = [s for s, rows in by.items() if not rows]
        if empty:
            raise ValueError(f"PlannerConfig.subsets: no {split} rows for {empty} in categories {config.categories}; "
                             "drop them or add categories.")
        out.append(by)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------- merging
def export_lora(model, folder, rank: int, adapter_name: str = "default") -> Path:
    """Export a peft-ext tuner's adapter as a plain LoRA of ``rank`` (PEFT's ``convert_to_lora``: SVD of each ΔW) into
    ``folder``, each file written atomically; how non-LoRA subset adapters are merged."""
    from peft.tuners.lora.conversion import convert_to_lora
    from safetensors.torch import save

    from .._io import atomic_write, atomic_write_json

    if not model.supports_lora_conversion():
        raise ValueError(f"{type(model.peft_config[adapter_name]).__name__} adapters cannot be exported to LoRA.")
    config, state = convert_to_lora(model, rank, adapter_name=adapter_name)
    config.task_type = model.peft_config[adapter_name].task_type
    folder = Path(folder)
    payload = config.to_dict()
    for key, value in payload.items():
        if isinstance(value, set):
            payload[key] = sorted(value)
    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    atomic_write(folder / "adapter_model.safetensors", lambda f: f.write(data), binary=True)
    atomic_write_json(folder / "adapter_config.json", payload)
    return folder


def save_named_adapter(model, name: str, folder) -> Path:
    """Save one adapter of a multi-adapter ``PeftModel`` as a standalone adapter folder, each file atomically."""
    import os
    import shutil
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(staging, selected_adapters=[name])
        source = staging if name == "default" else staging / name
        for src in sorted(p for p in source.rglob("*") if p.is_file()):
            dest = folder / src.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------------- pipeline
@dataclass
class PlanResult:
    """What ``PlannerActionPipeline`` returns for one query: the plan text, its parsed steps, the action model's raw
    output per step, the parsed calls (one per step whose output parses), and ``error`` (None when all went well)."""

    plan: str
    steps: list
    outputs: list
    calls: list
    error: Optional[str] = None

    @property
    def prediction(self) -> str:
        """The calls as a JSON list of ``{"name", "arguments"}`` (what ``score_bfcl`` reads)."""
        return json.dumps([{"name": n, "arguments": a} for n, a in self.calls], ensure_ascii=False, default=str)

    def score(self, answer: str) -> float:
        """BFCL's checker (``score_bfcl``) on the calls against the ground truth ``answer``."""
        from ..data.bfcl import score_bfcl

        return score_bfcl(self.prediction, answer)


class PlannerActionPipeline:
    """Octo-planner's agent (https://arxiv.org/abs/2406.18082) on one ``PeftModel`` holding two adapters: the
    ``planner`` adapter writes a numbered plan, the ``action`` adapter writes one call per step (batched greedy
    generation). A plan without numbered steps gives a result with no calls and ``error`` set, never an exception."""

    def __init__(self, model, tokenizer, planner: str = PLANNER, action: str = ACTION, plan_tokens: int = 40,
                 action_tokens: int = 64, max_steps: int = 5, batch_size: int = 8):
        config = getattr(model, "peft_config", None)
        if not isinstance(config, dict):
            raise ValueError(f"PlannerActionPipeline needs a PeftModel holding the planner and action adapters; got "
                             f"{type(model).__name__}.")
        for role, name in (("planner", planner), ("action", action)):
            if name not in config:
                raise ValueError(f"PlannerActionPipeline: {role}={name!r} is not an adapter of the model; it has "
                                 f"{list(config)}.")
        for key, value in (("plan_tokens", plan_tokens), ("action_tokens", action_tokens), ("max_steps", max_steps),
                           ("batch_size", batch_size)):
            if not _is_int(value, 1):
                raise ValueError(f"PlannerActionPipeline: {key} must be an integer >= 1; got {value!r}.")
        self.model, self.tokenizer = model, tokenizer
        self.planner, self.action = planner, action
        self.plan_tokens, self.action_tokens = plan_tokens, action_tokens
        self.max_steps, self.batch_size = max_steps, batch_size

    def _generate(self, adapter: str, prompts: list, max_new_tokens: int) -> list:
        from ..data.preference import generate_answers

        self.model.set_adapter(adapter)
        return generate_answers(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                batch_size=self.batch_size)

    def plan(self, questions: list, functions: list) -> list:
        """Greedy plans for several queries with the planner adapter (``functions``: one offered list per query)."""
        prompts = [planner_prompt(q, f) for q, f in zip(questions, functions)]
        return self._generate(self.planner, prompts, self.plan_tokens)

    def act(self, question: str, functions, plan: str) -> PlanResult:
        """The action adapter's call for each step of a given ``plan`` (n steps -> n generated calls)."""
        specs = _functions(functions)
        steps = parse_plan(plan, specs) if isinstance(plan, str) else []
        if not steps:
            return PlanResult(plan if isinstance(plan, str) else "", [], [], [],
                              error="the plan has no numbered steps ('1. ...'); no call was made.")
        error = None
        if len(steps) > self.max_steps:
            error = f"the plan has {len(steps)} steps; acted on the first {self.max_steps} (max_steps)."
            steps = steps[: self.max_steps]
        texts = [s.text for s in steps]
        prompts = [action_prompt(question, specs, texts, i) for i in range(len(steps))]
        outputs = self._generate(self.action, prompts, self.action_tokens)
        from ..data.bfcl import parse_function_calls

        calls, bad = [], []
        for i, out in enumerate(outputs):
            parsed = parse_function_calls(out)
            if parsed:
                calls.append(parsed[0])
            else:
                bad.append(i + 1)
        if bad:
            error = (error + " " if error else "") + f"step(s) {bad}: the action output is not a function call."
        return PlanResult(plan, steps, outputs, calls, error)

    def __call__(self, question: str, functions, plan: Optional[str] = None) -> PlanResult:
        """Plan (unless ``plan`` is given) and act: the calls of one query."""
        specs = _functions(functions)
        if plan is None:
            plan = self.plan([question], [specs])[0]
        return self.act(question, specs, plan)


# ---------------------------------------------------------------------------------------------------- training
def _sft_config(config: PlannerConfig, steps: int, seed: int, output_dir: Path, quiet: bool):
    import torch
    from trl import SFTConfig

    # every TRL default that matters is spelled out; the data comes tokenized (``tokenize_examples``), so TRL's dataset
    # preparation is skipped
    return SFTConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=config.batch_size,
                     learning_rate=config.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, seed=seed, data_seed=seed, report_to=[], save_strategy="no", logging_steps=1,
                     disable_tqdm=quiet, use_cpu=not torch.cuda.is_available(), max_length=config.max_length,
                     packing=False, completion_only_loss=True, gradient_checkpointing=False, bf16=False, fp16=False,
                     shuffle_dataset=False, loss_type="nll", dataset_kwargs={"skip_prepare_dataset": True})


def tokenize_examples(examples: dict, tokenizer, max_length: int) -> dict:
    """``input_ids`` / ``labels`` of prompt/completion examples: the prompt tokenized exactly as generation sees it
    (no special tokens added), the completion plus EOS as the only loss tokens, cut to ``max_length`` tokens; an
    example whose completion is cut away entirely is dropped."""
    eos = tokenizer.eos_token_id
    ids, labels = [], []
    for prompt, completion in zip(examples["prompt"], examples["completion"]):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(p) >= max_length:
            continue
        ids.append((p + c)[:max_length])
        labels.append(([-100] * len(p) + c)[:max_length])
    if not ids:
        raise ValueError(f"PlannerConfig.max_length={max_length} leaves no completion token in any example; raise it.")
    return {"input_ids": ids, "labels": labels}


def train_adapter(recipe, config: PlannerConfig, rows: list, build, steps: int, seed: int, quiet: bool = True):
    """One adapter of the recipe's method trained with TRL's ``SFTTrainer`` on the prompt/completion examples
    ``build(rows)`` (``planner_examples`` / ``action_examples``), on a freshly loaded base model (seeded, so
    a resumed run retrains it identically); returns ``(PeftModel, tokenizer, losses)``."""
    import tempfile

    from datasets import Dataset
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTTrainer

    from ..runner import build_peft_config
    from ..runner.training import _method_callbacks

    tokenizer, base = _load(recipe)
    data = Dataset.from_dict(tokenize_examples(build(rows), tokenizer, config.max_length))
    set_seed(seed)
    model = get_peft_model(base, build_peft_config(recipe))
    with tempfile.TemporaryDirectory(prefix="planner-sft-") as tmp:
        trainer = SFTTrainer(model=model, args=_sft_config(config, steps, seed, Path(tmp), quiet),
                             train_dataset=data, processing_class=tokenizer,
                             callbacks=_method_callbacks(recipe, model) or None)
        trainer.train()
    losses = [{"step": r["step"], "loss": r["loss"]} for r in trainer.state.log_history if "loss" in r]
    model = trainer.model
    model.eval()
    return model, tokenizer, losses


def _export_rank(recipe, config: PlannerConfig) -> int:
    return config.export_rank or int(recipe.method.config.get("r", 8))


def _lora_folder(out: Path, recipe, name: str) -> Path:
    """Where the LoRA form of adapter ``name`` lives: the adapter itself for LoRA, its export otherwise."""
    return out / name if recipe.method.name == "lora" else out / "lora" / name


def _whole(recipe, out: Path, name: str) -> bool:
    from .._io import adapter_folder_is_whole

    return adapter_folder_is_whole(out / name) and adapter_folder_is_whole(_lora_folder(out, recipe, name))


def _save_trained(recipe, config: PlannerConfig, model, tokenizer, out: Path, name: str) -> None:
    from ..runner import save_adapter

    save_adapter(model, None, out / name)
    if recipe.method.name != "lora":
        export_lora(model, _lora_folder(out, recipe, name), _export_rank(recipe, config))


def _load(recipe):
    """The recipe's tokenizer and base model, with one EOS both use: the one training appends to every completion
    and generation stops at (the tiny models borrow BERT's vocabulary, which has none: its [SEP] then)."""
    from ..runner import load_tokenizer_and_model

    tokenizer, base = load_tokenizer_and_model(recipe)
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    return tokenizer, base


def load_adapters(recipe, folders: dict):
    """The recipe's base model with the LoRA adapters ``{name: folder}`` loaded under their names."""
    from peft import PeftModel

    tokenizer, base = _load(recipe)
    model = None
    for name, folder in folders.items():
        if model is None:
            model = PeftModel.from_pretrained(base, str(folder), adapter_name=name)
        else:
            model.load_adapter(str(folder), adapter_name=name)
    model.eval()
    return model, tokenizer


def plan_scores(model, tokenizer, adapter: Optional[str], rows: list, config: PlannerConfig) -> list:
    """Plan success (``plan_success``) of each row with adapter ``adapter`` (None: the base model, adapters off)."""
    import contextlib

    from ..data.preference import generate_answers

    prompts = [planner_prompt(r["question"], r["functions"]) for r in rows]
    if adapter is None:
        context = model.disable_adapter()
    else:
        model.set_adapter(adapter)
        context = contextlib.nullcontext()
    with context:
        plans = generate_answers(model, tokenizer, prompts, max_new_tokens=config.plan_tokens,
                                 batch_size=config.eval_batch_size)
    return [plan_success(p, r["answer"], r["functions"]) for p, r in zip(plans, rows)]


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _plot(metrics: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .._io import atomic_savefig

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, losses in metrics["training"].items():
        ax1.plot([r["step"] for r in losses], [r["loss"] for r in losses], label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("SFT loss")
    ax1.legend(fontsize=7)
    ax1.set_title("subset and action adapters")
    subsets = list(metrics["plan_success"]["planner"])
    x = range(len(subsets))
    width = 0.4
    merged = [metrics["plan_success"]["planner"][s] for s in subsets]
    ax2.bar([i - width / 2 for i in x], merged, width, label=f"merged ({metrics['planner']['merge_rule']})")
    single = metrics["plan_success"].get("single")
    if single:
        ax2.bar([i + width / 2 for i in x], [single[s][s] for s in subsets], width, label="single-subset, in-domain")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(subsets, fontsize=8)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("plan success")
    ax2.legend(fontsize=7)
    ax2.set_title("Octo-planner on BFCL")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def planner_config_from_recipe(recipe) -> PlannerConfig:
    """``PlannerConfig`` from the recipe's ``trainer.args`` (unknown keys: a ValueError naming them and the allowed)."""
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, PlannerConfig)


def check_recipe(recipe) -> None:
    """What ``trainer: planner`` needs besides its ``trainer.args``: LoRA (not DoRA) or a peft-ext tuner with one
    static ΔW per layer that exports to LoRA, and the lego rule's module when it is chosen."""
    name = recipe.method.name
    if name == "lora":
        if recipe.method.config.get("use_dora"):
            raise ValueError("trainer 'planner': method.config.use_dora is not supported (PEFT's merges ignore DoRA's "
                             "magnitude vector); use plain LoRA.")
    else:
        from ..registry import get_method

        spec = get_method(name)
        if not spec.lora_convertible or spec.routed:
            raise ValueError(f"trainer 'planner' needs method.name 'lora' or a peft-ext method that exports to LoRA "
                             f"with one static ΔW (lora_convertible, not routed); {name!r} is not.")
    config = planner_config_from_recipe(recipe)
    if config.merge_rule == "lego":
        try:
            from ..merging import add_lego_adapter  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"trainer.args.merge_rule 'lego' needs peft_ext.merging.add_lego_adapter ({exc}).") \
                from exc
    if config.merge_weights is not None and len(config.merge_weights) != len(config.subset_names()):
        raise ValueError(f"trainer.args.merge_weights has {len(config.merge_weights)} weights for "
                         f"{len(config.subset_names())} subsets.")


def train_planner_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for Octo-planner (https://arxiv.org/abs/2406.18082), ``trainer: {name: planner, args:
    {...PlannerConfig...}}``: one adapter per function subset (``subsets/<name>``), the action adapter (``action``),
    the merged planner (``planner``), plan success per subset (merged planner; with ``evaluate_single`` each subset
    adapter on every subset), the planner -> action pipeline scored with BFCL's checker; ``metrics.json`` and
    ``results.png``. Every file is written atomically; with ``resume`` the finished adapters are kept and only the
    missing ones are trained (each adapter is seeded on its own, so the result equals an uninterrupted run)."""
    from .._io import adapter_folder_is_whole, atomic_write_json
    from ..recipe import to_dict
    from ..runner.reporting import device_name

    check_recipe(recipe)
    config = planner_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    subsets = config.subset_names()
    train_rows, eval_rows = planner_splits(config, seed=recipe.data.seed, max_train=recipe.data.max_train,
                                           max_eval=recipe.data.max_eval)
    previous = {}
    if resume and (out / "metrics.json").is_file():
        previous = json.loads((out / "metrics.json").read_text()).get("training", {})
    training, trained = {}, []

    def say(text):
        if not quiet:
            print(text, flush=True)

    jobs = [(f"subsets/{s}", planner_examples, train_rows[s], config.steps_per_subset) for s in subsets]
    jobs.append((ACTION, action_examples, [r for s in subsets for r in train_rows[s]], config.action_steps))
    for index, (name, build, rows, steps) in enumerate(jobs):
        if resume and _whole(recipe, out, name):
            say(f"planner: {name} is complete, kept (--resume)")
            training[name] = previous.get(name, [])
            continue
        say(f"planner: training {name} on {len(rows)} rows, {steps} steps")
        model, tokenizer, losses = train_adapter(recipe, config, rows, build, steps, seed=recipe.seed + index,
                                                 quiet=quiet)
        _save_trained(recipe, config, model, tokenizer, out, name)
        training[name] = losses
        trained.append(name)
        del model
    train_time = time.time() - began

    folders = {s: _lora_folder(out, recipe, f"subsets/{s}") for s in subsets}
    folders[ACTION] = _lora_folder(out, recipe, ACTION)
    model, tokenizer = load_adapters(recipe, folders)
    add_merged_adapter(model, subsets, config.merge_rule, PLANNER, weights=config.merge_weights, density=config.density,
                   svd_rank=config.svd_rank, lego_k=config.lego_k, majority_sign_method=config.majority_sign_method,
                   seed=recipe.seed)
    save_named_adapter(model, PLANNER, out / PLANNER)
    if not adapter_folder_is_whole(out / PLANNER):
        raise RuntimeError(f"planner: {out / PLANNER} was not written completely.")
    say(f"planner: merged {subsets} with rule {config.merge_rule!r} -> {out / PLANNER}")

    plan_success_ = {PLANNER: {}}
    for s in subsets:
        plan_success_[PLANNER][s] = _mean(plan_scores(model, tokenizer, PLANNER, eval_rows[s], config))
    if config.evaluate_single:
        plan_success_["single"] = {
            a: {s: _mean(plan_scores(model, tokenizer, a, eval_rows[s], config)) for s in subsets} for a in subsets
        }
    end_to_end = {}
    if config.eval_end_to_end:
        pipe = PlannerActionPipeline(model, tokenizer, PLANNER, ACTION, config.plan_tokens, config.action_tokens,
                                     config.max_plan_steps, config.eval_batch_size)
        pool = [r for group in zip(*(eval_rows[s] for s in subsets)) for r in group]
        pool += [r for s in subsets for r in eval_rows[s] if r not in pool]
        rows = pool[: config.eval_end_to_end]
        plans = pipe.plan([r["question"] for r in rows], [r["functions"] for r in rows])
        results = [pipe.act(r["question"], r["functions"], p) for r, p in zip(rows, plans)]
        end_to_end = {
            "rows": len(rows),
            "bfcl_accuracy": _mean(res.score(r["answer"]) for res, r in zip(results, rows)),
            "plan_success": _mean(plan_success(p, r["answer"], r["functions"]) for p, r in zip(plans, rows)),
            "examples": [{"id": r["id"], "plan": res.plan, "calls": res.prediction, "score": res.score(r["answer"]),
                          "error": res.error} for res, r in zip(results, rows)],
        }
    single = plan_success_.get("single", {})
    summary = {
        "merged_plan_success": sum(plan_success_[PLANNER][s] * len(eval_rows[s]) for s in subsets)
        / sum(len(eval_rows[s]) for s in subsets),
        "single_in_domain": _mean(single[s][s] for s in subsets) if single else None,
        "single_cross_domain": _mean(single[a][s] for a in subsets for s in subsets if a != s) if single and len(
            subsets) > 1 else None,
    }
    metrics = {
        "name": recipe.name,
        "trainer": "planner",
        "method": recipe.method.name,
        "seed": recipe.seed,
        "paper": PAPER_URL,
        "planner": asdict(config),
        "subsets": {s: {"train": len(train_rows[s]), "eval": len(eval_rows[s])} for s in subsets},
        "trained_this_run": trained,
        "train_time_s": train_time,
        "plan_success": plan_success_,
        "summary": summary,
        "end_to_end": end_to_end,
        "training": training,
        "adapters": {"planner": str(out / PLANNER), "action": str(out / ACTION),
                     "subsets": {s: str(out / "subsets" / s) for s in subsets}},
        "device": device_name(),
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot:
        _plot(metrics, out / "results.png")
    if not quiet:
        e2e = f", end-to-end BFCL accuracy {end_to_end['bfcl_accuracy']:.2f} on {end_to_end['rows']} rows" if \
            end_to_end else ""
        print(f"planner — {recipe.name}: merged ({config.merge_rule}) plan success "
              f"{summary['merged_plan_success']:.2f}{e2e}")
        print(f"adapters: {out}  metrics: {out / 'metrics.json'}")
    return metrics

