"""Quality regression by a language model's level words, as in the AIGV quality assessor (LoRA r=8, α=16, q/v).

Paper: *Towards Holistic Visual Quality Assessment of AI-Generated Videos: A LLM-Based Multi-Dimensional Evaluation
Model* (https://arxiv.org/abs/2506.04715); official code https://github.com/QiZelu/AIGVEval
(``model/model_motion_combine.py``: ``T2VQA.forward``; ``train_motion_combine.py``: ``plcc_loss``, ``rank_loss``).

The official model puts video tokens into a LLaMA prompt ("... Please assess the quality of this video."), reads the
next-token logits ``l`` at the last position for the five level words and returns
``q = Σ_i w_i · softmax(l / 100)_i`` over (excellent, good, fair, poor, bad) with ``w = (1, 2, 3, 4, 5)`` **in that
order**: "excellent" weighs 1 and "bad" 5, so the official ``q`` grows as the predicted quality falls, while the MOS it
is trained against grows with quality. Its loss (PLCC loss + 0.3 × pairwise rank loss, both sign-sensitive) therefore
has to teach the LoRA to swap the meaning of the words. ``level_weights`` default ``(5, 4, 3, 2, 1)`` here
(excellent = 5, the MOS direction); ``(1, 2, 3, 4, 5)`` is the official order. Since the probabilities sum to 1, the
two read-outs are exactly ``q_mos = 6 − q_official``.

Offline stand-in (no video encoders or AIGV videos ship on PyPI): the "video" is a VADER text snippet and its MOS is
the snippet's human mean rating (−4..+4, ``peft_ext.data.load_vader_domain``), read out of SmolLM2-135M-Instruct with
the same LoRA setting (r=8, α=16, dropout 0.05 on q_proj/v_proj), the same level-word read-out and the same loss.
Official details kept as options: lora_A re-initialised N(0, 1) after wrapping (``lora_a_init='normal'``), AdamW with
weight decay 0.05, linear warm-up then cosine. Left out: the official pad token added after wrapping (its embedding
row is never trained; SmolLM2 has a pad token).
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

PAPER = "https://arxiv.org/abs/2506.04715"
CODE = "https://github.com/QiZelu/AIGVEval"
LEVELS = ("excellent", "good", "fair", "poor", "bad")
OFFICIAL_WEIGHTS = (1.0, 2.0, 3.0, 4.0, 5.0)
MOS_WEIGHTS = (5.0, 4.0, 3.0, 2.0, 1.0)
DATA_NAMES = ("movie_reviews", "toy_sentiment")
DEFAULT_PROMPT = ("Review: {text}\nPlease assess the quality of this review's opinion of its subject in one word "
                  "(excellent, good, fair, poor or bad).\nAnswer:")
PROGRESS_FILE = "progress.json"


# ---------------------------------------------------------------------------------------------------------- formulas
def level_score(logits: torch.Tensor, token_ids, weights, temperature: float = 100.0) -> torch.Tensor:
    """The official read-out ``q = Σ_i w_i · softmax(l[token_ids] / temperature)_i`` of next-token ``logits``
    (``[..., vocab]``) over the level words' token ids; returns ``[...]``. Computed in fp32."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=logits.device)
    w = torch.as_tensor(list(weights), dtype=torch.float32, device=logits.device)
    if ids.numel() != w.numel():
        raise ValueError(f"level_score: {ids.numel()} token ids but {w.numel()} weights.")
    probs = torch.softmax(logits.float().index_select(-1, ids) / temperature, dim=-1)
    return (probs * w).sum(-1)


def level_token_ids(tokenizer, words=LEVELS) -> list[int]:
    """The token id of each level word as the next token after the prompt: the first token of ``" " + word`` (the
    official code takes the first token after BOS of the bare word, which LLaMA's SentencePiece writes with its leading
    space mark); a ValueError if two words share it."""
    ids = []
    for word in words:
        tokens = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"level word {word!r} has no tokens.")
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"level words {list(words)} map to repeated first tokens {ids}; choose other words.")
    return ids


def plcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official PLCC loss: standardise both (population std), ``(MSE(p̂, ŷ)/4 + MSE(ρ·p̂, ŷ)/4) / 2`` with
    ``ρ = mean(p̂·ŷ)`` (the Pearson correlation). 0 when ``pred`` is an increasing affine map of ``target``."""
    p = (pred - pred.mean()) / (pred.std(unbiased=False) + 1e-8)
    t = (target - target.mean()) / (target.std(unbiased=False) + 1e-8)
    rho = (p * t).mean()
    return 0.5 * (((p - t) ** 2).mean() / 4 + ((rho * p - t) ** 2).mean() / 4)


def rank_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official pairwise rank loss: ``Σ_{i,j} relu((p_i − p_j) · sign(t_j − t_i)) / (n(n−1)) / (1 + max)``, the
    mean hinge over the pairs the prediction orders against the target, scaled by one plus the largest violation
    (a detached-free scale, as in the official code)."""
    n = pred.shape[0]
    if n < 2:
        return pred.sum() * 0.0
    diff = pred[:, None] - pred[None, :]
    wrong = torch.relu(diff * torch.sign(target[None, :] - target[:, None]))
    return wrong.sum() / (n * (n - 1)) / (1 + wrong.max())


def quality_loss(pred: torch.Tensor, target: torch.Tensor, rank_weight: float = 0.3) -> torch.Tensor:
    """The official training loss: ``plcc_loss + rank_weight · rank_loss`` (rank_weight 0.3)."""
    return plcc_loss(pred, target) + rank_weight * rank_loss(pred, target)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def plcc(pred, target) -> float:
    """Pearson linear correlation (0.0 when either side is constant)."""
    p, t = np.asarray(pred, dtype=float), np.asarray(target, dtype=float)
    p, t = p - p.mean(), t - t.mean()
    denom = math.sqrt(float((p * p).sum() * (t * t).sum()))
    return float((p * t).sum() / denom) if denom > 0 else 0.0


