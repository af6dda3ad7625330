"""What the per-modality LoRA recipes share (RegionBLIP, https://arxiv.org/abs/2308.02299, code
https://github.com/mightyzau/RegionBLIP; Arcana, https://arxiv.org/abs/2410.13733, no public code): a tiny LLaVA-like
model, its word-level vocabulary, offline data made from scikit-learn's bundled digits, the text pre-training of the
language model, the training loop over a mixture of tasks with per-call route inputs, accuracy, per-branch gradient
norms and the merge refusal.

The model (:class:`TinyLlava`): modality encoders are stubs, a projector per modality (``<name>_projector``, trained
fully as ``modules_to_save``) maps raw features into the hidden size of a small ``transformers.LlamaForCausalLM`` built
from a config; the projected tokens are prepended to the text embeddings (LLaVA's layout). Modalities:

* ``image``: an 8×8 digit as four 4×4 patches (4 tokens of 16 numbers);
* ``pointcloud``: the digit's ink pixels as a set of (x, y, intensity) points (``points`` tokens of 3 numbers,
  sampled with replacement), a second encoder of the same object;
* text-only: the counting task below (no prefix).

Tasks (word-level vocabulary, answers are single words): captioning ``what is this ? it is <digit word>`` after a
modality prefix; counting ``count : w w+1 w+2 <w+3>`` in number words (what the language model is pre-trained on, so
"language ability" exists and its retention can be measured). Accuracy is the argmax at the answer position.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._common import index_batches

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
VOCAB = ["<pad>", "<bos>", "what", "is", "this", "?", "it", "count", ":"] + NUMBER_WORDS
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
CAPTION_PROMPT = ["<bos>", "what", "is", "this", "?", "it", "is"]
COUNT_LENGTH = 4  # numbers per counting example; the last one is the answer
MODALITY_DIMS = {"image": 16, "pointcloud": 3}
LM_FILE = "lm.safetensors"


@dataclass
class ModalityConfig:
    """Settings shared by the per-modality LoRA recipes: the tiny LLaVA-like model, the data, the text pre-training
    of its language model and the LoRA training (RegionBLIP https://arxiv.org/abs/2308.02299, Arcana
    https://arxiv.org/abs/2410.13733)."""

    hidden_size: int = field(default=64, metadata={"help": "Width of the tiny Llama (LlamaConfig.hidden_size)."})
    num_layers: int = field(default=2, metadata={"help": "Decoder layers of the tiny Llama."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads (key/value heads: half of them)."})
    intermediate_size: int = field(default=128, metadata={"help": "MLP width of the tiny Llama."})
    points: int = field(default=16, metadata={"help": "Points per digit in the pointcloud modality."})
    pretrain_steps: int = field(
        default=300, metadata={"help": "Full training steps of the language model on counting (0: random LM)."})
    pretrain_lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the text pre-training."})
    steps: int = field(
        default=200, metadata={"help": "LoRA training steps of each run; a step is one batch of every task."})
    batch_size: int = field(default=32, metadata={"help": "Examples per batch."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the LoRA stage (cosine)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay of the LoRA stage."})
    eval_examples: int = field(default=300, metadata={"help": "Held-out examples per task for accuracy."})

    def __post_init__(self):
        for name, low in (("hidden_size", 8), ("num_layers", 1), ("num_heads", 2), ("intermediate_size", 1),
                          ("points", 1), ("pretrain_steps", 0), ("steps", 1), ("batch_size", 1),
                          ("eval_examples", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{type(self).__name__}.{name} must be an integer >= {low}; got {value!r}.")
        if self.hidden_size % self.num_heads or self.num_heads % 2:
            raise ValueError(f"{type(self).__name__}.num_heads must be even and divide hidden_size; got "
                             f"{self.num_heads} for hidden_size {self.hidden_size}.")
        for name in ("pretrain_lr", "learning_rate", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a finite number >= 0; got {value!r}.")


# ---------------------------------------------------------------------------------------------------------- data
def digits(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits in [0, 1], split 80/20 by a seeded permutation (shared with the LoRAT recipe)."""
    from .lorat import digits as _digits

    return _digits(split, seed)


def image_features(images: np.ndarray) -> torch.Tensor:
    """``[n, 4, 16]``: each 8×8 digit as its four 4×4 patches (row-major), flattened."""
    x = torch.from_numpy(images).reshape(-1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4)
    return x.reshape(len(images), 4, 16)


def pointcloud_features(images: np.ndarray, points: int, seed: int) -> torch.Tensor:
    """``[n, points, 3]``: each digit's ink pixels (intensity > 0.25) as (x/7, y/7, intensity), sampled with
    replacement (seeded), a set encoding of the same digits."""
    rng = np.random.default_rng([seed, 21, len(images)])
    out = np.zeros((len(images), points, 3), np.float32)
    for i, image in enumerate(images):
        ys, xs = np.nonzero(image > 0.25)
        if len(xs) == 0:
            ys, xs = np.nonzero(image >= image.max())
        pick = rng.integers(len(xs), size=points)
        out[i] = np.stack([xs[pick] / 7.0, ys[pick] / 7.0, image[ys[pick], xs[pick]]], -1)
    return torch.from_numpy(out)


def caption_data(modality: str, split: str, n: int, points: int, seed: int) -> dict:
    """``n`` captioning examples of ``modality`` from the ``split`` digits: features, prompt ids, answer ids."""
    images, labels = digits(split, seed)
    idx = np.random.default_rng([seed, 22, 0 if split == "train" else 1, n]).integers(len(labels), size=n)
    images, labels = images[idx], labels[idx]
    features = image_features(images) if modality == "image" else pointcloud_features(images, points, seed)
    ids = torch.tensor([WORD_ID[w] for w in CAPTION_PROMPT]).repeat(n, 1)
    answer = torch.tensor([WORD_ID[NUMBER_WORDS[int(y)]] for y in labels])
    return {"modality": modality, "features": features, "input_ids": ids, "answer": answer}


def count_data(split: str, n: int, seed: int) -> dict:
    """``n`` counting examples ``<bos> count : w w+1 w+2`` → ``w+3`` (start drawn uniformly; the splits are
    independent draws of the same fixed task: what is measured is whether the model keeps the skill)."""
    rng = np.random.default_rng([seed, 23, 0 if split == "train" else 1, n])
    starts = rng.integers(0, len(NUMBER_WORDS) - COUNT_LENGTH + 1, size=n)
    words = [[WORD_ID[NUMBER_WORDS[s + j]] for j in range(COUNT_LENGTH)] for s in starts]
    head = [WORD_ID["<bos>"], WORD_ID["count"], WORD_ID[":"]]
    ids = torch.tensor([head + w[:-1] for w in words])
    return {"modality": "text", "features": None, "input_ids": ids, "answer": torch.tensor([w[-1] for w in words])}


def subset(data: dict, idx) -> dict:
    """Rows ``idx`` of a task's data."""
    return {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in data.items()}


# ---------------------------------------------------------------------------------------------------------- model
class TinyLlava(nn.Module):
    """A LLaVA-like model: a projector per modality (``<name>_projector``: Linear-GELU-Linear) prepends projected
    feature tokens to the text embeddings of a small ``LlamaForCausalLM`` (``lm``). ``forward`` returns the logits of
    every position ``[batch, prefix + text, vocab]``; per-call route inputs go to the ``PeftModel`` around it."""

    def __init__(self, config: ModalityConfig, modalities=("image", "pointcloud")):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        lm_config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=config.hidden_size,
                                intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                                num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads // 2,
                                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=0)
        self.lm = LlamaForCausalLM(lm_config)
        self.modalities = tuple(modalities)
        for name in self.modalities:
            setattr(self, f"{name}_projector", nn.Sequential(
                nn.Linear(MODALITY_DIMS[name], config.hidden_size), nn.GELU(),
                nn.Linear(config.hidden_size, config.hidden_size)))

    def forward(self, input_ids: torch.Tensor, features: Optional[torch.Tensor] = None,
                feature_modality: Optional[str] = None) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(input_ids)
        if features is not None:
            if feature_modality not in self.modalities:
                raise ValueError(f"TinyLlava: feature_modality must be one of {list(self.modalities)}; got "
                                 f"{feature_modality!r}.")
            prefix = getattr(self, f"{feature_modality}_projector")(features)
            embeds = torch.cat([prefix.to(embeds.dtype), embeds], 1)
        return self.lm(inputs_embeds=embeds).logits


def build_model(config: ModalityConfig, seed: int, lm_state: Optional[dict] = None, modalities=None) -> TinyLlava:
    """The seeded tiny LLaVA-like model, with the pre-trained language model's weights when given."""
    torch.manual_seed(seed)
    model = TinyLlava(config, modalities or ("image", "pointcloud"))
    if lm_state is not None:
        model.lm.load_state_dict(lm_state)
    return model.eval()


def prefix_length(data: dict) -> int:
    return 0 if data["features"] is None else data["features"].shape[1]


def answer_logits(model, data: dict, **route) -> torch.Tensor:
    """Logits at the answer position (the last input position) ``[batch, vocab]``."""
    kwargs = {} if data["features"] is None else {"features": data["features"],
                                                  "feature_modality": data["modality"]}
    return model(input_ids=data["input_ids"], **kwargs, **route)[:, -1]


def accuracy(model, data: dict, route_fn: Callable[[dict], dict], batch_size: int = 100) -> float:
    """Share of examples whose argmax at the answer position is the answer (no gradient)."""
    hits = 0
    with torch.no_grad():
        for i in range(0, len(data["answer"]), batch_size):
            part = subset(data, slice(i, i + batch_size))
            hits += (answer_logits(model, part, **route_fn(part)).argmax(-1) == part["answer"]).sum().item()
    return hits / len(data["answer"])


def token_modality(data: dict) -> torch.Tensor:
    """Bool mask ``[batch, prefix + text]``: True on the modality prefix tokens (MM-LoRA's vision tokens)."""
    n, t = data["input_ids"].shape
    k = prefix_length(data)
    return torch.cat([torch.ones(n, k, dtype=torch.bool), torch.zeros(n, t, dtype=torch.bool)], 1)


def pretrain_lm(config: ModalityConfig, seed: int, quiet: bool = True) -> tuple[dict, dict]:
    """Stage ``pretrain``: full training of the tiny Llama on counting (next-token loss on the number words), the
    stand-in for a pre-trained LLM (OPT / FlanT5 / Vicuna). Returns its state and the stage's numbers."""
    model = build_model(config, seed)
    if config.pretrain_steps == 0:
        return {k: v.clone() for k, v in model.lm.state_dict().items()}, {"steps": 0}
    train = count_data("train", max(1000, config.batch_size), seed)
    full = torch.cat([train["input_ids"], train["answer"][:, None]], 1)
    optimizer = torch.optim.AdamW(model.lm.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    model.train()
    began, losses = time.time(), []
    for idx in index_batches(len(full), config.batch_size, config.pretrain_steps, seed):
        logits = model.lm(input_ids=full[idx]).logits
        loss = F.cross_entropy(logits[:, 2:-1].reshape(-1, logits.shape[-1]), full[idx][:, 3:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    test = count_data("test", config.eval_examples, seed)
    acc = accuracy(model, test, lambda _: {})
    if not quiet:
        print(f"pretrain (counting): loss {np.mean(losses[-20:]):.3f}, accuracy {acc:.3f}", flush=True)
    return ({k: v.detach().clone() for k, v in model.lm.state_dict().items()},
            {"steps": config.pretrain_steps, "final_loss": float(np.mean(losses[-20:])), "count_accuracy": acc,
             "time_s": time.time() - began})


def train_mixture(model, tasks: list[dict], route_fn: Callable[[dict], dict], config: ModalityConfig, seed: int,
                  label: str = "", quiet: bool = True) -> dict:
    """LoRA stage: every step takes one batch of each task in turn (alternating batches, RegionBLIP's regime) and
    one optimizer step per batch, on the cross-entropy at the answer position; ``route_fn(batch)`` gives the batch's
    per-call route inputs (``route_ids=`` / ``modality=``). Returns the loss history's summary."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    total = config.steps * len(tasks)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total)
                                                                                           / total)))
    iters = [index_batches(len(t["answer"]), config.batch_size, config.steps, seed + i) for i, t in enumerate(tasks)]
    model.train()
    began, losses = time.time(), {t["modality"]: [] for t in tasks}
    for step in range(config.steps):
        for task, it in zip(tasks, iters):
            batch = subset(task, next(it))
            loss = F.cross_entropy(answer_logits(model, batch, **route_fn(batch)), batch["answer"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses[task["modality"]].append(loss.item())
        if not quiet and (step + 1) % 50 == 0:
            print(f"{label} step {step + 1}/{config.steps}: " + ", ".join(
                f"{m} {np.mean(v[-50:]):.3f}" for m, v in losses.items()), flush=True)
    model.eval()
    return {"final_loss": {m: float(np.mean(v[-20:])) for m, v in losses.items()}, "time_s": time.time() - began,
            "trainable_parameters": sum(p.numel() for p in params)}


def branch_grad_norms(model, adapter: str = "default") -> dict:
    """L2 norm of the gradient of each gated LoRA branch (down and up columns of that branch, over every layer)."""
    from ..tuners.gated_lora import GatedLoraLayer

    totals: dict = {}
    for layer in model.modules():
        if not isinstance(layer, GatedLoraLayer) or adapter not in layer.branches:
            continue
        down, up = layer.gated_lora_down[adapter].weight, layer.gated_lora_up[adapter].weight
        for b, name in enumerate(layer.branches[adapter]):
            cols = layer._slice(adapter, b)
            sq = sum(float(g.pow(2).sum()) for g in (
                None if down.grad is None else down.grad[cols], None if up.grad is None else up.grad[:, cols])
                if g is not None)
            totals[name] = totals.get(name, 0.0) + sq
    return {name: math.sqrt(v) for name, v in totals.items()}


def merge_refusal(model) -> str:
    """The error message of ``merge_and_unload()`` on a gated model without ``default_route`` (merging is disabled,
    as in RegionBLIP's ``lora_modals.Linear``); raises AssertionError if the merge went through."""
    import copy

    try:
        copy.deepcopy(model).merge_and_unload()
    except ValueError as exc:
        return str(exc)
    raise AssertionError("merge_and_unload() merged a per-modality gated LoRA; merging must be refused.")


def check_no_default_route(recipe, trainer: str) -> None:
    """The shared ``check_recipe`` part: ``method.name: gated_lora`` with ``default_route`` null, because the routes
    come with every call and merging is disabled (a default route would make the adapter mergeable)."""
    if recipe.method.name != "gated_lora":
        raise ValueError(f"trainer {trainer!r} needs method.name 'gated_lora' (per-modality LoRA); got "
                         f"{recipe.method.name!r}.")
    if recipe.method.config.get("default_route") is not None:
        raise ValueError(f"method.config.default_route must be null for trainer {trainer!r}: every call names its "
                         "modality and merging stays disabled, as in the official per-modality LoRA; got "
                         f"{recipe.method.config['default_route']!r}.")
    if recipe.model.quantization is not None:
        raise ValueError(f"trainer {trainer!r}: model.quantization must be null (the tiny model is built in fp32).")
    targets = recipe.method.config.get("target_modules")
    allowed = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if not isinstance(targets, list) or not targets or any(t not in allowed for t in targets):
        raise ValueError(f"method.config.target_modules must be a non-empty list from {allowed} (the tiny Llama's "
                         f"linears); got {targets!r}.")


def gated_config(recipe, **changes):
    """``GatedLoraConfig`` of ``method.config`` (with ``changes``), projectors trained fully (``modules_to_save``)."""
    from ..tuners.gated_lora import GatedLoraConfig

    kwargs = dict(recipe.method.config)
    kwargs.pop("task_type", None)
    kwargs.update(changes)
    kwargs.setdefault("modules_to_save", ["image_projector", "pointcloud_projector"])
    return GatedLoraConfig(**kwargs)


def load_lm_state(out: Path, config: ModalityConfig, seed: int, resume: bool, quiet: bool) -> tuple[dict, dict]:
    """The pre-trained language model: loaded from ``<out>/pretrained`` when ``resume`` finds it whole, else trained
    and written atomically."""
    import json

    from safetensors.torch import load_file, save

    from .._io import atomic_write, atomic_write_json, safetensors_is_whole

    path, stats_path = out / "pretrained" / LM_FILE, out / "pretrained" / "stats.json"
    if resume and safetensors_is_whole(path) and stats_path.is_file():
        return load_file(path), json.loads(stats_path.read_text(encoding="utf-8"))
    state, stats = pretrain_lm(config, seed, quiet)
    payload = save({k: v.contiguous() for k, v in state.items()})
    atomic_write(path, lambda f: f.write(payload), binary=True)
    atomic_write_json(stats_path, stats)
    return state, stats


def run_variant(out: Path, name: str, recipe, config: ModalityConfig, lm_state: dict, peft_config, tasks: list[dict],
                route_fn, resume: bool, quiet: bool):
    """Train (or, with ``resume``, load) one LoRA variant; saves ``<out>/<name>/adapter`` and ``run.json``.
    Returns ``(model, run stats)``."""
    import json

    from peft import PeftModel, get_peft_model

    from .._io import adapter_folder_is_whole, atomic_write_json
    from ..trainers.continual import _save_adapter

    folder = out / name
    base = build_model(config, recipe.seed, lm_state)
    if resume and adapter_folder_is_whole(folder / "adapter") and (folder / "run.json").is_file():
        return (PeftModel.from_pretrained(base, folder / "adapter").eval(),
                json.loads((folder / "run.json").read_text(encoding="utf-8")))
    torch.manual_seed(recipe.seed)
    model = get_peft_model(base, peft_config)
    stats = train_mixture(model, tasks, route_fn, config, recipe.seed, label=f"{recipe.trainer.name} {name}",
                          quiet=quiet)
    _save_adapter(model, folder / "adapter")
    atomic_write_json(folder / "run.json", stats)
    return model.eval(), stats


def load_variant(folder, config: ModalityConfig, seed: int):
    """A saved variant (``<output_dir>/<variant>``) on the pre-trained LM of ``<output_dir>/pretrained``."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    base = build_model(config, seed, load_file(folder.parent / "pretrained" / LM_FILE))
    return PeftModel.from_pretrained(base, folder / "adapter").eval()


def plot_accuracy(results: dict, title: str, path: Path) -> None:
    """Grouped bars: accuracy per task for each variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from .._io import atomic_savefig

    variants = list(results)
    tasks = list(results[variants[0]])
    fig, ax = plt.subplots(figsize=(5.5, 3))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ax.bar(np.arange(len(tasks)) + i * width, [results[v][t] for t in tasks], width, label=v)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
