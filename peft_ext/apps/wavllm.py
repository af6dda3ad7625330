"""WavLLM's prompt-aware LoRA against plain LoRA on instructions the model never saw: a text stand-in.

Paper: *WavLLM: Towards Robust and Adaptive Speech Large Language Model* (https://arxiv.org/abs/2404.00656); official
code https://github.com/microsoft/SpeechT5 (``WavLLM/wavllm/models/llama.py``: ``Attention_LoRA``,
``forward_generate``). WavLLM trains LoRA on single tasks (stage 1), then adds the prompt-aware weight adapter and
trains multi-task (stage 2): a pass of the frozen LLM over the text instruction gives hidden states that a small
adapter pools into scales replacing LoRA's α/r (``peft_ext``'s ``prompt_aware_lora``, docs/methods). The claim tested
here is the paper's robustness one: the prompt-dependent scales generalise to instructions phrased differently.

Offline stand-in (no speech encoders or speech data ship on PyPI): two text tasks for SmolLM2-135M-Instruct, math
word problems (reasoning-gym GSM-style, answer = the final number) and review sentiment (VADER movie snippets, answer
= positive / negative), each with several paraphrased instructions; the last ``heldout_paraphrases`` of each task
are never trained on. The two methods, same targets (q_proj/o_proj: WavLLM's width-d output scale needs every target
to be d wide, and SmolLM2's grouped-query k/v are 192, not 576), rank, α, dropout, data order and steps:

* ``lora``: plain PEFT LoRA, α/r, all ``steps``;
* ``prompt_aware_lora``: stage 1 (plain α/r) for ``stage1_steps``, then stage 2 (``set_stage(model, 2)``) with
  ``prompt_mask`` on the instruction tokens, as WavLLM pools the instruction only.

Measured on the test items with a seen and with an unseen paraphrase: the answer loss of each task (token-mean NLL of
the gold answer) and the sentiment accuracy (log-probability of " positive" vs " negative"); also the base model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

PAPER = "https://arxiv.org/abs/2404.00656"
CODE = "https://github.com/microsoft/SpeechT5"
DATA_NAMES = ("gsm", "toy_sentiment")
METHODS = ("lora", "prompt_aware_lora")
PROGRESS_FILE = "progress.json"

# Paraphrased instructions per task; the last ``heldout_paraphrases`` of each list are the unseen ones.
INSTRUCTIONS = {
    "math": [
        "Solve the following math word problem and reply with the final number only.",
        "Work out the answer to this question. Give just the number.",
        "Compute the result of the problem below; answer with a single number.",
        "Read the problem and state its numerical answer.",
        "What number answers this word problem?",
        "Find the solution to the arithmetic problem that follows and write only the final value.",
    ],
    "sentiment": [
        "Classify the sentiment of this review as positive or negative.",
        "Is the opinion in the following text positive or negative?",
        "Decide whether this movie review is favourable (positive) or unfavourable (negative).",
        "Label the review below: positive or negative.",
        "Does the writer like it? Answer positive or negative.",
        "Tell me if the tone of this snippet is positive or negative.",
    ],
}
LABEL_WORDS = ("negative", "positive")


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class WavLLMConfig:
    """Settings of the WavLLM stand-in (https://arxiv.org/abs/2404.00656): the task mix, the held-out paraphrases and
    the training of both methods. The adapter itself is ``method.config`` (``prompt_aware_lora``: r=8, α=32, dropout
    0.1, clamp 3, q_proj/o_proj, scale_mode output); the LoRA baseline takes its r, α, dropout and targets."""

    heldout_paraphrases: int = field(
        default=2, metadata={"help": "Instructions per task never trained on (the last ones of each list)."})
    train_math: int = field(default=96, metadata={"help": "Math training problems (GSM-style, or toy arithmetic)."})
    train_sentiment: int = field(default=96, metadata={"help": "Sentiment training snippets."})
    eval_math: int = field(default=16, metadata={"help": "Math test problems, each asked with a seen and an unseen "
                                                 "instruction."})
    eval_sentiment: int = field(default=32, metadata={"help": "Sentiment test snippets, each asked with a seen and an "
                                                      "unseen instruction."})
    steps: int = field(default=30, metadata={"help": "Optimizer steps of each method."})
    stage1_steps: int = field(
        default=10,
        metadata={"help": "prompt_aware_lora: the first steps as plain LoRA (WavLLM stage 1), then stage 2 with the "
                  "prompt-aware scales; 0 = stage 2 from the start."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per step (the tasks are interleaved)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate (both methods, cosine)."})
    max_input_tokens: int = field(
        default=80, metadata={"help": "Truncate each task input (question, review) to this many tokens."})
    methods: list = field(
        default_factory=lambda: list(METHODS),
        metadata={"help": f"Which to train, from {list(METHODS)}; both for the comparison."})

    def __post_init__(self):
        for name in ("train_math", "train_sentiment", "eval_math", "eval_sentiment", "steps", "batch_size",
                     "max_input_tokens", "heldout_paraphrases"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"WavLLMConfig.{name} must be an integer >= 1; got {value!r}.")
        smallest = min(len(v) for v in INSTRUCTIONS.values())
        if self.heldout_paraphrases >= smallest:
            raise ValueError(f"WavLLMConfig.heldout_paraphrases must leave at least one seen instruction per task "
                             f"(< {smallest}); got {self.heldout_paraphrases}.")
        if isinstance(self.stage1_steps, bool) or not isinstance(self.stage1_steps, int) \
                or not 0 <= self.stage1_steps < self.steps:
            raise ValueError(f"WavLLMConfig.stage1_steps must be an integer in [0, steps={self.steps}); got "
                             f"{self.stage1_steps!r}.")
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"WavLLMConfig.learning_rate must be a finite number > 0; got {lr!r}.")
        if not isinstance(self.methods, (list, tuple)) or not self.methods \
                or any(m not in METHODS for m in self.methods) or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"WavLLMConfig.methods must list distinct names from {list(METHODS)}; got "
                             f"{self.methods!r}.")
        self.methods = list(self.methods)


def wavllm_config_from_recipe(recipe) -> WavLLMConfig:
    """``WavLLMConfig`` from ``trainer.args`` (unknown keys: a ValueError naming them)."""
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, WavLLMConfig)


def check_recipe(recipe) -> None:
    """``trainer: wavllm`` needs a ``prompt_aware_lora`` adapter in stage 2 on a causal LM."""
    if recipe.method.name != "prompt_aware_lora":
        raise ValueError(f"trainer 'wavllm' needs method.name 'prompt_aware_lora'; got {recipe.method.name!r}.")
    if recipe.model.task != "causal_lm":
        raise ValueError(f"trainer 'wavllm' needs model.task 'causal_lm'; got {recipe.model.task!r}.")
    if recipe.method.config.get("stage", 2) != 2:
        raise ValueError("trainer 'wavllm': method.config.stage must be 2 (the recipe runs stage 1 itself for "
                         "trainer.args.stage1_steps steps).")
    if recipe.method.config.get("no_prompt", "error") == "whole_input":
        raise ValueError("trainer 'wavllm': method.config.no_prompt 'whole_input' lets the answer shape its own "
                         "scales; use 'error' (the recipe always passes prompt_mask).")
    wavllm_config_from_recipe(recipe)


# ---------------------------------------------------------------------------------------------------------- data
def toy_math(n: int, seed: int) -> list[tuple[str, str]]:
    """Toy arithmetic for seconds-long runs: ("What is 3 plus 4?", "7")."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, 20, size=2))
        rows.append((f"What is {a} plus {b}?", str(a + b)))
    return rows


def task_rows(recipe, config: WavLLMConfig) -> dict:
    """``{"train": {"math": [(input, answer)], "sentiment": [...]}, "test": {...}}``: GSM-style problems (final
    answer) and VADER movie snippets (positive / negative) for data.name gsm; toy arithmetic and the toy sentiment set
    for toy_sentiment."""
    seed = recipe.data.seed
    if recipe.data.name == "toy_sentiment":
        from ..runner.data import toy_sentiment

        toy = toy_sentiment(n=max(64, 2 * (config.train_sentiment + config.eval_sentiment)), seed=seed)
        math_rows = toy_math(config.train_math + config.eval_math, seed)
        sent = {s: [(t, LABEL_WORDS[int(y)]) for t, y in zip(toy[s]["text"], toy[s]["label"])]
                for s in ("train", "test")}
        math_split = {"train": math_rows[: config.train_math], "test": math_rows[config.train_math:]}
    else:
        from ..data import load_vader_domain
        from ..data.gsm import load_gsm

        gsm = load_gsm(seed=seed)
        math_split = {s: [(q, str(a)) for q, a in zip(gsm[s]["question"], gsm[s]["answer"])]
                      for s in ("train", "test")}
        n = config.train_sentiment + config.eval_sentiment
        vader = load_vader_domain("movies", seed=seed, max_examples=max(4 * n, 200), neutral_margin=0.5)
        sent = {s: [(t, LABEL_WORDS[int(y)]) for t, y in zip(vader[s]["text"], vader[s]["label"])]
                for s in ("train", "test")}
    return {
        "train": {"math": math_split["train"][: config.train_math],
                  "sentiment": sent["train"][: config.train_sentiment]},
        "test": {"math": math_split["test"][: config.eval_math], "sentiment": sent["test"][: config.eval_sentiment]},
    }


def paraphrases(task: str, heldout: int, seen: bool) -> list[str]:
    """The seen (trained) or unseen (held-out) instructions of ``task``."""
    items = INSTRUCTIONS[task]
    return items[: len(items) - heldout] if seen else items[len(items) - heldout:]


def encode_example(tokenizer, instruction: str, text: str, answer: str, max_input_tokens: int) -> dict:
    """``{instruction}\\n{input}\\nAnswer: {answer}<eos>`` as ids, labels (the answer only) and the prompt mask (the
    instruction tokens: WavLLM pools the text instruction). Tokenizers without an EOS token end with SEP (BERT's)."""
    ins = tokenizer(instruction + "\n", add_special_tokens=False)["input_ids"]
    body_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_input_tokens]
    body = tokenizer(tokenizer.decode(body_ids) + "\nAnswer:", add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ans = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
    ids = ins + body + ans
    return {"input_ids": ids, "labels": [-100] * (len(ins) + len(body)) + ans,
            "prompt_mask": [True] * len(ins) + [False] * (len(body) + len(ans))}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch tensors (labels -100 and prompt_mask False on padding)."""
    width = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
           "labels": torch.full((len(examples), width), -100, dtype=torch.long),
           "prompt_mask": torch.zeros((len(examples), width), dtype=torch.bool)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(e["input_ids"])
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = torch.tensor(e["labels"])
        out["prompt_mask"][i, :n] = torch.tensor(e["prompt_mask"])
    return out


def training_stream(tokenizer, rows: dict, config: WavLLMConfig, seed: int) -> list[list[dict]]:
    """``steps`` batches: the tasks interleaved, each example with a seen instruction drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    pool = [(task, r) for task in ("math", "sentiment") for r in rows[task]]
    seen = {task: paraphrases(task, config.heldout_paraphrases, True) for task in INSTRUCTIONS}
    order, cursor, batches = rng.permutation(len(pool)), 0, []
    for _ in range(config.steps):
        batch = []
        for _ in range(config.batch_size):
            if cursor == len(order):
                order, cursor = rng.permutation(len(pool)), 0
            task, (text, answer) = pool[order[cursor]]
            cursor += 1
            instruction = seen[task][int(rng.integers(0, len(seen[task])))]
            batch.append(encode_example(tokenizer, instruction, text, answer, config.max_input_tokens))
        batches.append(batch)
    return batches


# ---------------------------------------------------------------------------------------------------------- model
def _call(model, batch: dict, prompt_aware: bool):
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if prompt_aware:
        kwargs["prompt_mask"] = batch["prompt_mask"]
    return model(**kwargs)


def answer_logprobs(model, batch: dict, prompt_aware: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the answer tokens' log-probabilities, number of answer tokens) per sequence."""
    logits = _call(model, batch, prompt_aware).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels.ne(-100)
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1)


def train_method(model, batches: list[list[dict]], config: WavLLMConfig, pad_id: int, prompt_aware: bool,
                 seed: int, progress: Optional[str] = None) -> list[dict]:
    """AdamW + cosine over ``batches``; for prompt-aware LoRA the stage switches to 2 after ``stage1_steps``. Loss:
    token-mean NLL of the answers."""
    from ..tuners.prompt_aware_lora import set_stage

    torch.manual_seed(seed)
    if prompt_aware:
        set_stage(model, 1 if config.stage1_steps else 2)
    params = lambda: [p for p in model.parameters() if p.requires_grad]  # noqa: E731 (the set grows at stage 2)
    opt = torch.optim.AdamW(params(), lr=config.learning_rate, weight_decay=0.0)
    total = len(batches)
    model.train()
    history = []
    for step, examples in enumerate(batches):
        if prompt_aware and config.stage1_steps and step == config.stage1_steps:
            set_stage(model, 2)  # the adapter joins: add its parameters to the optimizer
            known = {id(p) for g in opt.param_groups for p in g["params"]}
            new = [p for p in params() if id(p) not in known]
            if new:
                opt.add_param_group({"params": new})
        for group in opt.param_groups:  # cosine over all steps, one schedule for every group
            group["lr"] = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / total))
        batch = collate(examples, pad_id)
        lp, n = answer_logprobs(model, batch, prompt_aware and _stage(model) == 2)
        loss = -lp.sum() / n.sum()
        if not torch.isfinite(loss):
            raise RuntimeError(f"wavllm: the loss became {loss.item()} at step {step}.")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": float(loss.item())})
        if progress and (step + 1) % max(1, total // 6) == 0:
            print(f"  {progress} step {step + 1}/{total}: loss {loss.item():.4f}", flush=True)
    model.eval()
    return history


def _stage(model) -> int:
    config = getattr(model, "peft_config", {}).get("default")
    return int(getattr(config, "stage", 0) or 0)


@torch.no_grad()
def evaluate(model, tokenizer, rows: dict, config: WavLLMConfig, prompt_aware: bool, batch_size: int = 8) -> dict:
    """Per task and per instruction set (seen / unseen): answer loss (token-mean NLL of the gold answer) and, for
    sentiment, accuracy of log p(" positive") vs log p(" negative"). Test item i is asked with instruction
    ``i mod n`` of each set."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = {}
    for which in ("seen", "unseen"):
        res = {}
        for task in ("math", "sentiment"):
            instructions = paraphrases(task, config.heldout_paraphrases, which == "seen")
            items = rows[task]
            candidates = LABEL_WORDS if task == "sentiment" else (None,)
            scores = {}
            for cand in candidates:
                examples = [encode_example(tokenizer, instructions[i % len(instructions)], text,
                                           cand if cand is not None else answer, config.max_input_tokens)
                            for i, (text, answer) in enumerate(items)]
                lps, counts = [], []
                for start in range(0, len(examples), batch_size):
                    lp, n = answer_logprobs(model, collate(examples[start:start + batch_size], pad), prompt_aware)
                    lps += lp.tolist()
                    counts += n.tolist()
                scores[cand] = (np.array(lps), np.array(counts))
            if task == "math":
                lp, n = scores[None]
                res["math_loss"] = float(-lp.sum() / n.sum())
            else:
                gold = np.array([LABEL_WORDS.index(a) for _, a in items])
                lp = np.stack([scores[w][0] for w in LABEL_WORDS], 1)  # [items, 2]
                n = np.stack([scores[w][1] for w in LABEL_WORDS], 1)
                res["sentiment_accuracy"] = float((lp.argmax(1) == gold).mean())
                rows_ = np.arange(len(gold))
                res["sentiment_loss"] = float(-lp[rows_, gold].sum() / n[rows_, gold].sum())
        result[which] = res
    return result


def build_adapter(base, recipe, method: str):
    """``get_peft_model`` with the recipe's prompt-aware LoRA, or plain LoRA with its r, α, dropout and targets."""
    from peft import LoraConfig, get_peft_model

    from ..tuners.prompt_aware_lora import PromptAwareLoraConfig

    kwargs = dict(recipe.method.config)
    kwargs.pop("task_type", None)
    torch.manual_seed(recipe.seed)
    if method == "prompt_aware_lora":
        return get_peft_model(base, PromptAwareLoraConfig(task_type="CAUSAL_LM", **kwargs))
    lora = LoraConfig(task_type="CAUSAL_LM", r=kwargs.get("r", 8), lora_alpha=kwargs.get("lora_alpha", 32),
                      lora_dropout=kwargs.get("lora_dropout", 0.1), target_modules=kwargs.get("target_modules"))
    return get_peft_model(base, lora)


def _plot(methods: dict, base_eval: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .._io import atomic_savefig

    names = ["base"] + list(methods)
    evals = [base_eval] + [m["eval"] for m in methods.values()]
    keys = ("math_loss", "sentiment_loss", "sentiment_accuracy")
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
    for ax, key in zip(axes, keys):
        x = np.arange(len(names))
        ax.bar(x - 0.2, [e["seen"][key] for e in evals], 0.4, label="seen instructions")
        ax.bar(x + 0.2, [e["unseen"][key] for e in evals], 0.4, label="unseen instructions")
        ax.set_xticks(x, names, fontsize=7)
        ax.set_title(key, fontsize=9)
    axes[0].legend(fontsize=7)
    for name, m in methods.items():
        axes[3].plot([h["step"] for h in m["history"]], [h["loss"] for h in m["history"]], label=name)
    axes[3].set_title("training loss", fontsize=9)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def train_wavllm_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for the WavLLM stand-in (``trainer: {name: wavllm, args: {...WavLLMConfig...}}``): evaluates
    the base model, trains each of ``methods`` on the same batches, evaluates each on seen and unseen instructions;
    writes ``<method>/`` adapters, ``metrics.json`` and ``results.png``, each atomically. With ``resume`` a method
    whose adapter is whole is loaded instead of retrained (its history and the base evaluation from
    ``progress.json``)."""
    from peft import PeftModel

    from .._io import adapter_folder_is_whole, atomic_write_json
    from ..recipe import to_dict
    from ..runner.reporting import device_name
    from ..runner import load_tokenizer_and_model, save_adapter

    check_recipe(recipe)
    config = wavllm_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, base = load_tokenizer_and_model(recipe)
    base.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = task_rows(recipe, config)
    progress_path = out / PROGRESS_FILE
    progress = json.loads(progress_path.read_text()) if resume and progress_path.is_file() else {}
    base_eval = progress.get("base") or evaluate(base, tokenizer, rows["test"], config, prompt_aware=False)
    progress["base"] = base_eval
    atomic_write_json(progress_path, progress)
    batches = training_stream(tokenizer, rows["train"], config, recipe.seed)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    results = {}
    for method in config.methods:
        began_method = time.time()
        base.load_state_dict(base_state)
        folder = out / method
        prompt_aware = method == "prompt_aware_lora"
        if resume and adapter_folder_is_whole(folder) and method in progress.get("history", {}):
            model = PeftModel.from_pretrained(base, folder)
            history, trained = progress["history"][method], False
        else:
            model = build_adapter(base, recipe, method)
            history = train_method(model, batches, config, pad, prompt_aware, recipe.seed,
                                   progress=None if quiet else method)
            save_adapter(model, tokenizer, folder)
            progress.setdefault("history", {})[method] = history
            atomic_write_json(progress_path, progress)
            trained = True
        results[method] = {"eval": evaluate(model, tokenizer, rows["test"], config, prompt_aware), "history": history,
                           "trained_this_run": trained, "time_s": time.time() - began_method,
                           "trainable_parameters": sum(p.numel() for n, p in model.named_parameters()
                                                       if "lora" in n or "prompt_aware" in n)}
        base = model.unload() if hasattr(model, "unload") else model.get_base_model()
        base.eval()
    metrics = {
        "name": recipe.name,
        "trainer": "wavllm",
        "method": recipe.method.name,
        "seed": recipe.seed,
        "paper": PAPER,
        "official_code": CODE,
        "wavllm": asdict(config),
        "instructions": {t: {"seen": paraphrases(t, config.heldout_paraphrases, True),
                             "unseen": paraphrases(t, config.heldout_paraphrases, False)} for t in INSTRUCTIONS},
        "items": {s: {t: len(v) for t, v in rows[s].items()} for s in rows},
        "base": base_eval,
        "methods": results,
        "budget": {"steps": config.steps, "batch_size": config.batch_size, "wall_time_s": time.time() - began},
        "device": device_name(),
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot:
        _plot(results, base_eval, out / "results.png")
    if not quiet:
        for name, e in [("base", base_eval)] + [(m, r["eval"]) for m, r in results.items()]:
            print(f"wavllm — {name}: unseen instructions: math loss {e['unseen']['math_loss']:.3f}, sentiment "
                  f"accuracy {e['unseen']['sentiment_accuracy']:.3f} (seen: {e['seen']['math_loss']:.3f}, "
                  f"{e['seen']['sentiment_accuracy']:.3f})")
        print(f"metrics: {out / 'metrics.json'}")
    return metrics


RECIPE = dict(config=WavLLMConfig, entry=train_wavllm_recipe, data=DATA_NAMES, tasks=("causal_lm",), models=())