def srcc(pred, target) -> float:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    return plcc(_ranks(np.asarray(pred, dtype=float)), _ranks(np.asarray(target, dtype=float)))


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class AIGVConfig:
    """Settings of the level-word quality regression (AIGV quality assessment, https://arxiv.org/abs/2506.04715). The
    LoRA itself is ``method.config`` (the paper's: r=8, lora_alpha=16, lora_dropout=0.05, q_proj/v_proj)."""

    domains: list = field(
        default_factory=lambda: ["movies"],
        metadata={"help": "VADER domains whose snippets are the items (data.name movie_reviews); their human mean "
                  "rating is the MOS. Ignored for toy_sentiment."},
    )
    max_examples: Optional[int] = field(
        default=600, metadata={"help": "Snippets per domain before the 80/20 train/test split (seeded); null = all."}
    )
    prompt: str = field(
        default=DEFAULT_PROMPT,
        metadata={"help": "Prompt template with {text}; the level word is read as the next token after it."},
    )
    level_words: list = field(
        default_factory=lambda: list(LEVELS),
        metadata={"help": "The level words, best first as in the official code (excellent, good, fair, poor, bad)."},
    )
    level_weights: list = field(
        default_factory=lambda: list(MOS_WEIGHTS),
        metadata={"help": "Weight of each level word in the score. Default (5, 4, 3, 2, 1): excellent = 5, higher "
                  "= better, the direction of the MOS. The official code uses (1, 2, 3, 4, 5) on the same order "
                  "(a score that grows as quality falls; its loss then has to invert the words)."},
    )
    temperature: float = field(default=100.0, metadata={"help": "Softmax temperature of the read-out (official: 100)."})
    rank_weight: float = field(default=0.3, metadata={"help": "Weight of the rank loss next to the PLCC loss (0.3)."})
    lora_a_init: str = field(
        default="normal",
        metadata={"help": "'normal': lora_A re-initialised N(0, 1) after wrapping (the official code; the paper is "
                  "silent); 'peft': PEFT's default (Kaiming-uniform)."},
    )
    steps: int = field(default=40, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Items per step (official: 8); the losses are per batch."})
    learning_rate: float = field(
        default=1e-4, metadata={"help": "AdamW learning rate (official: 1e-5 over 10 epochs of a video set)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (official: 0.05)."})
    warmup_ratio: float = field(
        default=0.25, metadata={"help": "Share of the steps with linear warm-up (official: 2.5 of 10 epochs)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of scoring."})

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AIGVConfig.{name} must be an integer >= 1; got {value!r}.")
        if self.batch_size < 2:
            raise ValueError(f"AIGVConfig.batch_size must be >= 2 (the losses compare items); got {self.batch_size}.")
        if self.max_examples is not None and (isinstance(self.max_examples, bool)
                                              or not isinstance(self.max_examples, int) or self.max_examples < 10):
            raise ValueError(f"AIGVConfig.max_examples must be null or an integer >= 10; got {self.max_examples!r}.")
        for name, low_ok in (("temperature", False), ("learning_rate", False), ("rank_weight", True),
                             ("weight_decay", True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and not low_ok):
                raise ValueError(f"AIGVConfig.{name} must be a finite number {'>= 0' if low_ok else '> 0'}; "
                                 f"got {value!r}.")
        if isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio, (int, float)) \
                or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"AIGVConfig.warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}.")
        if not isinstance(self.level_words, (list, tuple)) or len(self.level_words) < 2 \
                or not all(isinstance(w, str) and w.strip() for w in self.level_words):
            raise ValueError(f"AIGVConfig.level_words must list at least two words; got {self.level_words!r}.")
        if not isinstance(self.level_weights, (list, tuple)) or len(self.level_weights) != len(self.level_words) \
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                           for w in self.level_weights):
            raise ValueError(f"AIGVConfig.level_weights must be {len(self.level_words)} numbers (one per level word); "
                             f"got {self.level_weights!r}.")
        if len(set(self.level_weights)) < 2:
            raise ValueError("AIGVConfig.level_weights must not all be equal (the score would be constant).")
        if self.lora_a_init not in ("normal", "peft"):
            raise ValueError(f"AIGVConfig.lora_a_init must be 'normal' or 'peft'; got {self.lora_a_init!r}.")
        if not isinstance(self.prompt, str) or "{text}" not in self.prompt:
            raise ValueError(f"AIGVConfig.prompt must be a string containing {{text}}; got {self.prompt!r}.")
        if not isinstance(self.domains, (list, tuple)) or not self.domains:
            raise ValueError(f"AIGVConfig.domains must be a non-empty list; got {self.domains!r}.")
        self.domains, self.level_words = list(self.domains), list(self.level_words)
        self.level_weights = [float(w) for w in self.level_weights]


def aigv_config_from_recipe(recipe) -> AIGVConfig:
    """``AIGVConfig`` from ``trainer.args`` (unknown keys: a ValueError naming them)."""
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, AIGVConfig)


def check_recipe(recipe) -> None:
    """``trainer: aigv`` needs plain LoRA on a causal LM and snippets with ratings (VADER or the toy set)."""
    if recipe.method.name != "lora":
        raise ValueError(f"trainer 'aigv' needs method.name 'lora' (the paper's plain LoRA); got "
                         f"{recipe.method.name!r}.")
    if recipe.model.task != "causal_lm":
        raise ValueError(f"trainer 'aigv' needs model.task 'causal_lm' (the level words are next-token logits); got "
                         f"{recipe.model.task!r}.")
    config = aigv_config_from_recipe(recipe)
    if recipe.data.name == "movie_reviews":
        from ..data import VADER_DOMAINS

        bad = [d for d in config.domains if d not in VADER_DOMAINS]
        if bad:
            raise ValueError(f"trainer.args.domains: unknown domain(s) {bad}; allowed: {sorted(VADER_DOMAINS)}.")


# ---------------------------------------------------------------------------------------------------------- data
def toy_rated(n: int = 160, seed: int = 0) -> dict:
    """A synthetic rated set for seconds-long runs: ``"the plot was great"`` with a graded rating per word
    (``peft_ext.runner.toy_sentiment`` words, ±1, ±2, ±3 by word), as ``{"train": [(text, mos)], "test": [...]}``."""
    from ..runner.data import TOY_NEGATIVE, TOY_NOUNS, TOY_POSITIVE

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        positive = bool(rng.integers(0, 2))
        words = TOY_POSITIVE if positive else TOY_NEGATIVE
        k = int(rng.integers(0, len(words)))
        rating = (1 + k % 3) * (1.0 if positive else -1.0)
        rows.append((f"the {rng.choice(TOY_NOUNS)} was {words[k]}", rating))
    cut = int(0.75 * n)
    return {"train": rows[:cut], "test": rows[cut:]}


