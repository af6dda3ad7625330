"""MoRE as a runnable recipe: *MoRE: Multi-Modal Contrastive Pre-training with Transformers on X-Rays, ECGs, and
Diagnostic Report* (https://arxiv.org/abs/2410.16239; official code https://github.com/svthapa/MoRE, read, not copied).

MoRE aligns a LoRA-adapted text tower (RoBERTa-base-PM-M3 + LoRA r = 16, α = 8, dropout 0.1, ``bias="all"``, PEFT's
default targets) with encoders of other modalities by a symmetric InfoNCE loss, then retrieves across modalities
zero-shot. Official pitfall avoided: its "learnable" temperature is created after the optimizer and never trains;
here ``logit_scale`` lives in :class:`ContrastiveHeads` and is in the optimizer (its start and end values are in
``metrics.json``).

Offline stand-in (no X-rays, ECGs or reports ship offline): the text tower is MiniLM (``peft_ext.data.minilm_path``)
and the second modality is a "signal" vector made from each VADER snippet's metadata: its mean human rating, its
domain (one-hot) and its log length, mixed by a fixed random matrix into ``signal_dim`` numbers plus Gaussian noise
(``signal_noise``), encoded by a small MLP. Retrieval is over the held-out snippets of every domain; recall@k in both
directions, LoRA text tower against the frozen text tower (only the projections, the signal encoder and the
temperature trained).
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
import torch.nn.functional as F
from torch import nn

from ._common import index_batches, plain_lora_config

PAPER = ("MoRE: Multi-Modal Contrastive Pre-training with Transformers on X-Rays, ECGs, and Diagnostic Report "
         "(https://arxiv.org/abs/2410.16239)")
CODE = "https://github.com/svthapa/MoRE"
HEADS_FILE = "heads.safetensors"
SIGNAL_FEATURES = 6  # rating, four domain indicators, log length


@dataclass
class MoREConfig:
    """Settings of the MoRE contrastive recipe (https://arxiv.org/abs/2410.16239): the data, the signal stand-in, the
    shared embedding, the InfoNCE temperature and the training."""

    domains: list = field(
        default_factory=lambda: ["movies", "tweets", "products", "editorials"],
        metadata={"help": "VADER domains whose snippets are the text side (peft_ext.data.load_vader_domain)."})
    max_examples: Optional[int] = field(
        default=400, metadata={"help": "Snippets per domain before the 80/20 split (seeded subset); null = all."})
    signal_dim: int = field(default=16, metadata={"help": "Width of the synthetic signal vector."})
    signal_noise: float = field(
        default=0.3, metadata={"help": "Std of the Gaussian noise added to the signal (>= 0; harder retrieval)."})
    embed_dim: int = field(default=64, metadata={"help": "Width of the shared embedding both towers project to."})
    signal_hidden: int = field(default=128, metadata={"help": "Hidden width of the signal encoder MLP."})
    init_temperature: float = field(
        default=0.07, metadata={"help": "Initial InfoNCE temperature τ (CLIP/MoRE: 0.07); logit_scale = log(1/τ)."})
    max_logit_scale: float = field(
        default=100.0, metadata={"help": "Upper clamp of exp(logit_scale) = 1/τ (CLIP: 100)."})
    learn_temperature: bool = field(
        default=True, metadata={"help": "Train logit_scale (MoRE intends it; its official script never does)."})
    steps: int = field(default=150, metadata={"help": "Optimizer steps of each run (LoRA and frozen)."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per step: the InfoNCE negatives are the batch."})
    learning_rate: float = field(
        default=5e-4, metadata={"help": "AdamW learning rate (cosine); MoRE: 3e-5 for a long full pre-training."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (MoRE: 0.1)."})
    max_length: int = field(default=64, metadata={"help": "Token limit of each snippet."})
    recall_at: list = field(default_factory=lambda: [1, 5, 10], metadata={"help": "k values of recall@k."})
    baseline: bool = field(
        default=True, metadata={"help": "Also train with the text tower frozen (no LoRA), the comparison point."})

    def __post_init__(self):
        for name, low in (("signal_dim", 1), ("embed_dim", 1), ("signal_hidden", 1), ("steps", 1),
                          ("batch_size", 2), ("max_length", 4)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"MoREConfig.{name} must be an integer >= {low}; got {value!r}.")
        if self.max_examples is not None and (isinstance(self.max_examples, bool)
                                              or not isinstance(self.max_examples, int) or self.max_examples < 5):
            raise ValueError(f"MoREConfig.max_examples must be null or an integer >= 5; got {self.max_examples!r}.")
        for name in ("signal_noise", "learning_rate", "weight_decay", "init_temperature", "max_logit_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"MoREConfig.{name} must be a finite number >= 0; got {value!r}.")
        if not self.init_temperature > 0 or not self.learning_rate > 0:
            raise ValueError("MoREConfig.init_temperature and learning_rate must be > 0; got "
                             f"{self.init_temperature!r} and {self.learning_rate!r}.")
        if not 1 / self.init_temperature <= self.max_logit_scale:
            raise ValueError(f"MoREConfig.max_logit_scale ({self.max_logit_scale}) must be >= 1/init_temperature "
                             f"({1 / self.init_temperature:.3g}).")
        if not isinstance(self.recall_at, (list, tuple)) or not self.recall_at or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.recall_at):
            raise ValueError(f"MoREConfig.recall_at must be a non-empty list of integers >= 1; got {self.recall_at!r}.")
        from ..trainers.continual import check_domains

        check_domains("MoREConfig.domains", self.domains, "movie_reviews")
        self.domains, self.recall_at = list(self.domains), sorted(set(self.recall_at))


# ---------------------------------------------------------------------------------------------------------- data
def load_pairs(config: MoREConfig, seed: int = 0, max_train: Optional[int] = None,
               max_eval: Optional[int] = None) -> dict:
    """``{"train": {"text": [...], "signal": Tensor[n, signal_dim], "clean_signal": ..., "rating": Tensor[n]},
    "test": ...}``: the VADER snippets of ``domains`` with their synthetic signals (rating, domain one-hot, log length
    → fixed random mixing matrix = ``clean_signal``, + noise = ``signal``). ``max_train`` / ``max_eval`` cut each
    domain's split."""
    from ..data import load_vader_domain

    rng = np.random.default_rng([seed, 11])
    mixing = rng.standard_normal((SIGNAL_FEATURES, config.signal_dim)).astype(np.float32) / math.sqrt(SIGNAL_FEATURES)
    out = {}
    for split, cut in (("train", max_train), ("test", max_eval)):
        texts, feats = [], []
        for d, domain in enumerate(config.domains):
            data = load_vader_domain(domain, seed=seed, max_examples=config.max_examples)[split]
            rows = list(zip(data["text"], data["rating"]))[:cut]
            for text, rating in rows:
                onehot = [1.0 if i == ["movies", "tweets", "products", "editorials"].index(domain) else 0.0
                          for i in range(4)]
                feats.append([float(rating) / 4.0, *onehot, math.log1p(len(text.split())) / 3.0])
                texts.append(text)
        feats = np.asarray(feats, np.float32)
        noise = np.random.default_rng([seed, 12, 0 if split == "train" else 1]).standard_normal(
            (len(texts), config.signal_dim)).astype(np.float32)
        clean = feats @ mixing
        out[split] = {"text": texts, "signal": torch.from_numpy(clean + config.signal_noise * noise),
                      "clean_signal": torch.from_numpy(clean), "rating": torch.from_numpy(feats[:, 0] * 4)}
    return out


def oracle_recall(data: dict, ks: list[int]) -> dict:
    """The ceiling of any text tower: recall@k when each text is represented by its exact noise-free signal (its
    rating, domain and length, i.e. perfect reading) and matched to the noisy signals by Euclidean distance. The
    signal holds a few numbers per snippet, so many snippets share nearly the same one: the ceiling is far below 1."""
    sim = -torch.cdist(data["clean_signal"], data["signal"])
    out = {}
    for name, s in (("text_to_signal", sim), ("signal_to_text", sim.T)):
        rank = (s > s.diagonal().unsqueeze(1)).sum(1)
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return out


# ---------------------------------------------------------------------------------------------------------- model
class ContrastiveHeads(nn.Module):
    """Everything MoRE trains besides the text tower's adapter: the text projection, the signal encoder and the
    InfoNCE ``logit_scale`` (a parameter created with the module, hence before any optimizer)."""

    def __init__(self, text_width: int, config: MoREConfig):
        super().__init__()
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.signal_encoder = nn.Sequential(nn.Linear(config.signal_dim, config.signal_hidden), nn.GELU(),
                                            nn.Linear(config.signal_hidden, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)),
                                        requires_grad=config.learn_temperature)
        self.max_logit_scale = config.max_logit_scale

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at ``max_logit_scale`` (1/τ)."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows: ``(CE(s·âb̂ᵀ, I) + CE(s·b̂âᵀ, I)) / 2`` with L2-normalised rows."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = scale * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def text_tower(recipe):
    """Tokenizer and text encoder: MiniLM (``model.name: minilm``) or a tiny random BERT (``tiny-bert``), eval mode."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    from ..data import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(recipe.seed)
    if recipe.model.name == "tiny-bert":
        model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4), add_pooling_layer=False)
    else:
        folder = minilm_path() if recipe.model.name == "minilm" else recipe.model.name
        model = AutoModel.from_pretrained(folder, dtype=torch.float32, add_pooling_layer=False)
    return tokenizer, model.eval()


def embed_text(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled last hidden states over the non-padding tokens (sentence-transformers' MiniLM pooling)."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def recall_at_k(a: torch.Tensor, b: torch.Tensor, ks: list[int]) -> dict:
    """Recall@k of retrieving row i of ``b`` from row i of ``a`` (cosine similarity), both directions."""
    sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    out = {}
    for name, s in (("text_to_signal", sim), ("signal_to_text", sim.T)):
        rank = (s > s.diagonal().unsqueeze(1)).sum(1)  # how many candidates beat the true match
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return out


# ---------------------------------------------------------------------------------------------------------- recipe glue
def more_config_from_recipe(recipe) -> MoREConfig:
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, MoREConfig)


def check_recipe(recipe) -> None:
    """What ``trainer: more`` needs besides its ``trainer.args``: plain LoRA on the text tower (MiniLM or tiny-bert)."""
    if recipe.method.name != "lora":
        raise ValueError(f"trainer 'more' needs method.name 'lora' (MoRE's text tower is PEFT LoRA); got "
                         f"{recipe.method.name!r}.")
    if recipe.model.name not in ("minilm", "tiny-bert") and not Path(recipe.model.name).is_dir():
        raise ValueError(f"trainer 'more' needs model.name 'minilm', 'tiny-bert' or a local BERT-like folder; got "
                         f"{recipe.model.name!r}.")
    if recipe.model.quantization is not None:
        raise ValueError("trainer 'more': model.quantization must be null.")
    more_config_from_recipe(recipe)


def train_contrastive(text_model, tokenizer, heads: ContrastiveHeads, data: dict, config: MoREConfig, seed: int,
                      frozen: bool, label: str = "lora", quiet: bool = True) -> dict:
    """Symmetric InfoNCE training of ``heads`` (and of the text tower's trainable parameters unless ``frozen``: then
    the text features are computed once without gradient). The optimizer is built after ``heads`` exists, so it holds
    ``logit_scale``. Returns the loss history and the temperature before and after."""
    texts, signal = data["text"], data["signal"]
    params = [p for p in heads.parameters() if p.requires_grad]
    if frozen:
        with torch.no_grad():
            feats = torch.cat([embed_text(text_model, tokenizer, texts[i:i + 64], config.max_length)
                               for i in range(0, len(texts), 64)])
    else:
        params += [p for p in text_model.parameters() if p.requires_grad]
        text_model.train()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    tau0 = 1 / heads.scale().item()
    began, losses = time.time(), []
    heads.train()
    for step, idx in enumerate(index_batches(len(texts), min(config.batch_size, len(texts)), config.steps, seed)):
        t = feats[idx] if frozen else embed_text(text_model, tokenizer, [texts[i] for i in idx], config.max_length)
        loss = info_nce(heads.text_proj(t), heads.signal_encoder(signal[idx]), heads.scale())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if not quiet and (step + 1) % 25 == 0:
            print(f"more {label} step {step + 1}/{config.steps}: InfoNCE {np.mean(losses[-25:]):.3f}, "
                  f"τ {1 / heads.scale().item():.4f}", flush=True)
    text_model.eval()
    heads.eval()
    return {"final_loss": float(np.mean(losses[-10:])), "first_loss": losses[0], "temperature_start": tau0,
            "temperature_end": 1 / heads.scale().item(), "time_s": time.time() - began,
            "trainable_parameters": sum(p.numel() for p in params)}


def embed_pairs(text_model, tokenizer, heads: ContrastiveHeads, data: dict, max_length: int):
    """(text embeddings, signal embeddings) of ``data`` in the shared space, no gradient."""
    with torch.no_grad():
        t = torch.cat([heads.text_proj(embed_text(text_model, tokenizer, data["text"][i:i + 64], max_length))
                       for i in range(0, len(data["text"]), 64)])
        return t, heads.signal_encoder(data["signal"])


def load_more(folder, recipe):
    """A trained MoRE run from ``folder`` (``<output_dir>/lora``): ``(tokenizer, text tower PeftModel, heads)``."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    config = more_config_from_recipe(recipe)
    tokenizer, base = text_tower(recipe)
    model = PeftModel.from_pretrained(base, folder / "text_adapter").eval()
    heads = ContrastiveHeads(base.config.hidden_size, config)
    heads.load_state_dict(load_file(folder / HEADS_FILE))
    return tokenizer, model, heads.eval()


