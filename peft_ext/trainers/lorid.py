"""LoRID: three interacting LoRA adapters on one base model with a consistency loop at inference (*Can Large Models
Teach Student Models to Solve Mathematical Problems Like Human Beings? A Reasoning Distillation Method via Multi-LoRA
Interaction*, arXiv 2508.13037; official code https://github.com/Xinhe-Li/LoRID, read but not copied).

The three modules, each a LoRA adapter of the same base (``add_adapter`` / ``set_adapter``), each trained by its own
supervised fine-tuning run with the instruction strings of the official ``src/train.py``:

* **IR** (intuitive reasoner): question → rationale + ``\\n--> <answer> END``;
* **KG** (knowledge generator): ``Question: ...\\n\\nKnowledge: `` → general solving knowledge (one rule a line);
* **DR** (deep reasoner): ``Question: ...\\n\\nKnowledge: ...\\n\\nRationale: `` → rationale + ``\\n--> <answer> END``.

Inference (official ``src/predict.py``): every module samples ``N`` times (T=1.5, top-p 0.9; LLaMA-Factory's vLLM
script adds top-k 50), DR's ``j``-th sample reads KG's ``j``-th knowledge. For ``j = 1..N`` the ``j``-th IR and DR
answers join the sets S_IR and S_DR (empty answers dropped); the loop stops at the first non-empty S_IR ∩ S_DR. The
official scoring is optimistic: correct if *any* answer in the intersection equals the label; a problem whose sets
never meet is wrong. ``consistency_loop`` also gives a strict answer: the intersection's answer with the most votes
among all IR and DR answers seen so far, ties broken by the earliest first appearance in the order IR_1, DR_1, IR_2,
DR_2, ...

The knowledge is built offline (``peft_ext.data.gsm_knowledge``): GSM-Symbolic's template solution steps without their
numbers, instead of the official GPT-4o-written rules. The baselines at equal sample budget: IR greedy (1 sample),
IR majority vote over the 3·j samples the loop consumed on that problem, and IR majority vote over 3·N samples (what
the official run generates per problem).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Optional, Sequence

import torch

PAPER = "https://arxiv.org/abs/2508.13037"
OFFICIAL_CODE = "https://github.com/Xinhe-Li/LoRID"
ADAPTERS = ("ir", "kg", "dr")
INSTRUCTIONS = {  # the official src/train.py and src/predict.py, word for word
    "ir": "Please answer this MATH question step by step.",
    "kg": "Please output knowledge needed to solve the MATH question step by step.",
    "dr": "Please reason step by step based on the given MATH question and knowledge, and output the final answer.",
}
MODULE_NAMES = {"ir": "intuitive reasoner", "kg": "knowledge generator", "dr": "deep reasoner"}
HISTORY_FILE = "lorid_history.json"


@dataclass
class LoRIDConfig:
    """Settings of LoRID training and its consistency-loop evaluation (arXiv 2508.13037). Official llama2/gsm8k: LoRA
    r=512, α=1024, dropout 0.1 on q/v (the recipe's method section), lr 5e-5, 5 epochs, batch 4×4, cosine schedule,
    3% warm-up; inference N=20, T=1.5, top-p 0.9, top-k 50, up to 1024 new tokens."""

    steps: int = field(default=100, metadata={"help": "Optimizer steps of each adapter's SFT run (IR, KG, DR)."})
    batch_size: int = field(default=4, metadata={"help": "Examples per device batch (official: 4)."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches accumulated per optimizer step (official: 4)."}
    )
    learning_rate: float = field(
        default=2e-4, metadata={"help": "Peak learning rate of each SFT run (official 5e-5 at r=512)."}
    )
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "transformers scheduler name (official: cosine)."}
    )
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Share of the steps with a linear warm-up, in [0, 1) (official: 0.03)."}
    )
    max_length: int = field(
        default=512, metadata={"help": "Training sequences (prompt + target) are cut to this many tokens."}
    )
    max_iterations: int = field(
        default=20,
        metadata={"help": "N: samples per module and the loop's iteration cap (official: 20, hard-coded in evaluate)."},
    )
    temperature: float = field(default=1.5, metadata={"help": "Sampling temperature of all three modules (official)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling top-p of all three modules (official)."})
    top_k: int = field(
        default=50, metadata={"help": "Top-k of the samplers (LLaMA-Factory's vllm_infer default); 0 = off."}
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Token budget of every generated rationale or knowledge (official: 1024)."}
    )
    majority_samples: Optional[int] = field(
        default=None,
        metadata={"help": "IR samples of the fixed-budget majority-vote baseline; None: 3·max_iterations (the "
                  "samples the official loop generates per problem)."},
    )
    eval_problems: int = field(
        default=50, metadata={"help": "Test problems evaluated (the first ones of the recipe's eval split)."}
    )
    eval_time_budget_s: Optional[float] = field(
        default=None,
        metadata={"help": "Stop evaluating after the problem during which this many seconds of evaluation passed (a "
                  "CPU budget; metrics say how many problems ran); None: all eval_problems."},
    )
    sample_batch_size: int = field(
        default=20, metadata={"help": "Sequences per generate() call while sampling (memory, not results)."}
    )
    logging_steps: int = field(default=5, metadata={"help": "Training loss logged every this many steps."})

    def __post_init__(self):
        ints = {"steps": 1, "batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 8, "max_iterations": 1,
                "top_k": 0, "max_new_tokens": 1, "eval_problems": 0, "sample_batch_size": 1, "logging_steps": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"LoRIDConfig.{name} must be an integer >= {low}; got {value!r}.")
        if self.majority_samples is not None and (
            isinstance(self.majority_samples, bool) or not isinstance(self.majority_samples, int)
            or self.majority_samples < 1
        ):
            raise ValueError(f"LoRIDConfig.majority_samples must be None or an integer >= 1; got "
                             f"{self.majority_samples!r}.")
        if self.eval_time_budget_s is not None and (
            isinstance(self.eval_time_budget_s, bool) or not isinstance(self.eval_time_budget_s, (int, float))
            or not self.eval_time_budget_s > 0
        ):
            raise ValueError(f"LoRIDConfig.eval_time_budget_s must be None or a number > 0; got "
                             f"{self.eval_time_budget_s!r}.")
        checks = {
            "learning_rate": lambda v: v > 0,
            "warmup_ratio": lambda v: 0 <= v < 1,
            "temperature": lambda v: v > 0,
            "top_p": lambda v: 0 < v <= 1,
        }
        allowed = {"learning_rate": "> 0", "warmup_ratio": "in [0, 1)", "temperature": "> 0", "top_p": "in (0, 1]"}
        for name, ok in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(
                    value):
                raise ValueError(f"LoRIDConfig.{name} must be a number {allowed[name]}; got {value!r}.")
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in names:
            raise ValueError(f"LoRIDConfig.lr_scheduler_type must be one of {names}; got {self.lr_scheduler_type!r}.")

    @property
    def ir_samples(self) -> int:
        """IR samples drawn per problem: the loop's N, or more for the fixed-budget majority vote."""
        return max(self.max_iterations, self.majority_samples or 3 * self.max_iterations)


# ---------------------------------------------------------------------------------------------------- answers
def canonical_number(text) -> Optional[str]:
    """A number as one canonical string (``"44.0"``, ``"44"`` and ``"4.4e1"`` → ``"44"``; ``"2.50"`` → ``"2.5"``), or
    None when ``text`` is not a finite number. Equal canonical strings mean numerically equal answers, so the loop's
    set intersection and the label comparison (the official ``math_equal``) are one operation."""
    if text is None:
        return None
    try:
        value = Decimal(str(text).strip().replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    out = format(value, "f")
    return "0" if out in ("-0", "0") else out


def lorid_answer(prediction: Optional[str]) -> Optional[str]:
    """The answer of a LoRID output: the number between ``-->`` and ``END`` (the official GSM8K format), else the last
    number of the text (the official parser's fallback, ours through ``extract_gsm_answer``); canonical, or None."""
    import re

    from ..data.gsm import extract_gsm_answer

    if not prediction:
        return None
    text = str(prediction)
    if "-->" in text and "END" in text:
        match = re.search(r"-->\s*(.*?)\s*END", text, re.DOTALL)
        text = match.group(1) if match else ""
    return canonical_number(extract_gsm_answer(text))


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most frequent non-empty answer; ties go to the answer that appeared first. None when there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    first = {}
    for i, a in enumerate(answers):
        if a is not None:
            first.setdefault(a, i)
    return min(counts, key=lambda a: (-counts[a], first[a]))


def consistency_loop(
    ir_answers: Sequence[Optional[str]],
    dr_answers: Sequence[Optional[str]],
    label: Optional[str] = None,
    max_iterations: int = 20,
) -> dict:
    """LoRID's consistency loop over already extracted answers (official ``evaluate``): at iteration ``j`` the
    ``j``-th IR and DR answers join S_IR and S_DR (None or "" dropped); stop at the first non-empty S_IR ∩ S_DR, after
    at most ``max_iterations`` iterations (or the shorter answer list).

    Returns ``iterations`` (j at the stop, or the cap), ``met``, ``intersection`` (sorted), ``strict_answer`` (the
    intersection's answer with most votes among every IR and DR answer seen, ties to the earliest first appearance in
    IR_1, DR_1, IR_2, DR_2, ...), and with a ``label``: ``optimistic`` (official: any intersection answer equals the
    label) and ``strict`` (the strict answer equals it). Answers and label compare after ``canonical_number`` when they
    are numbers, else as stripped strings."""
    if len(ir_answers) != len(dr_answers):
        raise ValueError(f"consistency_loop: {len(ir_answers)} IR answers but {len(dr_answers)} DR answers; the "
                         "j-th DR answer pairs with the j-th IR answer.")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"consistency_loop: max_iterations must be an integer >= 1; got {max_iterations!r}.")

    def norm(a):
        if a is None or str(a).strip() == "":
            return None
        return canonical_number(a) or str(a).strip()

    cap = min(max_iterations, len(ir_answers))
    s_ir, s_dr, order = set(), set(), []  # order: every non-empty answer seen, interleaved IR_1, DR_1, IR_2, ...
    meet: set = set()
    iterations = cap
    for j in range(cap):
        a_ir, a_dr = norm(ir_answers[j]), norm(dr_answers[j])
        for a, pool in ((a_ir, s_ir), (a_dr, s_dr)):
            if a is not None:
                pool.add(a)
                order.append(a)
        meet = s_ir & s_dr
        if meet:
            iterations = j + 1
            break
    strict_answer = majority_vote([a for a in order if a in meet]) if meet else None
    result = {"iterations": iterations, "met": bool(meet), "intersection": sorted(meet), "strict_answer": strict_answer}
    if label is not None:
        gold = norm(label)
        result["optimistic"] = gold is not None and gold in meet
        result["strict"] = gold is not None and strict_answer == gold
    return result


# ---------------------------------------------------------------------------------------------------- prompts
def module_input(module: str, question: str, knowledge: Optional[str] = None) -> str:
    """The official input string of a module (the part after the instruction)."""
    if module == "ir":
        return question
    if module == "kg":
        return f"Question: {question}\n\nKnowledge: "
    if module == "dr":
        return f"Question: {question}\n\nKnowledge: {knowledge or ''}\n\nRationale: "
    raise ValueError(f"module must be one of {list(ADAPTERS)}; got {module!r}.")


def module_prompt(tokenizer, module: str, question: str, knowledge: Optional[str] = None) -> str:
    """The prompt a module sees: LLaMA-Factory's alpaca layout (instruction, a newline, the input) as the user turn of
    the tokenizer's chat template (the official runs use the base model's template), or plain text without one."""
    content = INSTRUCTIONS[module] + "\n" + module_input(module, question, knowledge)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content + "\n"


def answer_target(row) -> str:
    """IR and DR target of a GSM row: the rationale then ``\\n--> <answer> END`` (the official gsm8k format)."""
    from ..data.gsm_knowledge import gsm_rationale

    return gsm_rationale(row) + f"\n--> {row['answer']} END"


def module_examples(rows, module: str, tokenizer) -> list[tuple[str, str]]:
    """(prompt, target) pairs of one module over GSM rows; the knowledge comes from ``gsm_knowledge``."""
    from ..data.gsm_knowledge import gsm_knowledge, knowledge_text

    pairs = []
    for row in rows:
        knowledge = knowledge_text(gsm_knowledge(row))
        target = knowledge if module == "kg" else answer_target(row)
        pairs.append((module_prompt(tokenizer, module, row["question"], knowledge), target))
    return pairs


def encode_examples(pairs, tokenizer, max_length: int) -> list[dict]:
    """Token ids with the loss on the target (+ EOS) only, cut to ``max_length``; an example whose prompt alone fills
    ``max_length`` is skipped with a warning (no target token would train), and a ValueError if every one is."""
    import warnings

    out, skipped = [], 0
    for prompt, target in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(target + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        if len(p) >= max_length:
            skipped += 1
            continue
        ids = (p + a)[:max_length]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(p) + a)[:max_length]})
    if not out:
        raise ValueError(f"LoRIDConfig.max_length={max_length} is filled by every prompt ({skipped} examples); "
                         "raise max_length.")
    if skipped:
        warnings.warn(f"LoRID: {skipped} of {len(pairs)} examples skipped, their prompt fills "
                      f"LoRIDConfig.max_length={max_length}.", stacklevel=2)
    return out


