"""LoRAT as a runnable recipe: *Tracking Meets LoRA: Faster Training, Larger Model, Stronger Performance*
(https://arxiv.org/abs/2403.05231; official code https://github.com/LitingLin/LoRAT, read, not copied).

LoRAT feeds a template crop and a search crop through one ViT as a single token sequence: both share one spatial
positional embedding table (the template takes the top-left sub-grid of the search grid) and a learned token-type
embedding tells template-foreground, template-background and search tokens apart; an MLP head on the search tokens
predicts the target box. The backbone is frozen and adapted with LoRA (r = 64, α = 64, dropout 0); the type embedding
and the head are trained fully (``modules_to_save``). Because LoRA merges into the weights, the deployed tracker runs
at the base ViT's speed.

Offline stand-in (no DINOv2 weights or tracking videos ship offline):

* backbone: a tiny ``transformers.ViTModel`` built from a ``ViTConfig`` and "pre-trained" here by full training on
  dense digit recognition (stage ``pretrain``; a stand-in for DINOv2), then frozen;
* tracking pairs: scikit-learn's bundled 8×8 digits (``sklearn.datasets.load_digits``): the template is the target
  digit centred in a noisy ``template_size``² crop; the search image is a noisy ``search_size``² canvas with the same
  digit rescaled and pasted at a random place plus ``distractors`` digits of other classes; the task is the target's
  box in the search image;
* head: every search token predicts a score and a box (distances from its cell centre); the box is the
  score-softmax-weighted mean; loss ``l1_weight``·L1 + ``giou_weight``·(1 − GIoU) on normalised (x0, y0, x1, y1)
  (LoRAT/OSTrack weights 5 and 2; their centre-score focal loss is not used: the soft-argmax head needs none).

Stages (resumable: a finished stage is not redone): ``pretrain`` → ``lora`` (LoRA tracker) → ``frozen`` (the same
tracker with only the type embedding and head trained, ``baseline``). Measured: mean IoU and success rate
(IoU > 0.5) on held-out digits, the merged-vs-unmerged output difference and inference time.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._common import index_batches, plain_lora_config

PAPER = "Tracking Meets LoRA: Faster Training, Larger Model, Stronger Performance (https://arxiv.org/abs/2403.05231)"
CODE = "https://github.com/LitingLin/LoRAT"
TEMPLATE_BG, TEMPLATE_FG, SEARCH = 0, 1, 2
VIT_FILE = "vit.safetensors"
VIT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


@dataclass
class LoRATConfig:
    """Settings of the LoRAT tracking recipe (https://arxiv.org/abs/2403.05231): the tiny ViT, the digit tracking
    pairs, the pre-training stand-in and the tracking training."""

    template_size: int = field(default=16, metadata={"help": "Template crop side in pixels (LoRAT: 112)."})
    search_size: int = field(default=32, metadata={"help": "Search image side in pixels (LoRAT: 224)."})
    patch_size: int = field(default=4, metadata={"help": "ViT patch side; must divide both sizes (DINOv2: 14)."})
    hidden_size: int = field(default=128, metadata={"help": "ViT width (ViTConfig.hidden_size)."})
    num_layers: int = field(default=4, metadata={"help": "ViT depth (ViTConfig.num_hidden_layers)."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads; must divide hidden_size."})
    intermediate_size: int = field(default=256, metadata={"help": "ViT MLP width."})
    head_hidden: int = field(default=128, metadata={"help": "Hidden width of the MLP box head."})
    noise: float = field(default=0.3, metadata={"help": "Amplitude of the uniform background noise in [0, 1)."})
    distractors: int = field(default=1, metadata={"help": "Digits of other classes pasted into each search image."})
    min_scale: int = field(default=8, metadata={"help": "Smallest side (pixels) of the target in the search image."})
    max_scale: int = field(default=12, metadata={"help": "Largest side (pixels) of the target in the search image."})
    train_pairs: int = field(default=2000, metadata={"help": "Tracking pairs built from the training digits."})
    test_pairs: int = field(default=400, metadata={"help": "Tracking pairs built from the held-out digits."})
    pretrain_steps: int = field(
        default=300, metadata={"help": "Full training steps of the ViT on dense digit recognition (0: random ViT)."})
    pretrain_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the pre-training stage."})
    steps: int = field(default=400, metadata={"help": "Tracking training steps (each run)."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per optimizer step (both stages)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the tracking stage (cosine)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay of the tracking stage."})
    l1_weight: float = field(default=5.0, metadata={"help": "Weight of the L1 box loss (LoRAT/OSTrack: 5)."})
    giou_weight: float = field(default=2.0, metadata={"help": "Weight of the 1 − GIoU box loss (LoRAT/OSTrack: 2)."})
    baseline: bool = field(
        default=True, metadata={"help": "Also train the frozen-backbone tracker (type embedding + head only)."})
    timing_repeats: int = field(
        default=10, metadata={"help": "Timed forwards of the test batch, merged and unmerged (median reported)."})

    def __post_init__(self):
        ints = {"template_size": 4, "search_size": 4, "patch_size": 1, "hidden_size": 4, "num_layers": 1,
                "num_heads": 1, "intermediate_size": 1, "head_hidden": 1, "distractors": 0, "min_scale": 4,
                "max_scale": 4, "train_pairs": 2, "test_pairs": 2, "pretrain_steps": 0, "steps": 1, "batch_size": 1,
                "timing_repeats": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"LoRATConfig.{name} must be an integer >= {low}; got {value!r}.")
        for name in ("pretrain_lr", "learning_rate", "weight_decay", "l1_weight", "giou_weight", "noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LoRATConfig.{name} must be a finite number >= 0; got {value!r}.")
        if self.noise >= 1:
            raise ValueError(f"LoRATConfig.noise must be in [0, 1); got {self.noise!r}.")
        for name in ("template_size", "search_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"LoRATConfig.{name} ({getattr(self, name)}) must be a multiple of patch_size "
                                 f"({self.patch_size}).")
        if self.template_size > self.search_size:
            raise ValueError(f"LoRATConfig.template_size ({self.template_size}) must be <= search_size "
                             f"({self.search_size}): the template shares the search grid's positional embedding.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"LoRATConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size}).")
        if not self.min_scale <= self.max_scale <= min(self.template_size, self.search_size // 2):
            raise ValueError(f"LoRATConfig.min_scale <= max_scale <= min(template_size, search_size / 2) is needed; "
                             f"got {self.min_scale}, {self.max_scale}.")


# ---------------------------------------------------------------------------------------------------------- data
def digits(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits scaled to [0, 1], split 80/20 by a seeded permutation: (images, labels)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    cut = int(0.8 * len(order))
    idx = order[:cut] if split == "train" else order[cut:]
    return (data.images[idx] / 16.0).astype(np.float32), data.target[idx].astype(np.int64)


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(image)[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()


def tracking_pairs(config: LoRATConfig, split: str, n: int, seed: int = 0) -> dict:
    """``n`` (template, search, template fg mask, box) tracking pairs from the ``split`` digits.

    Template: the target digit at its native 8×8 size centred in a noisy ``template_size``² crop. Search: a noisy
    ``search_size``² canvas with the same digit resized to a random side in [min_scale, max_scale] at a random place,
    and ``distractors`` digits of other classes elsewhere (pasted by maximum, so overlaps stay visible). Box: the
    target's (x0, y0, x1, y1) divided by ``search_size``."""
    images, labels = digits(split, seed)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, n])
    T, S, p = config.template_size, config.search_size, config.patch_size
    templates = np.empty((n, 1, T, T), np.float32)
    searches = np.empty((n, 1, S, S), np.float32)
    boxes = np.empty((n, 4), np.float32)
    masks = np.zeros((n, (T // p) ** 2), bool)
    off = (T - 8) // 2
    grid = np.arange(T // p) * p
    covers = (grid + p > off) & (grid < off + 8)  # template patches that overlap the centred digit
    fg_cells = covers[:, None] & covers[None, :]
    for i in range(n):
        k = int(rng.integers(len(labels)))
        template = rng.uniform(0, config.noise, (T, T)).astype(np.float32)
        template[off:off + 8, off:off + 8] = np.maximum(template[off:off + 8, off:off + 8], images[k])
        search = rng.uniform(0, config.noise, (S, S)).astype(np.float32)
        side = int(rng.integers(config.min_scale, config.max_scale + 1))
        x0, y0 = (int(v) for v in rng.integers(0, S - side + 1, size=2))
        others = np.flatnonzero(labels != labels[k])
        for _ in range(config.distractors):
            j = int(rng.choice(others))
            dside = int(rng.integers(config.min_scale, config.max_scale + 1))
            dx, dy = (int(v) for v in rng.integers(0, S - dside + 1, size=2))
            search[dy:dy + dside, dx:dx + dside] = np.maximum(search[dy:dy + dside, dx:dx + dside],
                                                              _resize(images[j], dside))
        search[y0:y0 + side, x0:x0 + side] = np.maximum(search[y0:y0 + side, x0:x0 + side], _resize(images[k], side))
        templates[i, 0], searches[i, 0] = template, search
        boxes[i] = (x0 / S, y0 / S, (x0 + side) / S, (y0 + side) / S)
        masks[i] = fg_cells.reshape(-1)
    return {"template": torch.from_numpy(templates), "search": torch.from_numpy(searches),
            "template_mask": torch.from_numpy(masks), "box": torch.from_numpy(boxes)}


def classification_images(config: LoRATConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-training data (dense digit recognition): each training digit, resized and pasted at a random place of a
    noisy search-sized canvas; the label of every patch is the digit's class where the patch's centre lies inside the
    digit's box and 10 (background) elsewhere: ``(images [n, 1, S, S], labels [n, (S/p)²])``."""
    images, labels = digits("train", seed)
    rng = np.random.default_rng([seed, 7, n])
    S, p = config.search_size, config.patch_size
    centres = np.arange(S // p) * p + p / 2
    out = np.empty((n, 1, S, S), np.float32)
    ys = np.empty((n, (S // p) ** 2), np.int64)
    for i in range(n):
        k = int(rng.integers(len(labels)))
        side = int(rng.integers(config.min_scale, config.max_scale + 1))
        x0, y0 = (int(v) for v in rng.integers(0, S - side + 1, size=2))
        canvas = rng.uniform(0, config.noise, (S, S)).astype(np.float32)
        canvas[y0:y0 + side, x0:x0 + side] = np.maximum(canvas[y0:y0 + side, x0:x0 + side], _resize(images[k], side))
        inside = ((centres[:, None] > y0) & (centres[:, None] < y0 + side)) & \
            ((centres[None, :] > x0) & (centres[None, :] < x0 + side))
        out[i, 0], ys[i] = canvas, np.where(inside, labels[k], 10).reshape(-1)
    return torch.from_numpy(out), torch.from_numpy(ys)


# ---------------------------------------------------------------------------------------------------------- model
def vit_config(config: LoRATConfig):
    """The tiny ViT's ``transformers.ViTConfig`` (grey-scale, search-sized positional grid)."""
    from transformers import ViTConfig

    return ViTConfig(image_size=config.search_size, patch_size=config.patch_size, num_channels=1,
                     hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                     num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size)


class BoxHead(nn.Module):
    """MLP on each search token → a score and four distances (left, top, right, bottom) from the token's cell centre;
    the box is the softmax(score)-weighted mean of the per-token boxes, as normalised (x0, y0, x1, y1)."""

    def __init__(self, hidden: int, head_hidden: int, grid: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, head_hidden)
        self.fc2 = nn.Linear(head_hidden, head_hidden)
        self.out = nn.Linear(head_hidden, 5)
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("centres", torch.stack([cx.reshape(-1), cy.reshape(-1)], -1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.out(F.gelu(self.fc2(F.gelu(self.fc1(tokens)))))
        weights = h[..., 0].softmax(-1)
        dist = torch.sigmoid(h[..., 1:])
        c = self.centres.to(tokens.dtype)
        per_token = torch.cat([c - dist[..., :2], c + dist[..., 2:]], -1)
        return (weights.unsqueeze(-1) * per_token).sum(1)


class LoRATTracker(nn.Module):
    """One-stream tracker: template and search patch tokens in one sequence through a ``transformers`` ViT's layers.

    Both use the ViT's positional table (search: the whole grid; template: its top-left sub-grid: "shared spatial
    positional embedding") plus ``type_embedding`` (template background / template foreground / search); ``head``
    reads the search tokens. LoRA goes on the ViT's linears; ``type_embedding`` and ``head`` are ``modules_to_save``.
    """

    def __init__(self, config: LoRATConfig):
        super().__init__()
        from transformers import ViTModel

        self.template_grid = config.template_size // config.patch_size
        self.search_grid = config.search_size // config.patch_size
        self.vit = ViTModel(vit_config(config), add_pooling_layer=False)
        self.type_embedding = nn.Embedding(3, config.hidden_size)
        nn.init.trunc_normal_(self.type_embedding.weight, std=0.02)
        self.head = BoxHead(config.hidden_size, config.head_hidden, self.search_grid)

    def _patches(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit.embeddings.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Search-sized images through the ViT alone (the pre-training stage): final tokens [B, N, H]."""
        pos = self.vit.embeddings.position_embeddings[:, 1:]
        h = self._patches(pixels) + pos
        for layer in self.vit.layers:
            h = layer(h, None)
        return self.vit.layernorm(h)

    def forward(self, template: torch.Tensor, search: torch.Tensor, template_mask: torch.Tensor) -> torch.Tensor:
        """Boxes ``[B, 4]`` (normalised x0, y0, x1, y1) of the template's object in the search images."""
        p = self.vit.config.patch_size
        if template.shape[-1] != self.template_grid * p or search.shape[-1] != self.search_grid * p:
            raise ValueError(f"LoRATTracker: template and search must be {self.template_grid * p} and "
                             f"{self.search_grid * p} pixels wide; got {template.shape[-1]} and {search.shape[-1]}.")
        pos = self.vit.embeddings.position_embeddings[:, 1:]
        G, g = self.search_grid, self.template_grid
        pos_t = pos.reshape(1, G, G, -1)[:, :g, :g].reshape(1, g * g, -1)
        types = self.type_embedding.weight
        t = self._patches(template) + pos_t + types[template_mask.long()]
        s = self._patches(search) + pos + types[SEARCH]
        h = torch.cat([t, s], 1)
        for layer in self.vit.layers:
            h = layer(h, None)
        h = self.vit.layernorm(h)
        return self.head(h[:, g * g:])


# ---------------------------------------------------------------------------------------------------------- losses
def box_iou_giou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalised IoU (Rezatofighi et al. 2019) of matching (x0, y0, x1, y1) boxes, each ``[B]``."""
    area_p = (pred[:, 2] - pred[:, 0]).clamp_min(0) * (pred[:, 3] - pred[:, 1]).clamp_min(0)
    area_t = (target[:, 2] - target[:, 0]).clamp_min(0) * (target[:, 3] - target[:, 1]).clamp_min(0)
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = area_p + area_t - inter
    iou = inter / union.clamp_min(1e-9)
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp_min(0).prod(-1)
    return iou, iou - (hull - union) / hull.clamp_min(1e-9)


def box_loss(pred: torch.Tensor, target: torch.Tensor, l1_weight: float, giou_weight: float) -> torch.Tensor:
    """``l1_weight``·mean L1 + ``giou_weight``·mean(1 − GIoU) (LoRAT/OSTrack's box terms)."""
    _, giou = box_iou_giou(pred, target)
    return l1_weight * (pred - target).abs().mean() + giou_weight * (1 - giou).mean()


# ---------------------------------------------------------------------------------------------------------- recipe glue
def lorat_config_from_recipe(recipe) -> LoRATConfig:
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, LoRATConfig)


def check_recipe(recipe) -> None:
    """What ``trainer: lorat`` needs besides its ``trainer.args``: a plain LoRA (``method.name: lora``) on the ViT's
    linears with the type embedding and head in ``modules_to_save`` (else they would stay random)."""
    if recipe.method.name != "lora":
        raise ValueError(f"trainer 'lorat' needs method.name 'lora' (LoRAT is plain LoRA, merged for inference); got "
                         f"{recipe.method.name!r}.")
    cfg = recipe.method.config
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or any(t not in VIT_LINEARS for t in targets):
        raise ValueError(f"method.config.target_modules must be a non-empty list from {list(VIT_LINEARS)} (the ViT's "
                         f"linears); got {targets!r}.")
    saved = cfg.get("modules_to_save") or []
    missing = [m for m in ("type_embedding", "head") if m not in saved]
    if missing:
        raise ValueError(f"method.config.modules_to_save must include {missing} (LoRAT trains the token-type "
                         f"embedding and the box head fully); got {saved!r}.")
    if recipe.model.quantization is not None:
        raise ValueError("trainer 'lorat': model.quantization must be null (the tiny ViT is built in fp32).")
    lorat_config_from_recipe(recipe)


def build_tracker(config: LoRATConfig, seed: int, vit_state: Optional[dict] = None) -> LoRATTracker:
    """The tracker with seeded initialisation and, when given, the pre-trained ViT weights."""
    torch.manual_seed(seed)
    model = LoRATTracker(config)
    if vit_state is not None:
        model.vit.load_state_dict(vit_state)
    return model


def load_lorat(folder, config: LoRATConfig, seed: int):
    """A trained LoRAT tracker from a recipe's output folder: the pre-trained ViT (``pretrained/vit.safetensors``)
    plus the LoRA adapter with its type embedding and head (``lora/adapter``), as a ``PeftModel`` in eval mode."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    base = build_tracker(config, seed, load_file(folder / "pretrained" / VIT_FILE))
    return PeftModel.from_pretrained(base, folder / "lora" / "adapter").eval()


def _cosine(optimizer, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def pretrain_vit(config: LoRATConfig, seed: int, quiet: bool) -> tuple[dict, dict]:
    """Stage ``pretrain``: full training of the ViT on dense digit recognition (every patch token → linear → the
    class of the digit under it or background; the classifier is discarded), a stand-in for DINOv2's pre-trained
    features. Returns the ViT state and the stage's numbers (patch accuracy on digit patches of held-out canvases)."""
    model = build_tracker(config, seed)
    classifier = nn.Linear(config.hidden_size, 11)
    if config.pretrain_steps == 0:
        return {k: v.clone() for k, v in model.vit.state_dict().items()}, {"steps": 0}
    x, y = classification_images(config, max(config.train_pairs, config.batch_size), seed)
    params = list(model.vit.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.pretrain_lr, weight_decay=0.05)
    scheduler = _cosine(optimizer, config.pretrain_steps)
    began, losses = time.time(), []
    for step, idx in enumerate(index_batches(len(y), config.batch_size, config.pretrain_steps, seed)):
        logits = classifier(model.encode(x[idx]))
        loss = F.cross_entropy(logits.reshape(-1, 11), y[idx].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if not quiet and (step + 1) % 50 == 0:
            print(f"lorat pretrain step {step + 1}/{config.pretrain_steps}: loss {np.mean(losses[-50:]):.3f}",
                  flush=True)
    xt, yt = classification_images(config, 400, seed + 1)
    with torch.no_grad():
        hit = classifier(model.encode(xt)).argmax(-1) == yt
    acc = hit[yt < 10].float().mean().item()
    stats = {"steps": config.pretrain_steps, "final_loss": float(np.mean(losses[-20:])), "digit_patch_accuracy": acc,
             "time_s": time.time() - began}
    return {k: v.detach().clone() for k, v in model.vit.state_dict().items()}, stats


def evaluate(model, data: dict, batch_size: int = 100) -> dict:
    """Mean IoU and success rate (IoU > 0.5) of the predicted boxes."""
    ious = []
    with torch.no_grad():
        for i in range(0, len(data["box"]), batch_size):
            sl = slice(i, i + batch_size)
            pred = model(data["template"][sl], data["search"][sl], data["template_mask"][sl])
            ious.append(box_iou_giou(pred, data["box"][sl])[0])
    iou = torch.cat(ious)
    return {"mean_iou": iou.mean().item(), "success_rate": (iou > 0.5).float().mean().item()}


def train_tracker(model, params, config: LoRATConfig, train: dict, seed: int, label: str, quiet: bool) -> dict:
    """Train ``params`` of ``model`` on the tracking pairs with the box loss (AdamW, cosine); returns its history."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = _cosine(optimizer, config.steps)
    model.train()
    began, losses = time.time(), []
    for step, idx in enumerate(index_batches(len(train["box"]), config.batch_size, config.steps, seed)):
        pred = model(train["template"][idx], train["search"][idx], train["template_mask"][idx])
        loss = box_loss(pred, train["box"][idx], config.l1_weight, config.giou_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if not quiet and (step + 1) % 50 == 0:
            print(f"lorat {label} step {step + 1}/{config.steps}: loss {np.mean(losses[-50:]):.3f}", flush=True)
    model.eval()
    return {"final_loss": float(np.mean(losses[-20:])), "time_s": time.time() - began,
            "trainable_parameters": sum(p.numel() for p in params)}


def time_forward(model, data: dict, repeats: int) -> float:
    """Median wall time (s) of one no-grad forward of ``data`` (one warm-up call first)."""
    times = []
    with torch.no_grad():
        model(data["template"], data["search"], data["template_mask"])
        for _ in range(repeats):
            began = time.perf_counter()
            model(data["template"], data["search"], data["template_mask"])
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def merged_vs_unmerged(peft_model, data: dict, repeats: int) -> dict:
    """Outputs and median forward time of the unmerged LoRA tracker against its ``merge_and_unload()`` copy (the
    paper's point: merged LoRA costs no inference time), and of the bare base ViT tracker for reference."""
    import copy

    with torch.no_grad():
        unmerged_out = peft_model(data["template"], data["search"], data["template_mask"])
    unmerged_s = time_forward(peft_model, data, repeats)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    with torch.no_grad():
        merged_out = merged(data["template"], data["search"], data["template_mask"])
    merged_s = time_forward(merged, data, repeats)
    return {"max_abs_diff": (merged_out - unmerged_out).abs().max().item(), "unmerged_s": unmerged_s,
            "merged_s": merged_s, "unmerged_over_merged": unmerged_s / merged_s, "batch": len(data["box"])}


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from .._io import atomic_savefig

    names = list(results)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[n]["mean_iou"] for n in names], 0.4, label="mean IoU")
    ax.bar(x + 0.2, [results[n]["success_rate"] for n in names], 0.4, label="success (IoU>0.5)")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("LoRAT stand-in: digit tracking", fontsize=9)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def train_lorat_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for LoRAT (https://arxiv.org/abs/2403.05231), ``trainer: {name: lorat, args: {...}}``.

    Writes ``pretrained/vit.safetensors``, ``lora/adapter`` (LoRA + type embedding + head), ``metrics.json`` and
    ``results.png``, each atomically; with ``resume`` a stage whose output is whole is loaded, not redone."""
    import json

    from safetensors.torch import load_file, save

    from .._io import adapter_folder_is_whole, atomic_write, atomic_write_json, safetensors_is_whole
    from ..recipe import to_dict
    from ..trainers.continual import _save_adapter

    check_recipe(recipe)
    config = lorat_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    vit_path, stats_path = out / "pretrained" / VIT_FILE, out / "pretrained" / "stats.json"
    if resume and safetensors_is_whole(vit_path) and stats_path.is_file():
        vit_state, pre_stats = load_file(vit_path), json.loads(stats_path.read_text(encoding="utf-8"))
    else:
        vit_state, pre_stats = pretrain_vit(config, recipe.seed, quiet)
        payload = save({k: v.contiguous() for k, v in vit_state.items()})
        atomic_write(vit_path, lambda f: f.write(payload), binary=True)
        atomic_write_json(stats_path, pre_stats)
    train = tracking_pairs(config, "train", config.train_pairs, recipe.data.seed)
    test = tracking_pairs(config, "test", config.test_pairs, recipe.data.seed)
    results, runs = {}, {}

    lora_dir = out / "lora"
    if resume and adapter_folder_is_whole(lora_dir / "adapter") and (lora_dir / "run.json").is_file():
        model = load_lorat(out, config, recipe.seed)
        runs["lora"] = json.loads((lora_dir / "run.json").read_text(encoding="utf-8"))
    else:
        from peft import get_peft_model

        model = get_peft_model(build_tracker(config, recipe.seed, vit_state), plain_lora_config(recipe))
        params = [p for p in model.parameters() if p.requires_grad]
        runs["lora"] = train_tracker(model, params, config, train, recipe.seed, "lora", quiet)
        _save_adapter(model, lora_dir / "adapter")
        atomic_write_json(lora_dir / "run.json", runs["lora"])
    model.eval()
    results["lora"] = evaluate(model, test)
    merge = merged_vs_unmerged(model, {k: v[:64] for k, v in test.items()}, config.timing_repeats)

    if config.baseline:
        frozen_dir = out / "frozen"
        base = build_tracker(config, recipe.seed, vit_state)
        for p in base.vit.parameters():
            p.requires_grad_(False)
        state_path = frozen_dir / "head.safetensors"
        if resume and safetensors_is_whole(state_path) and (frozen_dir / "run.json").is_file():
            base.load_state_dict(load_file(state_path), strict=False)
            runs["frozen"] = json.loads((frozen_dir / "run.json").read_text(encoding="utf-8"))
        else:
            params = list(base.type_embedding.parameters()) + list(base.head.parameters())
            runs["frozen"] = train_tracker(base, params, config, train, recipe.seed, "frozen", quiet)
            trained = {k: v.contiguous() for k, v in base.state_dict().items() if not k.startswith("vit.")}
            payload = save(trained)
            atomic_write(state_path, lambda f: f.write(payload), binary=True)
            atomic_write_json(frozen_dir / "run.json", runs["frozen"])
        base.eval()
        results["frozen"] = evaluate(base, test)

    metrics = {
        "name": recipe.name, "trainer": "lorat", "paper": PAPER, "official_code": CODE, "seed": recipe.seed,
        "lorat": asdict(config), "lora_config": dict(recipe.method.config), "pretrain": pre_stats,
        "tracking": results, "runs": runs, "merge": merge,
        "budget": {"wall_time_s": time.time() - began, "threads": torch.get_num_threads()},
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics, allow_nan=False)
    if recipe.evaluation.plot:
        _plot(results, out / "results.png")
    if not quiet:
        for name, r in results.items():
            print(f"lorat — {name}: mean IoU {r['mean_iou']:.3f}, success {r['success_rate']:.3f}")
        print(f"lorat — merged vs unmerged: max |Δ| {merge['max_abs_diff']:.2e}, unmerged/merged time "
              f"{merge['unmerged_over_merged']:.2f}")
        print(f"metrics: {out / 'metrics.json'}")
    return metrics


RECIPE = dict(config=LoRATConfig, entry=train_lorat_recipe, data=("digits",), tasks=("tracking",),
              models=("tiny-vit",))