def rated_rows(recipe, config: AIGVConfig) -> dict:
    """``{"train": [(text, mos)], "test": [...]}``: the VADER snippets of ``config.domains`` with their human mean
    ratings (data.name movie_reviews) or ``toy_rated``; cut to ``data.max_train`` / ``data.max_eval``."""
    spec = recipe.data
    if spec.name == "toy_sentiment":
        splits = toy_rated(seed=spec.seed)
    else:
        from ..data import load_vader_domain

        splits = {"train": [], "test": []}
        for domain in config.domains:
            data = load_vader_domain(domain, seed=spec.seed, max_examples=config.max_examples)
            for split in splits:
                splits[split] += list(zip(data[split]["text"], (float(r) for r in data[split]["rating"])))
    if spec.max_train is not None:
        splits["train"] = splits["train"][: spec.max_train]
    if spec.max_eval is not None:
        splits["test"] = splits["test"][: spec.max_eval]
    return splits


# ---------------------------------------------------------------------------------------------------------- model
def encode_prompts(tokenizer, texts, template: str, max_length: int) -> dict:
    """Left-padded prompts (the snippet truncated to ``max_length`` tokens first, so the question is never cut) with
    explicit position ids, so an item's score does not depend on the padding of its batch."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        rows.append(tokenizer(template.format(text=tokenizer.decode(ids)), add_special_tokens=False)["input_ids"])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}


def predict(model, batch: dict, token_ids, weights, temperature: float) -> torch.Tensor:
    """The read-out score of each prompt in ``batch`` (logits of the last position only)."""
    logits = model(**batch, logits_to_keep=1).logits[:, -1]
    return level_score(logits, token_ids, weights, temperature)


@torch.no_grad()
def score_rows(model, tokenizer, rows, config: AIGVConfig, max_length: int) -> list[float]:
    """Scores of (text, mos) rows, in eval mode."""
    was_training = model.training
    model.eval()
    ids = level_token_ids(tokenizer, config.level_words)
    out = []
    for start in range(0, len(rows), config.eval_batch_size):
        chunk = rows[start:start + config.eval_batch_size]
        batch = encode_prompts(tokenizer, [t for t, _ in chunk], config.prompt, max_length)
        out += predict(model, batch, ids, config.level_weights, config.temperature).tolist()
    model.train(was_training)
    return out


def correlations(scores, mos) -> dict:
    """SRCC and PLCC of scores against the MOS (local implementations; scipy.stats agrees)."""
    return {"srcc": srcc(scores, mos), "plcc": plcc(scores, mos)}


def init_lora_a_normal(model, seed: int) -> int:
    """Re-initialise every ``lora_A`` weight N(0, 1), as the official code does after ``get_peft_model``; returns the
    number of tensors changed."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
                n += 1
    return n