def _save_heads(heads: ContrastiveHeads, path: Path) -> None:
    from safetensors.torch import save

    from .._io import atomic_write

    payload = save({k: v.detach().contiguous() for k, v in heads.state_dict().items()})
    atomic_write(path, lambda f: f.write(payload), binary=True)


def _plot(results: dict, ks: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from .._io import atomic_savefig

    fig, axes = plt.subplots(1, 2, figsize=(7, 3), sharey=True)
    for ax, direction in zip(axes, ("text_to_signal", "signal_to_text")):
        for name, r in results.items():
            ax.plot(ks, [r[f"{direction}_R@{k}"] for k in ks], marker="o", label=name)
        ax.set_title(direction.replace("_", " "), fontsize=9)
        ax.set_xlabel("k")
    axes[0].set_ylabel("recall@k")
    axes[0].legend(fontsize=8)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def train_more_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for MoRE (https://arxiv.org/abs/2410.16239), ``trainer: {name: more, args: {...}}``.

    Runs ``lora`` (LoRA text tower) and, with ``baseline``, ``frozen`` (frozen text tower); writes
    ``lora/text_adapter``, ``<run>/heads.safetensors``, ``<run>/run.json``, ``metrics.json`` and ``results.png``,
    each atomically. With ``resume`` a run whose files are whole is loaded, not retrained."""
    from peft import get_peft_model
    from safetensors.torch import load_file

    from .._io import adapter_folder_is_whole, atomic_write_json, safetensors_is_whole
    from ..recipe import to_dict
    from ..trainers.continual import _save_adapter

    check_recipe(recipe)
    config = more_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_pairs(config, recipe.data.seed, recipe.data.max_train, recipe.data.max_eval)
    results, runs = {}, {}
    chance = {f"R@{k}": min(1.0, k / len(data["test"]["text"])) for k in config.recall_at}
    for run in ("lora", "frozen") if config.baseline else ("lora",):
        folder = out / run
        tokenizer, base = text_tower(recipe)
        torch.manual_seed(recipe.seed + 1)
        heads = ContrastiveHeads(base.config.hidden_size, config)
        model = base
        whole = safetensors_is_whole(folder / HEADS_FILE) and (folder / "run.json").is_file() and (
            run == "frozen" or adapter_folder_is_whole(folder / "text_adapter"))
        if resume and whole:
            if run == "lora":
                tokenizer, model, heads = load_more(folder, recipe)
            else:
                heads.load_state_dict(load_file(folder / HEADS_FILE))
            runs[run] = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        else:
            if run == "lora":
                torch.manual_seed(recipe.seed)
                model = get_peft_model(base, plain_lora_config(recipe))
            else:
                for p in base.parameters():
                    p.requires_grad_(False)
            runs[run] = train_contrastive(model, tokenizer, heads, data["train"], config, recipe.seed,
                                          frozen=run == "frozen", label=run, quiet=quiet)
            if run == "lora":
                _save_adapter(model, folder / "text_adapter")
            _save_heads(heads, folder / HEADS_FILE)
            atomic_write_json(folder / "run.json", runs[run])
        t, s = embed_pairs(model, tokenizer, heads, data["test"], config.max_length)
        results[run] = recall_at_k(t, s, config.recall_at)
    metrics = {
        "name": recipe.name, "trainer": "more", "paper": PAPER, "official_code": CODE, "seed": recipe.seed,
        "more": asdict(config), "lora_config": dict(recipe.method.config), "model": recipe.model.name,
        "sizes": {"train": len(data["train"]["text"]), "test": len(data["test"]["text"])},
        "retrieval": results, "chance": chance, "oracle": oracle_recall(data["test"], config.recall_at), "runs": runs,
        "budget": {"wall_time_s": time.time() - began, "threads": torch.get_num_threads()},
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics, allow_nan=False)
    if recipe.evaluation.plot:
        _plot(results, config.recall_at, out / "results.png")
    if not quiet:
        for name, r in results.items():
            print(f"more — {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()) +
                  f"; τ {runs[name]['temperature_start']:.4f} → {runs[name]['temperature_end']:.4f}")
        print("more — oracle (exact rating/domain/length for each text): " + ", ".join(
            f"{k} {v:.3f}" for k, v in metrics["oracle"].items()))
        print(f"metrics: {out / 'metrics.json'}")
    return metrics


RECIPE = dict(config=MoREConfig, entry=train_more_recipe, data=("movie_reviews",), tasks=("retrieval",),
              models=())