# ---------------------------------------------------------------------------------------------------- training
def train_module(model, tokenizer, module: str, rows, config: LoRIDConfig, output_dir: Path, seed: int,
                 quiet: bool = False) -> list[dict]:
    """One module's SFT run on the active adapter ``module`` with transformers' Trainer; returns the loss log."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    model.set_adapter(module)
    data = Dataset.from_list(encode_examples(module_examples(rows, module, tokenizer), tokenizer, config.max_length))
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        disable_tqdm=quiet,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    if quiet:
        trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the bar for a log printer
    if not quiet:
        print(f"lorid: training {module.upper()} ({MODULE_NAMES[module]}), {config.steps} steps, {len(data)} examples")
    trainer.train()
    model.eval()
    return [{"module": module, "step": r["step"], "loss": r["loss"]} for r in trainer.state.log_history if "loss" in r]


# ---------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], config: LoRIDConfig, sample: bool, seed: int) -> list[str]:
    """One generation per prompt with the active adapter, left-padded batches of ``sample_batch_size``; sampling with
    the official temperature / top-p / top-k under ``torch.manual_seed(seed)``, or greedy."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.generation_config.eos_token_id
    texts = []
    try:
        torch.manual_seed(seed)
        for start in range(0, len(prompts), config.sample_batch_size):
            enc = tokenizer(prompts[start: start + config.sample_batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            kwargs = dict(do_sample=True, temperature=config.temperature, top_p=config.top_p,
                          top_k=config.top_k) if sample else dict(do_sample=False, temperature=None, top_p=None,
                                                                   top_k=None)
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos, **kwargs)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return texts


def sample_problem(model, tokenizer, question: str, config: LoRIDConfig, seed: int) -> dict:
    """Every sample one problem needs, as the official run draws them: IR greedy, IR × ``ir_samples``, KG × N, DR × N
    (DR_j reads KG_j); texts and extracted answers. Each module has its own seed, so results do not depend on batching
    across problems or on what ran before."""
    n = config.max_iterations
    model.set_adapter("ir")
    ir_prompt = module_prompt(tokenizer, "ir", question)
    greedy = generate_texts(model, tokenizer, [ir_prompt], config, sample=False, seed=seed)[0]
    ir = generate_texts(model, tokenizer, [ir_prompt] * config.ir_samples, config, sample=True, seed=seed + 1)
    model.set_adapter("kg")
    kg = generate_texts(model, tokenizer, [module_prompt(tokenizer, "kg", question)] * n, config, sample=True,
                        seed=seed + 2)
    model.set_adapter("dr")
    dr = generate_texts(model, tokenizer, [module_prompt(tokenizer, "dr", question, k.strip()) for k in kg], config,
                        sample=True, seed=seed + 3)
    return {
        "ir_greedy": greedy,
        "ir": ir,
        "kg": kg,
        "dr": dr,
        "ir_greedy_answer": lorid_answer(greedy),
        "ir_answers": [lorid_answer(t) for t in ir],
        "dr_answers": [lorid_answer(t) for t in dr],
    }


def score_problem(samples: dict, label: str, config: LoRIDConfig) -> dict:
    """The table's methods on one problem's samples: IR greedy, the LoRID loop (both scorings), IR majority vote at the
    loop's budget (3·j samples) and at the fixed budget (``ir_samples``), each with the samples it counts."""
    n = config.max_iterations
    gold = canonical_number(label) or str(label).strip()
    loop = consistency_loop(samples["ir_answers"][:n], samples["dr_answers"], label=gold, max_iterations=n)
    used = 3 * loop["iterations"]
    matched = majority_vote(samples["ir_answers"][: min(used, config.ir_samples)])
    fixed = majority_vote(samples["ir_answers"][: config.ir_samples])
    return {
        "label": gold,
        "ir_greedy": {"answer": samples["ir_greedy_answer"], "correct": samples["ir_greedy_answer"] == gold,
                      "samples": 1},
        "lorid": {**loop, "samples_used": used, "samples_generated": 3 * n},
        "ir_majority_matched": {"answer": matched, "correct": matched == gold,
                                "samples": min(used, config.ir_samples)},
        "ir_majority_fixed": {"answer": fixed, "correct": fixed == gold, "samples": config.ir_samples},
    }


def summarize(per_problem: list[dict]) -> list[dict]:
    """The table rows (accuracy and mean samples per problem) from ``score_problem`` records."""
    if not per_problem:
        return []

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    loop = [p["lorid"] for p in per_problem]
    return [
        {"method": "IR greedy", "accuracy": mean(p["ir_greedy"]["correct"] for p in per_problem),
         "samples": mean(p["ir_greedy"]["samples"] for p in per_problem)},
        {"method": "IR majority vote, loop's budget (3·j)",
         "accuracy": mean(p["ir_majority_matched"]["correct"] for p in per_problem),
         "samples": mean(p["ir_majority_matched"]["samples"] for p in per_problem)},
        {"method": "IR majority vote, fixed budget",
         "accuracy": mean(p["ir_majority_fixed"]["correct"] for p in per_problem),
         "samples": mean(p["ir_majority_fixed"]["samples"] for p in per_problem)},
        {"method": "LoRID loop, official optimistic scoring", "accuracy": mean(r["optimistic"] for r in loop),
         "samples": mean(r["samples_used"] for r in loop)},
        {"method": "LoRID loop, strict scoring (majority of the intersection)",
         "accuracy": mean(r["strict"] for r in loop), "samples": mean(r["samples_used"] for r in loop)},
    ]


def markdown_table(rows: list[dict], extra: Optional[dict] = None) -> str:
    """The comparison as a markdown table."""
    lines = ["| method | accuracy | samples / problem |", "|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['accuracy']:.3f} | {r['samples']:.1f} |" for r in rows]
    if extra:
        lines.append("")
        lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


def evaluate_lorid(model, tokenizer, rows, config: LoRIDConfig, seed: int = 0, quiet: bool = False) -> dict:
    """Sample and score ``rows`` (questions with answers), stopping early once ``eval_time_budget_s`` has passed;
    problem ``i`` uses seeds ``seed + 10·i + ...``."""
    from tqdm.auto import tqdm

    model.eval()
    per_problem = []
    began = time.perf_counter()
    for i, row in enumerate(tqdm(list(rows), desc="lorid eval", disable=quiet)):
        if config.eval_time_budget_s is not None and time.perf_counter() - began > config.eval_time_budget_s:
            break
        samples = sample_problem(model, tokenizer, row["question"], config, seed=seed + 10 * i)
        record = score_problem(samples, row["answer"], config)
        record["question"] = row["question"]
        record["samples"] = {k: samples[k] for k in ("ir_greedy_answer", "ir_answers", "dr_answers")}
        record["example_texts"] = {"ir": samples["ir"][0], "kg": samples["kg"][0], "dr": samples["dr"][0]}
        per_problem.append(record)
    loop = [p["lorid"] for p in per_problem]
    return {
        "table": summarize(per_problem),
        "mean_iterations": sum(r["iterations"] for r in loop) / len(loop) if loop else None,
        "met_rate": sum(r["met"] for r in loop) / len(loop) if loop else None,
        "samples_generated_per_problem": 1 + config.ir_samples + 2 * config.max_iterations,
        "per_problem": per_problem,
    }


# ---------------------------------------------------------------------------------------------------- recipe
def lorid_config_from_recipe(recipe) -> LoRIDConfig:
    """``LoRIDConfig`` from the recipe's ``trainer.args`` (unknown keys: a ValueError naming them and the allowed)."""
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, LoRIDConfig)