def train_quality(model, tokenizer, rows, config: AIGVConfig, max_length: int, seed: int,
                  progress: bool = False) -> list[dict]:
    """AdamW on the trainable parameters, ``quality_loss`` per batch, linear warm-up then cosine; returns the loss
    history (one entry per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warm = int(config.warmup_ratio * config.steps)

    def lr_lambda(step):
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, config.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ids = level_token_ids(tokenizer, config.level_words)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order, cursor, history = rng.permutation(len(rows)), 0, []
    model.train()
    for step in range(config.steps):
        if cursor + config.batch_size > len(order):
            order, cursor = rng.permutation(len(rows)), 0
        chunk = [rows[i] for i in order[cursor:cursor + config.batch_size]]
        cursor += config.batch_size
        batch = encode_prompts(tokenizer, [t for t, _ in chunk], config.prompt, max_length)
        pred = predict(model, batch, ids, config.level_weights, config.temperature)
        loss = quality_loss(pred, torch.tensor([m for _, m in chunk], dtype=torch.float32), config.rank_weight)
        if not torch.isfinite(loss):
            raise RuntimeError(f"aigv: the loss became {loss.item()} at step {step}.")
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": float(loss.item())})
        if progress and (step + 1) % max(1, config.steps // 10) == 0:
            print(f"  aigv step {step + 1}/{config.steps}: loss {loss.item():.4f}", flush=True)
    model.eval()
    return history


def _plot(before, after, mos, history, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .._io import atomic_savefig

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, scores, title in ((axes[0], before, "before"), (axes[1], after, "after LoRA")):
        c = correlations(scores, mos)
        ax.scatter(mos, scores, s=6)
        ax.set_xlabel("MOS (human mean rating)")
        ax.set_ylabel("level-word score")
        ax.set_title(f"{title}: SRCC {c['srcc']:.3f}, PLCC {c['plcc']:.3f}", fontsize=9)
    if history:
        axes[2].plot([h["step"] for h in history], [h["loss"] for h in history])
    axes[2].set_xlabel("step")
    axes[2].set_title("PLCC + 0.3 rank loss", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def train_aigv_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for level-word quality regression (``trainer: {name: aigv, args: {...AIGVConfig...}}``):
    scores the test items before training, trains LoRA with the official loss, scores them again; writes
    ``adapter/``, ``metrics.json`` (SRCC / PLCC before and after) and ``results.png``, each atomically. With ``resume``
    a whole ``adapter/`` is loaded instead of retrained, and the before-scores are read from ``progress.json``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from .._io import adapter_folder_is_whole, atomic_write_json
    from ..recipe import to_dict
    from ..runner.reporting import device_name
    from ..runner import load_tokenizer_and_model, save_adapter

    check_recipe(recipe)
    config = aigv_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, base = load_tokenizer_and_model(recipe)
    base.eval()
    rows = rated_rows(recipe, config)
    mos = [m for _, m in rows["test"]]
    max_length = recipe.data.max_length
    progress_path = out / PROGRESS_FILE
    progress = json.loads(progress_path.read_text()) if resume and progress_path.is_file() else {}
    if "before" in progress and len(progress["before"]) == len(mos):
        before = progress["before"]
    else:
        before = score_rows(base, tokenizer, rows["test"], config, max_length)
        atomic_write_json(progress_path, {"before": before})
    folder = out / "adapter"
    history = progress.get("history", [])
    trained = False
    if resume and adapter_folder_is_whole(folder):
        model = PeftModel.from_pretrained(base, folder)
    else:
        kwargs = dict(recipe.method.config)
        kwargs.pop("task_type", None)
        torch.manual_seed(recipe.seed)
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **kwargs))
        if config.lora_a_init == "normal":
            init_lora_a_normal(model, recipe.seed)
        history = train_quality(model, tokenizer, rows["train"], config, max_length, recipe.seed, progress=not quiet)
        save_adapter(model, tokenizer, folder)
        atomic_write_json(progress_path, {"before": before, "history": history})
        trained = True
    after = score_rows(model, tokenizer, rows["test"], config, max_length)
    metrics = {
        "name": recipe.name,
        "trainer": "aigv",
        "method": recipe.method.name,
        "seed": recipe.seed,
        "paper": PAPER,
        "official_code": CODE,
        "aigv": asdict(config),
        "level_token_ids": level_token_ids(tokenizer, config.level_words),
        "items": {"train": len(rows["train"]), "test": len(rows["test"])},
        "before": correlations(before, mos),
        "after": correlations(after, mos),
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "trained_this_run": trained,
        "budget": {"steps": config.steps, "batch_size": config.batch_size, "wall_time_s": time.time() - began},
        "device": device_name(),
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot:
        _plot(before, after, mos, history, out / "results.png")
    if not quiet:
        b, a = metrics["before"], metrics["after"]
        print(f"aigv — {recipe.name}: SRCC {b['srcc']:.3f} -> {a['srcc']:.3f}, PLCC {b['plcc']:.3f} -> "
              f"{a['plcc']:.3f} on {len(mos)} held-out items")
        print(f"adapter: {folder}  metrics: {out / 'metrics.json'}")
    return metrics


RECIPE = dict(config=AIGVConfig, entry=train_aigv_recipe, data=DATA_NAMES, tasks=("causal_lm",), models=())
