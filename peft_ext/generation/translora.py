"""Trans-LoRA: data-free transfer of a trained adapter to another base model (*Trans-LoRA: towards data-free
Transferable Parameter Efficient Finetuning*, Wang et al., 2024; paper link in ``TransLoraConfig``).

The pipeline, one flat function per stage, each usable alone:

1. ``generate_synthetic``: a causal LM (in the paper the target base itself) is prompted with a few seed examples
   (``seeds_per_prompt`` drawn at random from a handful) and continues the list with new task inputs. Copies of a seed
   (case- and whitespace-insensitive, whole or as a substring either way) and duplicates are dropped, so no seed
   example ever enters the synthetic training set.
2. ``train_discriminator``: a LoRA sequence classifier trained to tell real task inputs (class 1) from synthetic ones
   (class 0). In the paper it is trained by the source adapter's owner, on the task data the source LoRA was trained
   on, before that data is gone; with only the seeds at hand, pass the seeds as ``real_texts``.
3. ``filter_synthetic``: rejection sampling, a candidate is kept iff the discriminator's probability of "real" is at
   least ``acceptance_threshold``. ``transfer`` repeats generate-then-filter until ``num_synthetic`` candidates are
   kept or ``max_generated`` were generated.
4. ``label_with_teacher``: the source base + its adapter (the teacher) labels the kept inputs.
5. ``train_student``: a fresh LoRA on the target base learns the teacher's labels (``soft_targets``: its class
   probabilities). ``transfer`` runs 1-5 and writes the student adapter atomically.

Classification only: teacher and student each score the classes either with a classification head
(``AutoModelForSequenceClassification``; ``teacher_label_words`` / ``label_words`` None) or, for a causal LM, with
label words (the logit of each label word's first token after ``prompt``, restricted to the label words), so a
causal-LM student stays a plain ``CAUSAL_LM`` LoRA and its untrained base already gives a zero-shot baseline. The
class is what crosses the tokenizer boundary, so teacher and student need not share a tokenizer or a model family.

Where this departs from the paper: the paper transfers between LLMs of the same task format (Llama-2 / Gemma
generating text answers, distilled with the teacher's text output); here only classification labels are transferred,
between any two models (e.g. an encoder teacher and a causal-LM student), and the discriminator is a classifier LoRA
rather than an LLM answering a yes/no prompt.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "TransLoraConfig",
    "TransferResult",
    "class_logits",
    "generate_synthetic",
    "train_discriminator",
    "filter_synthetic",
    "label_with_teacher",
    "train_student",
    "transfer",
]

REAL, SYNTHETIC = 1, 0  # the discriminator's classes


@dataclass
class TransLoraConfig:
    """Settings of a Trans-LoRA transfer (https://arxiv.org/abs/2405.17258; no public code). Sizes and prompts here
    are a CPU-sized choice for sentence classification; the paper's are for LLM generation tasks."""

    num_synthetic: int = field(
        default=256,
        metadata={"help": "N_synth: synthetic inputs wanted after filtering (the student's training set)."})
    max_generated: int = field(
        default=1024,
        metadata={"help": "Stop the generate-then-filter loop after this many generated candidates even if fewer than "
                  "num_synthetic were kept (>= num_synthetic)."})
    seeds_per_prompt: int = field(
        default=3, metadata={"help": "Seed examples shown in each generation prompt (all seeds when fewer exist)."})
    prompt_header: str = field(
        default="Here are short texts of one kind, one per line.\n",
        metadata={"help": "Text that opens every generation prompt, before the seed examples."})
    example_template: str = field(
        default="Text: {text}\n",
        metadata={"help": "How one example is written in the generation prompt; must contain '{text}' once and end "
                  "with a newline. The prompt ends with the part before '{text}', and the continuation up to the "
                  "first newline is the new example."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call."})
    max_new_tokens: int = field(default=40, metadata={"help": "Longest continuation generated per candidate."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the generator (> 0)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass of the generator, in (0, 1]."})
    min_chars: int = field(
        default=12, metadata={"help": "Candidates shorter than this (after stripping) are dropped as empty (>= 1)."})
    acceptance_threshold: float = field(
        default=0.5,
        metadata={"help": "Rejection sampling: keep a candidate iff the discriminator's P(real) >= this, in [0, 1]."})
    teacher_label_words: Optional[list] = field(
        default=None,
        metadata={"help": "Label words when the teacher is a causal LM (class i = the logit of word i's first token "
                  "after teacher_prompt); None: the teacher has a classification head."})
    teacher_prompt: str = field(
        default="{text}", metadata={"help": "How the teacher sees an input; must contain '{text}'."})
    label_words: Optional[list] = field(
        default_factory=lambda: [" negative", " positive"],
        metadata={"help": "Label words of a causal-LM student, one per class in the teacher's class order (their "
                  "first tokens must differ); None: the student is a sequence classifier with its own head."})
    student_prompt: str = field(
        default="Text: {text}\nSentiment:",
        metadata={"help": "How the student sees an input (label words follow it); must contain '{text}'."})
    soft_targets: bool = field(
        default=False,
        metadata={"help": "Train the student on the teacher's class probabilities instead of its argmax labels (the "
                  "paper distils hard text outputs)."})
    r: int = field(default=8, metadata={"help": "Rank of the student LoRA (and of save_as_lora for a non-LoRA one)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha of the student."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout of the student, in [0, 1)."})
    target_modules: Optional[list] = field(
        default=None, metadata={"help": "Modules the student LoRA adapts; None: PEFT's default for the model type."})
    student_steps: int = field(default=100, metadata={"help": "Optimizer steps of the student."})
    student_batch_size: int = field(default=8, metadata={"help": "Synthetic examples per student step."})
    student_lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the student (> 0)."})
    disc_r: int = field(default=8, metadata={"help": "Rank of the discriminator LoRA (alpha = 2 * disc_r)."})
    disc_steps: int = field(default=60, metadata={"help": "Optimizer steps of the discriminator."})
    disc_batch_size: int = field(
        default=16, metadata={"help": "Examples per discriminator step, half real and half synthetic."})
    disc_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the discriminator (> 0)."})
    max_length: int = field(
        default=96, metadata={"help": "Token limit of every scored input (classifiers keep the start, label-word "
                              "prompts keep the end, where the label words follow)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Inputs per no-grad forward when scoring."})
    seed: int = field(default=0, metadata={"help": "Seed of seed sampling, generation, batching and LoRA init."})

    def __post_init__(self):
        positive = ("num_synthetic", "max_generated", "seeds_per_prompt", "generation_batch_size", "max_new_tokens",
                    "min_chars", "r", "lora_alpha", "student_steps", "student_batch_size", "disc_r", "disc_steps",
                    "disc_batch_size", "max_length", "eval_batch_size")
        for name in positive:
            _check_int(f"TransLoraConfig.{name}", getattr(self, name), 1)
        _check_int("TransLoraConfig.seed", self.seed, 0)
        if self.max_generated < self.num_synthetic:
            raise ValueError(f"TransLoraConfig.max_generated must be >= num_synthetic ({self.num_synthetic}); "
                             f"got {self.max_generated}.")
        if self.disc_batch_size < 2:
            raise ValueError(f"TransLoraConfig.disc_batch_size must be >= 2 (half real, half synthetic); "
                             f"got {self.disc_batch_size}.")
        for name, low, high, open_low, open_high in (
            ("temperature", 0, math.inf, True, True), ("top_p", 0, 1, True, False),
            ("acceptance_threshold", 0, 1, False, False), ("lora_dropout", 0, 1, False, True),
            ("student_lr", 0, math.inf, True, True), ("disc_lr", 0, math.inf, True, True),
        ):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
                (value > low if open_low else value >= low) and (value < high if open_high else value <= high))
            if not ok:
                bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
                raise ValueError(f"TransLoraConfig.{name} must be a number in {bounds}; got {value!r}.")
        t = self.example_template
        if not isinstance(t, str) or t.count("{text}") != 1 or not t.endswith("\n") or "\n" in t.split("{text}")[0]:
            raise ValueError(
                f"TransLoraConfig.example_template must contain '{{text}}' once, no newline before it, and end with a "
                f"newline; got {t!r}.")
        if not t.split("{text}")[0].strip():
            raise ValueError(f"TransLoraConfig.example_template needs a non-blank prefix before '{{text}}' (the "
                             f"generation prompt ends with it); got {t!r}.")
        if not isinstance(self.prompt_header, str):
            raise ValueError(f"TransLoraConfig.prompt_header must be a string; got {self.prompt_header!r}.")
        for name in ("teacher_prompt", "student_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str) or value.count("{text}") != 1:
                raise ValueError(f"TransLoraConfig.{name} must be a string containing '{{text}}' once; got {value!r}.")
        for name in ("teacher_label_words", "label_words"):
            words = getattr(self, name)
            if words is None:
                continue
            if (isinstance(words, str) or not isinstance(words, (list, tuple)) or len(words) < 2
                    or not all(isinstance(w, str) and w.strip() for w in words) or len(set(words)) != len(words)):
                raise ValueError(f"TransLoraConfig.{name} must be None or a list of >= 2 distinct non-blank strings; "
                                 f"got {words!r}.")
            setattr(self, name, list(words))
        if self.target_modules is not None and (
            isinstance(self.target_modules, str) and not self.target_modules
            or not isinstance(self.target_modules, (str, list, tuple))
        ):
            raise ValueError(f"TransLoraConfig.target_modules must be None, a module name pattern or a list of "
                             f"names; got {self.target_modules!r}.")
        if not isinstance(self.soft_targets, bool):
            raise ValueError(f"TransLoraConfig.soft_targets must be True or False; got {self.soft_targets!r}.")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")


def _check_texts(name: str, texts, min_count: int = 1) -> list[str]:
    """``texts`` as a list of non-blank strings, or a one-line ValueError naming ``name``."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"{name} must be a list of strings; got {type(texts).__name__}.")
    texts = list(texts)
    if len(texts) < min_count:
        raise ValueError(f"{name} must hold at least {min_count} text(s); got {len(texts)}.")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"{name} must hold non-blank strings; item {bad[0]} is {texts[bad[0]]!r}.")
    return texts


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batch(tokenizer, texts: list[str], max_length: int, keep: str, device, left_pad: bool = False,
           special_tokens: bool = True) -> dict:
    """Tokenize without the tokenizer's padding settings: cut to ``max_length`` keeping the ``keep`` end, pad on the
    right (or left) with the pad id, so the result does not depend on how the caller configured the tokenizer."""
    ids = tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]
    ids = [x[:max_length] if keep == "start" else x[-max_length:] for x in ids]
    if any(len(x) == 0 for x in ids):
        raise ValueError("an input tokenized to no tokens; pass non-blank texts.")
    width = max(len(x) for x in ids)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        span = slice(width - len(x), width) if left_pad else slice(0, len(x))
        input_ids[i, span] = torch.tensor(x, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def label_word_ids(tokenizer, label_words: list[str], field_name: str = "label_words") -> list[int]:
    """The first token id of each label word; a one-line error naming ``field_name`` when two share it."""
    ids = []
    for word in label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"TransLoraConfig.{field_name}: {word!r} tokenizes to no tokens.")
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"TransLoraConfig.{field_name} {label_words!r} share a first token (ids {ids}); choose label "
                         f"words whose first tokens differ.")
    return ids


def class_logits(model, tokenizer, texts: list[str], label_words: Optional[list] = None, prompt: str = "{text}",
                 max_length: int = 96) -> torch.Tensor:
    """Class scores ``[len(texts), C]`` of one batch, with gradients when enabled: the classification head's logits
    (``label_words`` None), or for a causal LM the next-token logits of each label word's first token at the last
    token of ``prompt`` (class i = ``label_words[i]``)."""
    device = _device(model)
    if label_words is None:
        enc = _batch(tokenizer, texts, max_length, "start", device)
        logits = model(**enc).logits
        if logits.dim() != 2:
            raise ValueError(f"the model gives logits of shape {tuple(logits.shape)}, not [batch, classes]; a causal "
                             f"LM needs label words (TransLoraConfig.label_words / teacher_label_words).")
        return logits
    ids = label_word_ids(tokenizer, label_words)
    enc = _batch(tokenizer, [prompt.format(text=t) for t in texts], max_length, "end", device)
    logits = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1  # right padding: the last real token
    return logits[torch.arange(len(texts), device=device), last][:, ids]


@torch.no_grad()
def class_probabilities(model, tokenizer, texts: list[str], label_words: Optional[list] = None,
                        prompt: str = "{text}", max_length: int = 96, batch_size: int = 32) -> torch.Tensor:
    """Softmax of ``class_logits`` over all ``texts`` in batches, eval mode, ``[N, C]`` float32 on the CPU."""
    was_training = model.training
    model.eval()
    try:
        out = [class_logits(model, tokenizer, list(texts[i:i + batch_size]), label_words, prompt, max_length)
               .float().softmax(-1).cpu() for i in range(0, len(texts), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(label_words) if label_words else 0)


def _resolve(config: Optional[TransLoraConfig]) -> TransLoraConfig:
    if config is None:
        return TransLoraConfig()
    if not isinstance(config, TransLoraConfig):
        raise ValueError(f"config must be a TransLoraConfig; got {type(config).__name__}.")
    return config


def _generation_prompt(examples: list[str], config: TransLoraConfig) -> str:
    prefix = config.example_template.split("{text}")[0]
    shots = "".join(config.example_template.format(text=" ".join(e.split())) for e in examples)
    return config.prompt_header + shots + prefix.rstrip()


def clean_candidates(raw: list[str], seeds: list[str], min_chars: int = 1, exclude: Sequence[str] = ()) -> list[str]:
    """Candidates kept for the synthetic set: stripped, at least ``min_chars`` long, not a copy of a seed (either one
    containing the other, ignoring case and whitespace), not a duplicate of an earlier candidate or of ``exclude``."""
    seed_norms = [_norm(s) for s in seeds]
    seen = {_norm(t) for t in exclude}
    kept = []
    for text in raw:
        text = " ".join(text.split())
        key = _norm(text)
        if len(text) < min_chars or key in seen or any(s in key or key in s for s in seed_norms):
            continue
        seen.add(key)
        kept.append(text)
    return kept


@torch.no_grad()
def generate_synthetic(generator, tokenizer, seeds: list[str], num_samples: int,
                       config: Optional[TransLoraConfig] = None, rng: Optional[random.Random] = None,
                       exclude: Sequence[str] = ()) -> tuple[list[str], int]:
    """Sample ``num_samples`` continuations of seed-example prompts from a causal LM; returns ``(texts, raw)``: the
    new examples that survive ``clean_candidates`` (no seed copies, no duplicates, none in ``exclude``) and how many
    continuations were generated. ``rng`` (default: seeded by ``config.seed``) picks each prompt's seeds; torch's
    sampling is seeded from it as well."""
    config = _resolve(config)
    seeds = _check_texts("seeds", seeds)
    _check_int("num_samples", num_samples, 1)
    rng = rng if rng is not None else random.Random(config.seed)
    was_training = generator.training
    generator.eval()
    prefix = config.example_template.split("{text}")[0]
    raw: list[str] = []
    try:
        while len(raw) < num_samples:
            n = min(config.generation_batch_size, num_samples - len(raw))
            k = min(config.seeds_per_prompt, len(seeds))
            prompts = [_generation_prompt(rng.sample(seeds, k), config) for _ in range(n)]
            enc = _batch(tokenizer, prompts, 10**9, "end", _device(generator), left_pad=True)
            torch.manual_seed(rng.randrange(2**31))
            out = generator.generate(**enc, do_sample=True, temperature=config.temperature, top_p=config.top_p,
                                     max_new_tokens=config.max_new_tokens, pad_token_id=_pad_id(tokenizer),
                                     stop_strings=["\n"], tokenizer=tokenizer)
            for row in out[:, enc["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0]
                # a continuation that restarts the template ("Text: ...") is stripped of the prefix
                raw.append(text[len(prefix.strip()):] if text.strip().startswith(prefix.strip()) else text)
    finally:
        generator.train(was_training)
    return clean_candidates(raw, seeds, config.min_chars, exclude), len(raw)


def _lora_config(task_type: str, r: int, alpha: int, dropout: float = 0.0, target_modules=None):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type)


def _train_classifier(model, tokenizer, batches, targets_for, config: TransLoraConfig, steps: int, lr: float,
                      label_words, prompt) -> list[float]:
    """AdamW on the trainable parameters of ``model`` for ``steps`` steps; ``batches(step)`` gives the step's texts and
    ``targets_for`` their targets (class ids, or probabilities ``[B, C]``); returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        idx = batches(step)
        logits = class_logits(model, tokenizer, [targets_for.texts[i] for i in idx], label_words, prompt,
                              config.max_length).float()
        target = targets_for.targets[idx]
        if target.dtype.is_floating_point:
            loss = -(target.to(logits.device) * logits.log_softmax(-1)).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits, target.to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@dataclass
class _Data:
    texts: list
    targets: torch.Tensor


def _epoch_batches(n: int, batch_size: int, seed: int):
    """Step -> indices: shuffled epochs over ``n`` examples (a new permutation per epoch, seeded)."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def batch(step: int) -> torch.Tensor:
        nonlocal order
        while len(order) < batch_size:
            order += torch.randperm(n, generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        return torch.tensor(idx)

    return batch


def train_discriminator(base_model, tokenizer, real_texts: list[str], synthetic_texts: list[str],
                        config: Optional[TransLoraConfig] = None, target_modules=None):
    """A LoRA sequence classifier on ``base_model`` (an ``AutoModelForSequenceClassification`` with 2 labels; it is
    wrapped in place) trained to give class 1 to ``real_texts`` and 0 to ``synthetic_texts``; every step draws half
    its batch from each side, so unequal counts do not bias it. Returns the ``PeftModel`` in eval mode."""
    from peft import get_peft_model

    config = _resolve(config)
    real = _check_texts("real_texts", real_texts)
    synthetic = _check_texts("synthetic_texts", synthetic_texts)
    num_labels = getattr(base_model.config, "num_labels", None)
    if num_labels != 2:
        raise ValueError(f"train_discriminator: base_model must be a sequence classifier with num_labels=2 (real / "
                         f"synthetic); got num_labels={num_labels}.")
    torch.manual_seed(config.seed)
    model = get_peft_model(base_model, _lora_config("SEQ_CLS", config.disc_r, 2 * config.disc_r, 0.0, target_modules))
    data = _Data(real + synthetic, torch.tensor([REAL] * len(real) + [SYNTHETIC] * len(synthetic)))
    half = config.disc_batch_size // 2
    real_batches = _epoch_batches(len(real), half, config.seed)
    synth_batches = _epoch_batches(len(synthetic), config.disc_batch_size - half, config.seed + 1)

    def batches(step):
        return torch.cat([real_batches(step), synth_batches(step) + len(real)])

    model.discriminator_losses = _train_classifier(model, tokenizer, batches, data, config, config.disc_steps,
                                                   config.disc_lr, None, "{text}")
    return model


def filter_synthetic(discriminator, tokenizer, texts: list[str], config: Optional[TransLoraConfig] = None
                     ) -> tuple[list[str], torch.Tensor]:
    """Rejection sampling: returns ``(kept, p_real)``, the texts whose discriminator probability of class 1 ("real")
    is at least ``config.acceptance_threshold`` (in their order) and that probability for every text."""
    config = _resolve(config)
    texts = list(texts)
    if not texts:
        return [], torch.zeros(0)
    probs = class_probabilities(discriminator, tokenizer, texts, None, "{text}", config.max_length,
                                config.eval_batch_size)
    if probs.shape[1] != 2:
        raise ValueError(f"filter_synthetic: the discriminator must have 2 classes (synthetic, real); it has "
                         f"{probs.shape[1]}.")
    p_real = probs[:, REAL]
    return [t for t, p in zip(texts, p_real.tolist()) if p >= config.acceptance_threshold], p_real


def label_with_teacher(teacher, tokenizer, texts: list[str], config: Optional[TransLoraConfig] = None
                       ) -> tuple[list[int], torch.Tensor]:
    """The teacher's labels for ``texts``: ``(argmax class ids, class probabilities [N, C])``, scored through
    ``config.teacher_label_words`` / ``teacher_prompt``."""
    config = _resolve(config)
    texts = _check_texts("texts", texts)
    probs = class_probabilities(teacher, tokenizer, texts, config.teacher_label_words, config.teacher_prompt,
                                config.max_length, config.eval_batch_size)
    return probs.argmax(-1).tolist(), probs


def _num_classes(model, label_words) -> int:
    return len(label_words) if label_words is not None else int(getattr(model.config, "num_labels", 0) or 0)


def check_student_peft_config(peft_config) -> None:
    """The student must be a LoRA, or a method that exports to one (the output is a plain LoRA folder)."""
    from peft import PeftConfig

    if not isinstance(peft_config, PeftConfig):
        raise ValueError(f"student_peft_config must be a peft PeftConfig (e.g. LoraConfig); got "
                         f"{type(peft_config).__name__}.")
    kind = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    if kind == "LORA":
        return
    from ..registry import get_method

    try:
        spec = get_method(kind)
    except (KeyError, ValueError):
        return  # an upstream method: checked on the wrapped model (supports_lora_conversion)
    if not spec.lora_convertible:
        raise ValueError(f"student_peft_config: {kind} adapters cannot be exported as a LoRA, and Trans-LoRA writes "
                         f"a plain LoRA; use LoraConfig or a LoRA-convertible method (see peft_ext.list_methods()).")


def train_student(target_model, tokenizer, texts: list[str], targets, config: Optional[TransLoraConfig] = None,
                  peft_config=None):
    """A fresh LoRA on ``target_model`` (wrapped in place) trained on ``texts`` with ``targets``: class ids (hard) or
    probabilities ``[N, C]`` (soft). ``peft_config`` defaults to a LoRA from ``config`` (``CAUSAL_LM`` with label
    words, else ``SEQ_CLS``). Returns the ``PeftModel`` in eval mode; its losses are in ``model.student_losses``."""
    from peft import get_peft_model

    config = _resolve(config)
    texts = _check_texts("texts", texts)
    targets = torch.as_tensor(targets)
    if targets.shape[0] != len(texts) or targets.dim() not in (1, 2):
        raise ValueError(f"targets must hold one class id (or one probability row) per text: {len(texts)} texts, "
                         f"targets of shape {tuple(targets.shape)}.")
    classes = _num_classes(target_model, config.label_words)
    seen = targets.shape[1] if targets.dim() == 2 else int(targets.max()) + 1
    if targets.dim() == 1 and int(targets.min()) < 0 or seen > classes or targets.dim() == 2 and seen != classes:
        raise ValueError(f"label spaces differ: the targets have {seen} classes, the student "
                         f"({'TransLoraConfig.label_words' if config.label_words else 'num_labels'}) has {classes}.")
    if config.label_words is not None:
        label_word_ids(tokenizer, config.label_words)
    if peft_config is None:
        peft_config = _lora_config("CAUSAL_LM" if config.label_words else "SEQ_CLS", config.r, config.lora_alpha,
                                   config.lora_dropout, config.target_modules)
    check_student_peft_config(peft_config)
    torch.manual_seed(config.seed)
    model = get_peft_model(target_model, peft_config)
    if str(getattr(peft_config.peft_type, "value", peft_config.peft_type)) != "LORA" and not \
            model.supports_lora_conversion():
        raise ValueError(f"student_peft_config: {peft_config.peft_type} adapters cannot be exported as a LoRA; use "
                         f"LoraConfig or a LoRA-convertible method.")
    data = _Data(texts, targets.float() if targets.dim() == 2 else targets.long())
    batches = _epoch_batches(len(texts), config.student_batch_size, config.seed)
    model.student_losses = _train_classifier(model, tokenizer, batches, data, config, config.student_steps,
                                             config.student_lr, config.label_words, config.student_prompt)
    return model


def save_student(model, out, tokenizer=None, rank: Optional[int] = None) -> Path:
    """Write the student as a plain LoRA folder (``save_pretrained``, or ``save_as_lora`` at ``rank`` for another
    LoRA-convertible method) into a staging folder beside ``out``, then move each file into place (atomic per file:
    a kill leaves the previous or the new file, whole)."""
    from peft.tuners.lora.conversion import save_as_lora

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        kind = str(getattr(model.peft_config["default"].peft_type, "value", ""))
        if kind == "LORA":
            model.save_pretrained(staging)
        else:
            save_as_lora(staging, model, rank=rank or 8)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for src in sorted(p for p in staging.rglob("*") if p.is_file()):
            dest = out / src.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


@dataclass
class TransferResult:
    """What ``transfer`` produced: the student and the numbers of the synthetic data."""

    student: object = field(metadata={"help": "The trained student PeftModel (target base + LoRA), eval mode."})
    texts: list = field(metadata={"help": "The synthetic inputs the student was trained on (no seed among them)."})
    labels: list = field(metadata={"help": "The teacher's class id for each text."})
    probabilities: torch.Tensor = field(metadata={"help": "The teacher's class probabilities [N, C]."})
    generated: int = field(metadata={"help": "Continuations generated in all."})
    candidates: int = field(metadata={"help": "Of those, new examples left after dropping seed copies and duplicates."})
    kept: int = field(metadata={"help": "Of those, the ones the discriminator accepted (all when no discriminator)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where the student adapter was written."})
    seconds: float = field(default=0.0, metadata={"help": "Wall time of the transfer."})


def transfer(teacher, teacher_tokenizer, target_model, target_tokenizer, seeds: list[str],
             config: Optional[TransLoraConfig] = None, discriminator=None, discriminator_tokenizer=None,
             generator=None, generator_tokenizer=None, output_dir: Optional[Union[str, os.PathLike]] = None,
             student_peft_config=None) -> TransferResult:
    """Trans-LoRA end to end: generate from ``seeds`` with ``generator`` (default: the target base, as the paper),
    keep what ``discriminator`` accepts until ``config.num_synthetic`` are kept or ``config.max_generated`` were
    generated (no discriminator: keep every candidate, the unfiltered ablation), label them with ``teacher``, train a
    LoRA on ``target_model`` (wrapped in place), and write it to ``output_dir`` when given."""
    start = time.perf_counter()
    config = _resolve(config)
    seeds = _check_texts("seeds", seeds)
    if (discriminator is None) != (discriminator_tokenizer is None):
        raise ValueError("discriminator and discriminator_tokenizer go together; pass both or neither.")
    generator = generator if generator is not None else target_model
    generator_tokenizer = generator_tokenizer if generator_tokenizer is not None else target_tokenizer
    if not hasattr(generator, "generate"):
        raise ValueError(f"generator must be a causal LM with generate(); got {type(generator).__name__}.")
    # Everything that can be checked before the slow stages is checked here.
    probe = class_probabilities(teacher, teacher_tokenizer, seeds[:1], config.teacher_label_words,
                                config.teacher_prompt, config.max_length)
    teacher_classes = probe.shape[1]
    student_classes = _num_classes(target_model, config.label_words)
    if teacher_classes != student_classes:
        where = "TransLoraConfig.label_words" if config.label_words is not None else "the target's num_labels"
        raise ValueError(f"label spaces differ: the teacher gives {teacher_classes} classes, {where} has "
                         f"{student_classes}.")
    if config.label_words is not None:
        label_word_ids(target_tokenizer, config.label_words)
    if student_peft_config is not None:
        check_student_peft_config(student_peft_config)

    rng = random.Random(config.seed)
    kept: list[str] = []
    generated = candidates = 0
    while len(kept) < config.num_synthetic and generated < config.max_generated:
        n = min(config.generation_batch_size, config.max_generated - generated)
        new, raw = generate_synthetic(generator, generator_tokenizer, seeds, n, config, rng, exclude=kept)
        generated += raw
        candidates += len(new)
        if discriminator is not None:
            new, _ = filter_synthetic(discriminator, discriminator_tokenizer, new, config)
        kept += new[: config.num_synthetic - len(kept)]
    if not kept:
        raise ValueError(f"transfer: no synthetic example was kept out of {generated} generated ({candidates} new); "
                         f"lower TransLoraConfig.acceptance_threshold or min_chars, or raise max_generated.")
    labels, probs = label_with_teacher(teacher, teacher_tokenizer, kept, config)
    targets = probs if config.soft_targets else torch.tensor(labels)
    student = train_student(target_model, target_tokenizer, kept, targets, config, student_peft_config)
    if output_dir is not None:
        save_student(student, output_dir, target_tokenizer, rank=config.r)
    return TransferResult(student=student, texts=kept, labels=labels, probabilities=probs, generated=generated,
                          candidates=candidates, kept=len(kept),
                          output_dir=str(output_dir) if output_dir is not None else None,
                          seconds=time.perf_counter() - start)