def check_recipe(recipe) -> None:
    """What ``trainer: lorid`` needs besides its ``trainer.args``: a method whose config can hold several named
    adapters on one model (LoRA or a peft-ext tuner), no plain-runner generation."""
    if recipe.evaluation.generate:
        raise ValueError("trainer 'lorid' runs its own evaluation (trainer.args.eval_problems); set "
                         f"evaluation.generate to 0, got {recipe.evaluation.generate!r}.")
    if recipe.model.quantization is not None:
        raise ValueError(f"trainer 'lorid': model.quantization must be null (three adapters train on one fp32 base); "
                         f"got {recipe.model.quantization!r}.")


def _plot(history: list[dict], table: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .._io import atomic_savefig

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for module in ADAPTERS:
        rows = [r for r in history if r["module"] == module]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=module.upper())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.set_title("LoRID adapters (SFT)")
    if table:
        labels = ["IR greedy", "IR maj. (3·j)", "IR maj. (fixed)", "LoRID opt.", "LoRID strict"]
        bars = bx.bar(labels, [r["accuracy"] for r in table])
        for bar, r in zip(bars, table):
            bx.annotate(f"{r['samples']:.1f} s/p", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        bx.set_ylabel("accuracy")
        bx.set_ylim(0, 1)
        bx.tick_params(axis="x", labelsize=7, rotation=20)
        bx.set_title("accuracy (samples per problem)")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def build_lorid_model(recipe, base, tokenizer, config: LoRIDConfig, train_rows, folder: Path, resume: bool,
                      quiet: bool = False, on_trained=None):
    """The PeftModel with the three adapters ``ir``, ``kg``, ``dr``: each loaded from ``folder/<name>`` when resuming
    and that folder is whole, else trained (seed ``recipe.seed + index``, so a resumed run trains exactly what an
    uninterrupted one would) and saved atomically with the others. Returns ``(model, history, trained)``."""
    from peft import PeftModel, get_peft_model

    from .._io import adapter_folder_is_whole, atomic_write_json
    from ..runner import build_peft_config, save_adapter

    model, history, trained = None, [], []
    peft_config = build_peft_config(recipe)
    for index, name in enumerate(ADAPTERS):
        sub = folder / name
        if resume and adapter_folder_is_whole(sub):
            if model is None:
                model = PeftModel.from_pretrained(base, str(sub), adapter_name=name)
            else:
                model.load_adapter(str(sub), adapter_name=name)
            if (sub / HISTORY_FILE).is_file():
                history += json.loads((sub / HISTORY_FILE).read_text())
            if not quiet:
                print(f"lorid: {name.upper()} loaded from {sub}")
            continue
        torch.manual_seed(recipe.seed + index)
        if model is None:
            model = get_peft_model(base, peft_config, adapter_name=name)
        else:
            model.add_adapter(name, peft_config)
        log = train_module(model, tokenizer, name, train_rows, config, folder.parent / "checkpoints" / name,
                           seed=recipe.seed + index, quiet=quiet)
        save_adapter(model, tokenizer, folder)
        atomic_write_json(sub / HISTORY_FILE, log)
        history += log
        trained.append(name)
        if on_trained is not None:
            on_trained(name)
    return model, history, trained


def train_lorid_recipe(recipe, resume: bool = False, quiet: bool = False, on_trained=None) -> dict:
    """``peft-ext train`` for LoRID (arXiv 2508.13037), ``trainer: {name: lorid, args: {...LoRIDConfig...}}``: the IR,
    KG and DR adapters trained one after the other on the recipe's GSM training rows, then the consistency-loop
    evaluation against IR greedy and IR majority vote on the eval rows; writes ``adapters/{ir,kg,dr}/``,
    ``metrics.json`` and ``results.png``, each atomically. With ``resume``, whole adapter folders are loaded instead of
    retrained. ``on_trained(name)`` is called after each adapter is saved (tests use it to interrupt a run)."""
    from .._io import atomic_write_json
    from ..recipe import to_dict
    from ..runner.reporting import device_name
    from ..runner import load_raw_splits, load_tokenizer_and_model

    check_recipe(recipe)
    config = lorid_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    tokenizer, base = load_tokenizer_and_model(recipe)
    train_rows, eval_rows = load_raw_splits(recipe)
    folder = out / "adapters"
    model, history, trained = build_lorid_model(recipe, base, tokenizer, config, list(train_rows), folder, resume,
                                                quiet, on_trained)
    train_time = time.time() - began
    rows = list(eval_rows)[: config.eval_problems]
    began_eval = time.time()
    result = evaluate_lorid(model, tokenizer, rows, config, seed=recipe.seed, quiet=quiet)
    eval_time = time.time() - began_eval
    metrics = {
        "name": recipe.name,
        "trainer": "lorid",
        "method": recipe.method.name,
        "seed": recipe.seed,
        "paper": PAPER,
        "official_code": OFFICIAL_CODE,
        "lorid": asdict(config),
        "knowledge": "offline: gsm_symbolic template solution steps without numbers (peft_ext.data.gsm_knowledge), "
                     "not the official GPT-4o rules",
        "budget": {"steps_per_adapter": config.steps, "train_rows": len(train_rows),
                   "eval_problems": len(result["per_problem"]), "eval_problems_asked": len(rows),
                   "trained_now": trained, "train_time_s": train_time, "eval_time_s": eval_time,
                   "samples_generated_per_problem": result["samples_generated_per_problem"]},
        "table": result["table"],
        "mean_iterations": result["mean_iterations"],
        "met_rate": result["met_rate"],
        "history": history,
        "per_problem": result["per_problem"],
        "device": device_name(),
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot:
        _plot(history, result["table"], out / "results.png")
    if not quiet:
        print(f"lorid — {recipe.name}: {len(result['per_problem'])} problems, mean iterations "
              f"{metrics['mean_iterations']}")
        print(markdown_table(result["table"]))
        print(f"adapters: {folder}  metrics: {out / 'metrics.json'}")
    return metrics
