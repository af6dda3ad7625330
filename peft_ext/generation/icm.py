"""ICM-LoRA: a conditional VAE that generates LoRA adapters, and ICM-Fusion (our design) on top of it.

Paper: *In-Context Meta LoRA Generation* (ICM-LoRA, IJCAI'25, https://arxiv.org/abs/2501.17635); official code
https://github.com/YihuaJerry/ICM-LoRA (``model/CVAE_design.py``, ``TrainScript_CVAE.py``, ``utils/``, ``ICL/``),
read but not copied. ICM-Fusion: *In-Context Meta-Optimized LoRA Fusion for Multi-Task Adaptation*
(https://arxiv.org/abs/2508.04153), no readable code: :func:`icm_fusion` is **our** design, not the paper's.

Pipeline (``docs/icm_lora.md`` has the quirk list):

1. Training data: several checkpoints (epochs) of one LoRA per task. Each checkpoint's tensors are z-scored with
   that checkpoint's own per-tensor mean / std (official ``normalizeLoraWeight_small.py``), flattened in one fixed
   key order, concatenated and zero-padded to a multiple of ``divide_slice_length`` (:class:`AdapterLayout`,
   :func:`normalize_adapter`).
2. Condition ``c`` per task: a hidden state of the last layer at the last token (or CLS) of the task's prompts,
   averaged over the prompts (:func:`task_condition`).
3. :class:`LoraCVAE`: the official 1-D conv CVAE, loss ``MSE + kld_weight·KLD`` (:func:`train_lora_cvae`).
4. Generation: ``z ~ N(0, I)``, decode with ``c``, cut the padding, de-normalise with the task's stored statistics
   (those of its last checkpoint, as the official reconstruction does), reshape (:meth:`IcmLoraGenerator.generate`);
   :func:`save_lora_folder` writes a plain PEFT LoRA folder atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_CHANNELS = (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)
POOLINGS = ("last", "cls", "mean")
STATS_MODES = ("last", "mean")
LATENT_MODES = ("sample", "zero")
FUSE_MODES = ("mean", "normalized_sum")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
GENERATOR_WEIGHTS = "icm_cvae.safetensors"
GENERATOR_META = "icm_generator.json"

AdapterLike = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def _positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}; got {value!r}.")


def _positive_float(owner: str, name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{owner}.{name} must be a finite number {'>=' if allow_zero else '>'} 0; got {value!r}.")


@dataclass
class IcmLoraConfig:
    """Architecture and training of the ICM-LoRA CVAE. Defaults are the official ones (``TrainScript_CVAE.py``,
    ``CVAE_design.py``) except where a field says otherwise."""

    input_length: Optional[int] = field(
        default=None,
        metadata={"help": "Length of one flattened adapter before padding; None: set from the training adapters."},
    )
    condition_dim: Optional[int] = field(
        default=None, metadata={"help": "Size of the condition vector c; None: set from the training conditions."}
    )
    latent_dim: int = field(default=256, metadata={"help": "Size of the latent z (official 256)."})
    channels: tuple = field(
        default=OFFICIAL_CHANNELS,
        metadata={
            "help": "Encoder conv channels, one stride-2 Conv1d(k, 2, k//2)+BN+LeakyReLU per entry; the decoder "
            "mirrors them (official 8,16,32,64,128,256,256,128,64,32,16,8)."
        },
    )
    kernel_size: int = field(default=7, metadata={"help": "Odd conv kernel size (official 7)."})
    divide_slice_length: int = field(
        default=4096,
        metadata={
            "help": "The flattened adapter is zero-padded to a multiple of this; must be a multiple of "
            "2**len(channels) (official 4096 for 12 layers)."
        },
    )
    kld_weight: float = field(default=0.005, metadata={"help": "Weight of the KL term (official 0.005)."})
    pairwise_mse: bool = field(
        default=False,
        metadata={
            "help": "Reproduce the official loss's broadcasting: reconstruction [B, L] against padded input "
            "[B, 1, L] compares every reconstruction with every sample of the batch. False: each with its own."
        },
    )
    epochs: int = field(default=2000, metadata={"help": "Passes over all checkpoints of all tasks (official 2000)."})
    batch_size: int = field(default=2, metadata={"help": "Checkpoints per step (official 2)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate (official 2e-4)."})
    weight_decay: float = field(
        default=0.01,
        metadata={
            "help": "AdamW weight decay. The official script never builds its optimizer; ours is torch's AdamW "
            "with its default decay 0.01 (UNCERTAIN)."
        },
    )
    cosine_t_max_factor: float = field(
        default=2.0,
        metadata={
            "help": "CosineAnnealingLR T_max = factor * epochs, stepped once per epoch; the official 2.0 ends "
            "at half the learning rate."
        },
    )
    seed: int = field(default=2024, metadata={"help": "Seed of the CVAE init and the data order (official 2024)."})
    std_eps: float = field(
        default=1e-8,
        metadata={
            "help": "Floor of every per-tensor std (ours: the official division by std is NaN for an all-zero "
            "tensor, e.g. B of an untrained LoRA)."
        },
    )
    stats: str = field(
        default="last",
        metadata={
            "help": "Statistics that de-normalise a task's generated adapter: 'last' (its last checkpoint's, as the "
            "official reconstruction) or 'mean' (the mean over its checkpoints)."
        },
    )

    def __post_init__(self):
        owner = "IcmLoraConfig"
        for name in ("input_length", "condition_dim"):
            if getattr(self, name) is not None:
                _positive_int(owner, name, getattr(self, name))
        for name in ("latent_dim", "epochs", "batch_size", "divide_slice_length"):
            _positive_int(owner, name, getattr(self, name))
        _positive_int(owner, "seed", self.seed, minimum=0)
        _positive_int(owner, "kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"IcmLoraConfig.kernel_size must be odd (padding k//2 keeps lengths); got {self.kernel_size}."
            )
        channels = tuple(self.channels) if isinstance(self.channels, (list, tuple)) else None
        if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(
                f"IcmLoraConfig.channels must be a non-empty list of integers >= 1; got {self.channels!r}."
            )
        self.channels = channels
        if self.divide_slice_length % 2 ** len(channels):
            raise ValueError(
                f"IcmLoraConfig.divide_slice_length must be a multiple of 2**len(channels) = {2 ** len(channels)}; "
                f"got {self.divide_slice_length}."
            )
        _positive_float(owner, "kld_weight", self.kld_weight, allow_zero=True)
        _positive_float(owner, "learning_rate", self.learning_rate)
        _positive_float(owner, "weight_decay", self.weight_decay, allow_zero=True)
        _positive_float(owner, "cosine_t_max_factor", self.cosine_t_max_factor)
        _positive_float(owner, "std_eps", self.std_eps)
        if self.stats not in STATS_MODES:
            raise ValueError(f"IcmLoraConfig.stats must be one of {STATS_MODES}; got {self.stats!r}.")

    @property
    def padded_length(self) -> int:
        """``input_length`` rounded up to a multiple of ``divide_slice_length`` (official rule)."""
        if self.input_length is None:
            raise ValueError("IcmLoraConfig.input_length is not set.")
        d = self.divide_slice_length
        return -(-self.input_length // d) * d


# ----------------------------------------------------------------------------------------------------- the CVAE


class LoraCVAE(nn.Module):
    """The official 1-D convolutional CVAE over flattened adapters.

    Encoder: one ``Conv1d(k, stride 2, pad k//2) → BatchNorm1d → LeakyReLU`` per entry of ``channels`` (1 input
    channel), flatten, ``Linear → latent``; ``fc_mu`` / ``fc_var`` read ``[latent; c]``. Decoder: ``Linear([z; c])``,
    ``ConvTranspose1d(k, 2, k//2, output_padding 1) → BN → ELU`` down the mirrored channels, then one more such
    block at the last width and ``Conv1d(→1, k)``. The official decoder reverses its channel list in place, which
    is harmless only because the official list is a palindrome; here the decoder mirrors any list.
    """

    def __init__(self, config: IcmLoraConfig):
        super().__init__()
        if config.input_length is None or config.condition_dim is None:
            raise ValueError("LoraCVAE: config.input_length and config.condition_dim must be set.")
        self.config = config
        chans, k = list(config.channels), config.kernel_size
        self.padded_length = config.padded_length
        self.last_length = self.padded_length // 2 ** len(chans)
        blocks, width = [], 1
        for c in chans:
            blocks.append(nn.Sequential(nn.Conv1d(width, c, k, 2, k // 2), nn.BatchNorm1d(c), nn.LeakyReLU()))
            width = c
        self.encoder = nn.Sequential(*blocks)
        self.to_latent = nn.Linear(self.last_length * chans[-1], config.latent_dim)
        self.fc_mu = nn.Linear(config.latent_dim + config.condition_dim, config.latent_dim)
        self.fc_var = nn.Linear(config.latent_dim + config.condition_dim, config.latent_dim)
        self.to_decode = nn.Linear(config.latent_dim + config.condition_dim, self.last_length * chans[-1])
        mirror = chans[::-1]
        self.decoder = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose1d(a, b, k, 2, k // 2, output_padding=1), nn.BatchNorm1d(b), nn.ELU())
            for a, b in zip(mirror[:-1], mirror[1:])
        ])
        self.final_layer = nn.Sequential(
            nn.ConvTranspose1d(mirror[-1], mirror[-1], k, 2, k // 2, output_padding=1),
            nn.BatchNorm1d(mirror[-1]),
            nn.ELU(),
            nn.Conv1d(mirror[-1], 1, k, 1, k // 2),
        )

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` → ``[B, padded_length]``: zeros appended (official ``pad_sequence``; longer inputs are refused
        here, the official code silently truncates them)."""
        if x.dim() != 2:
            raise ValueError(f"LoraCVAE: expected flattened adapters of shape [batch, length]; got {tuple(x.shape)}.")
        if x.shape[1] > self.padded_length:
            raise ValueError(f"LoraCVAE: input length {x.shape[1]} exceeds the padded length {self.padded_length}.")
        return F.pad(x, (0, self.padded_length - x.shape[1]))

    def _check_condition(self, c: torch.Tensor, batch: int) -> None:
        if c.dim() != 2 or c.shape[0] != batch or c.shape[1] != self.config.condition_dim:
            raise ValueError(
                f"LoraCVAE: condition must have shape [{batch}, {self.config.condition_dim}]; got {tuple(c.shape)}."
            )

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened adapters ``[B, L]`` and conditions ``[B, C]`` → ``(mu, log_var)``, each ``[B, latent]``."""
        self._check_condition(c, x.shape[0])
        h = self.to_latent(self.encoder(self.pad(x)[:, None, :]).flatten(1))
        h = torch.cat([h, c], dim=-1)
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, latent]`` and conditions ``[B, C]`` → padded flattened adapters ``[B, padded_length]``."""
        self._check_condition(c, z.shape[0])
        h = self.to_decode(torch.cat([z, c], dim=-1)).view(z.shape[0], self.config.channels[-1], self.last_length)
        return self.final_layer(self.decoder(h))[:, 0, :]

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> dict:
        """Loss of one batch: ``{"loss", "recon_loss", "kld_loss"}`` (MSE over the padded length, as the official
        code, plus ``kld_weight`` times the batch mean of the summed KL divergence)."""
        mu, log_var = self.encode(x, c)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        recon, target = self.decode(z, c), self.pad(x)
        if self.config.pairwise_mse:  # official: [B, L] vs [B, 1, L] broadcasts to every (sample, reconstruction) pair
            recon_loss = ((recon[None, :, :] - target[:, None, :]) ** 2).mean()
        else:
            recon_loss = F.mse_loss(recon, target)
        kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1))
        return {"loss": recon_loss + self.config.kld_weight * kld, "recon_loss": recon_loss, "kld_loss": kld}


# ------------------------------------------------------------------------------- adapters as flat vectors


@dataclass(frozen=True)
class AdapterLayout:
    """Key order and shapes of one adapter state dict: the map between the dict and one flat vector.

    Keys are sorted by name (the official code keeps the file's order; safetensors files are sorted anyway)."""

    keys: tuple
    shapes: tuple

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "AdapterLayout":
        keys = tuple(sorted(state_dict))
        return cls(keys, tuple(tuple(state_dict[k].shape) for k in keys))

    @property
    def numels(self) -> list:
        return [math.prod(s) for s in self.shapes]

    @property
    def length(self) -> int:
        return sum(self.numels)

    def check(self, state_dict: Mapping[str, torch.Tensor], what: str = "adapter") -> None:
        """Raise a ValueError naming the first key that is missing, extra, not floating point, not finite or of
        another shape."""
        missing = [k for k in self.keys if k not in state_dict]
        extra = sorted(set(state_dict) - set(self.keys))
        if missing or extra:
            raise ValueError(
                f"{what}: keys differ from the first adapter's (missing {missing[:3]}, extra {extra[:3]}); every "
                "adapter must have the same base model, target modules and rank."
            )
        for key, shape in zip(self.keys, self.shapes):
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{what}: {key} must be a floating-point tensor; got {type(t).__name__}.")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{what}: {key} has shape {tuple(t.shape)}, the first adapter's has {shape}; every adapter "
                    "must have the same base model, target modules and rank."
                )
            if not torch.isfinite(t).all():
                raise ValueError(f"{what}: {key} holds NaN or inf.")

    def flatten(self, state_dict: Mapping[str, torch.Tensor], what: str = "adapter") -> torch.Tensor:
        """Concatenate the tensors in key order into one float64 vector (exactly invertible by :meth:`unflatten`)."""
        self.check(state_dict, what)
        return torch.cat([state_dict[k].detach().cpu().double().reshape(-1) for k in self.keys])

    def unflatten(self, vector: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict:
        """Split a vector of length >= ``length`` (padding beyond it is dropped) back into the state dict."""
        if vector.dim() != 1 or vector.numel() < self.length:
            raise ValueError(
                f"AdapterLayout.unflatten: need a 1-D vector of length >= {self.length}; got {tuple(vector.shape)}."
            )
        parts = torch.split(vector[: self.length], self.numels)
        return {k: p.reshape(s).to(dtype).contiguous() for k, p, s in zip(self.keys, parts, self.shapes)}

    def to_json(self) -> dict:
        return {"keys": list(self.keys), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, payload: Mapping) -> "AdapterLayout":
        return cls(tuple(payload["keys"]), tuple(tuple(s) for s in payload["shapes"]))


def adapter_stats(layout: AdapterLayout, state_dict: Mapping[str, torch.Tensor], eps: float = 1e-8):
    """Per-tensor mean and (unbiased, as ``torch.std``) std in float64, each ``[len(keys)]``; std floored at ``eps``
    (ours: the official code divides by an std of 0 for an all-zero tensor)."""
    layout.check(state_dict)
    means, stds = [], []
    for key in layout.keys:
        x = state_dict[key].detach().cpu().double().reshape(-1)
        means.append(x.mean())
        stds.append((x.std() if x.numel() > 1 else x.new_zeros(())).clamp_min(eps))
    return torch.stack(means), torch.stack(stds)


def _expand(layout: AdapterLayout, per_key: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(per_key.double(), torch.tensor(layout.numels))


def normalize_adapter(layout: AdapterLayout, state_dict: Mapping[str, torch.Tensor], eps: float = 1e-8):
    """Z-score every tensor with its own statistics and flatten: ``(vector float64, mean, std)`` (official
    ``normalizeLoraWeight_small.py``)."""
    mean, std = adapter_stats(layout, state_dict, eps)
    vector = (layout.flatten(state_dict) - _expand(layout, mean)) / _expand(layout, std)
    return vector, mean, std


def denormalize_adapter(
    layout: AdapterLayout, vector: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype=torch.float32
) -> dict:
    """Inverse of :func:`normalize_adapter` for given statistics: padding cut, ``x·std + mean`` per tensor (float64),
    reshaped; the official ``ReconstructLora_cvae.py`` step."""
    if vector.dim() != 1 or vector.numel() < layout.length:
        raise ValueError(
            f"denormalize_adapter: need a 1-D vector of length >= {layout.length}; got {tuple(vector.shape)}."
        )
    x = vector[: layout.length].double()
    return layout.unflatten(x * _expand(layout, std) + _expand(layout, mean), dtype=dtype)


# ---------------------------------------------------------------------------------------------- reading adapters


def _read_adapter(item: AdapterLike, what: str) -> tuple[dict, Optional[dict]]:
    """A folder (``adapter_config.json`` + ``adapter_model.safetensors``) or a state dict → ``(state dict, config
    dict or None)``; refuses adapters that are not plain LoRA."""
    if isinstance(item, Mapping):
        return dict(item), None
    if not isinstance(item, (str, os.PathLike)):
        raise ValueError(f"{what}: expected an adapter folder or a state dict; got {type(item).__name__}.")
    folder = Path(item)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{what}: {str(folder)!r} is not an adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{what}: {config_path} is not valid JSON ({exc}).") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{what}: ICM-LoRA generates plain LoRA adapters; {str(folder)!r} has peft_type "
            f"{config.get('peft_type')!r} (export it to LoRA first, e.g. with save_as_lora)."
        )
    from safetensors.torch import load_file

    try:
        return load_file(str(weights_path)), config
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{what}: cannot read {weights_path} ({exc}).") from None


def _peft_config_dict(peft_config: Any) -> Optional[dict]:
    if peft_config is None:
        return None
    if isinstance(peft_config, Mapping):
        config = dict(peft_config)
    elif hasattr(peft_config, "to_dict"):
        config = peft_config.to_dict()
    else:
        raise ValueError(f"peft_config must be a LoraConfig or a dict; got {type(peft_config).__name__}.")
    peft_type = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
    if peft_type != "LORA":
        raise ValueError(f"peft_config: ICM-LoRA generates plain LoRA adapters; got peft_type {peft_type!r}.")
    config["peft_type"] = "LORA"
    if config.get("task_type") is not None:
        config["task_type"] = str(getattr(config["task_type"], "value", config["task_type"]))
    for key, value in list(config.items()):
        if isinstance(value, (set, frozenset)):
            config[key] = sorted(value)
    config.pop("runtime_config", None)
    return config


def save_lora_folder(
    state_dict: Mapping[str, torch.Tensor], peft_config: Any, out_dir: Union[str, os.PathLike]
) -> Path:
    """Write ``state_dict`` (PEFT's saved key names, e.g. ``…query.lora_A.weight``) and ``peft_config`` (a
    ``LoraConfig`` or its dict) as a plain LoRA folder that ``PeftModel.from_pretrained`` loads without peft-ext.

    Atomic: both files are written into a fresh sibling folder which then replaces ``out_dir`` (an existing
    ``out_dir`` is swapped out only after the new one is whole), so a crash leaves the old folder or the new one."""
    config = _peft_config_dict(peft_config)
    if config is None:
        raise ValueError("save_lora_folder: peft_config is required (a LoraConfig or its dict).")
    if not state_dict:
        raise ValueError("save_lora_folder: state_dict is empty.")
    from safetensors.torch import save

    from .._io import atomic_write, atomic_write_json

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_lora_folder: {str(out)!r} exists and is not a folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    old = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
    try:
        tmp.mkdir()
        payload = save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, metadata={"format": "pt"})
        atomic_write(tmp / WEIGHTS_FILE, lambda f: f.write(payload), binary=True)
        atomic_write_json(tmp / CONFIG_FILE, config, sort_keys=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------- conditions


@torch.no_grad()
def task_condition(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    pooling: str = "last",
    layer: int = -1,
    batch_size: int = 8,
    max_length: int = 128,
) -> torch.Tensor:
    """The condition vector of a task: the hidden state of ``layer`` (``output_hidden_states`` index; -1 = last) at
    the last non-padding token (``pooling="last"``, the paper's and official choice for a decoder), at the first
    token (``"cls"``, for a BERT-style encoder whose classifier reads it) or averaged over tokens (``"mean"``),
    averaged over ``prompts``; float32 ``[hidden]``.

    The official script hooks the last decoder layer and averages the last position of *every* generation step of
    30 prompts (beam search included); here only the prompts' own forward pass counts."""
    if pooling not in POOLINGS:
        raise ValueError(f"task_condition: pooling must be one of {POOLINGS}; got {pooling!r}.")
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("task_condition: prompts must be a non-empty list of strings.")
    _positive_int("task_condition", "batch_size", batch_size)
    _positive_int("task_condition", "max_length", max_length)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"task_condition: layer must be an integer index of hidden_states; got {layer!r}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = None, 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            out = model(**batch, output_hidden_states=True)
            if not -len(out.hidden_states) <= layer < len(out.hidden_states):
                raise ValueError(f"task_condition: layer must be in [-{len(out.hidden_states)}, "
                                 f"{len(out.hidden_states) - 1}] (hidden_states of this model); got {layer}.")
            hidden = out.hidden_states[layer].float()
            mask = batch["attention_mask"].to(hidden.dtype)
            if pooling == "cls":
                pooled = hidden[:, 0]
            elif pooling == "mean":
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            else:  # last non-padding position, whatever the padding side
                last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
                pooled = hidden[torch.arange(hidden.shape[0], device=device), last]
            total = pooled.sum(0) if total is None else total + pooled.sum(0)
            count += pooled.shape[0]
    finally:
        model.train(was_training)
    return (total / count).cpu()


def fuse_conditions(conditions: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None,
                    mode: str = "mean") -> torch.Tensor:
    """ICM-Fusion's fused condition (our design): ``"mean"`` = weighted mean ``Σ w_t c_t / Σ w_t``;
    ``"normalized_sum"`` = ``Σ w_t c_t/‖c_t‖`` rescaled to the weighted mean norm. One task gives that task's
    condition back exactly in both modes."""
    if mode not in FUSE_MODES:
        raise ValueError(f"fuse_conditions: mode must be one of {FUSE_MODES}; got {mode!r}.")
    if not conditions:
        raise ValueError("fuse_conditions: need at least one condition.")
    w = _weights(weights, len(conditions), "fuse_conditions")
    stacked = torch.stack([c.double() for c in conditions])
    if mode == "mean":
        fused = (w[:, None] * stacked).sum(0)
    else:
        norms = stacked.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction = (w[:, None] * stacked / norms).sum(0)
        fused = direction / direction.norm().clamp_min(1e-12) * (w * norms[:, 0]).sum()
        if len(conditions) == 1:
            fused = stacked[0]
    return fused.float()


def _weights(weights: Optional[Sequence[float]], n: int, owner: str) -> torch.Tensor:
    """Weights normalised to sum 1 (float64); None: uniform."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"{owner}: weights must be {n} finite numbers >= 0 with a positive sum; got {list(weights)!r}."
        )
    return w / w.sum()


# -------------------------------------------------------------------------------------- training and generation


@dataclass
class IcmLoraGenerator:
    """A trained CVAE with what generation needs: the layout, each task's condition and de-normalisation
    statistics, and the LoRA config the generated folders get."""

    cvae: LoraCVAE
    layout: AdapterLayout
    conditions: dict
    stats: dict  # task -> (mean [K], std [K]) float64
    peft_config: Optional[dict] = None
    history: list = field(default_factory=list)

    @property
    def tasks(self) -> list:
        return list(self.conditions)

    def _task(self, task: str) -> str:
        if task not in self.conditions:
            raise ValueError(f"IcmLoraGenerator: unknown task {task!r}; known: {self.tasks}.")
        return task

    def nearest_task(self, condition: torch.Tensor) -> str:
        """The task whose condition has the highest cosine similarity with ``condition``."""
        sims = {t: F.cosine_similarity(condition.float(), c.float(), dim=0).item() for t, c in self.conditions.items()}
        return max(sims, key=sims.get)

    @torch.no_grad()
    def generate(
        self,
        task: Optional[str] = None,
        condition: Optional[torch.Tensor] = None,
        stats: Optional[tuple] = None,
        num_samples: int = 1,
        seed: int = 0,
        latent: str = "sample",
    ) -> list:
        """Generate ``num_samples`` adapter state dicts for a known ``task`` or a new ``condition``.

        ``latent="sample"`` draws ``z ~ N(0, I)`` (official; it draws 3 and keeps the first), ``"zero"`` decodes the
        prior mean (ours, deterministic). The CVAE runs in eval mode (BatchNorm running statistics, as the official
        reconstruction). De-normalisation uses ``stats`` when given, else the task's stored statistics; for a new
        condition without ``stats``, those of the task with the nearest condition (ours: the official script
        takes them from one stored checkpoint file chosen by hand)."""
        if (task is None) == (condition is None):
            raise ValueError("IcmLoraGenerator.generate: pass exactly one of task= or condition=.")
        if latent not in LATENT_MODES:
            raise ValueError(f"IcmLoraGenerator.generate: latent must be one of {LATENT_MODES}; got {latent!r}.")
        _positive_int("IcmLoraGenerator.generate", "num_samples", num_samples)
        if task is not None:
            condition = self.conditions[self._task(task)]
        condition = torch.as_tensor(condition, dtype=torch.float32)
        dim = self.cvae.config.condition_dim
        if condition.shape != (dim,) or not torch.isfinite(condition).all():
            raise ValueError(f"IcmLoraGenerator.generate: condition must be a finite vector of size {dim}; "
                             f"got shape {tuple(condition.shape)}.")
        if stats is None:
            stats = self.stats[task if task is not None else self.nearest_task(condition)]
        mean, std = (torch.as_tensor(s, dtype=torch.float64) for s in stats)
        if mean.shape != (len(self.layout.keys),) or std.shape != mean.shape:
            raise ValueError(f"IcmLoraGenerator.generate: stats must be two vectors of size {len(self.layout.keys)}.")
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(num_samples, self.cvae.config.latent_dim, generator=gen)
        if latent == "zero":
            z.zero_()
        was_training = self.cvae.training
        self.cvae.eval()
        try:
            out = self.cvae.decode(z, condition[None].expand(num_samples, -1))
        finally:
            self.cvae.train(was_training)
        return [denormalize_adapter(self.layout, row, mean, std) for row in out]

    def save_adapter(self, state_dict: Mapping[str, torch.Tensor], out_dir: Union[str, os.PathLike]) -> Path:
        """Write a generated state dict as a plain LoRA folder with the training adapters' config."""
        if self.peft_config is None:
            raise ValueError("IcmLoraGenerator.save_adapter: no LoRA config known (train from adapter folders or "
                             "pass peft_config= to train_lora_cvae); use save_lora_folder(state_dict, config, dir).")
        self.layout.check(state_dict, "IcmLoraGenerator.save_adapter")
        return save_lora_folder(state_dict, self.peft_config, out_dir)

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """Save the generator (CVAE weights + layout, conditions, statistics, config) into ``folder`` atomically."""
        from safetensors.torch import save

        from .._io import atomic_write, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = save({k: v.detach().cpu().contiguous() for k, v in self.cvae.state_dict().items()})
        meta = {
            "config": asdict(self.cvae.config),
            "layout": self.layout.to_json(),
            "conditions": {t: c.tolist() for t, c in self.conditions.items()},
            "stats": {t: [m.tolist(), s.tolist()] for t, (m, s) in self.stats.items()},
            "peft_config": self.peft_config,
            "history": self.history,
        }
        atomic_write(folder / GENERATOR_WEIGHTS, lambda f: f.write(payload), binary=True)
        atomic_write_json(folder / GENERATOR_META, meta)
        return folder

    @classmethod
    def load(cls, folder: Union[str, os.PathLike]) -> "IcmLoraGenerator":
        """Load what :meth:`save` wrote."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / GENERATOR_META).is_file() or not (folder / GENERATOR_WEIGHTS).is_file():
            raise ValueError(f"IcmLoraGenerator.load: {str(folder)!r} has no {GENERATOR_META} / {GENERATOR_WEIGHTS}.")
        meta = json.loads((folder / GENERATOR_META).read_text(encoding="utf-8"))
        cvae = LoraCVAE(IcmLoraConfig(**meta["config"]))
        cvae.load_state_dict(load_file(str(folder / GENERATOR_WEIGHTS)))
        cvae.eval()
        return cls(
            cvae=cvae,
            layout=AdapterLayout.from_json(meta["layout"]),
            conditions={t: torch.tensor(c, dtype=torch.float32) for t, c in meta["conditions"].items()},
            stats={t: (torch.tensor(m, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
                   for t, (m, s) in meta["stats"].items()},
            peft_config=meta.get("peft_config"),
            history=meta.get("history", []),
        )


def train_lora_cvae(
    task_adapters: Mapping[str, Sequence[AdapterLike]],
    conditions: Mapping[str, torch.Tensor],
    config: Optional[IcmLoraConfig] = None,
    peft_config: Any = None,
    log: Optional[Callable[[dict], None]] = None,
) -> IcmLoraGenerator:
    """Train the ICM-LoRA CVAE on the checkpoints of each task's LoRA.

    ``task_adapters``: task name → the checkpoints of that task's LoRA (several epochs, oldest first; the last is the
    task's reference for ``stats="last"``), each an adapter folder or a state dict in PEFT's saved key names.
    ``conditions``: task name → its condition vector (:func:`task_condition`). ``peft_config``: the LoRA config the
    generated folders get when no checkpoint is a folder. Optimizer (the official script never builds one): torch
    AdamW at ``learning_rate`` / ``weight_decay``; CosineAnnealingLR with ``T_max = cosine_t_max_factor·epochs``
    stepped per epoch (official). ``log`` receives ``{"epoch", "loss", "recon_loss", "kld_loss", "lr"}`` per epoch.
    One CVAE covers every task given: with one task it is the official per-task setting, with several it is the
    shared generator ICM-Fusion conditions on a fused vector.
    """
    config = IcmLoraConfig() if config is None else config
    if not isinstance(config, IcmLoraConfig):
        raise ValueError(f"train_lora_cvae: config must be an IcmLoraConfig; got {type(config).__name__}.")
    if not isinstance(task_adapters, Mapping) or not task_adapters:
        raise ValueError("train_lora_cvae: task_adapters must be a non-empty dict task name -> list of adapters.")
    if not isinstance(conditions, Mapping) or set(conditions) != set(task_adapters):
        raise ValueError(
            f"train_lora_cvae: conditions must have exactly the tasks of task_adapters {sorted(task_adapters)}; "
            f"got {sorted(conditions) if isinstance(conditions, Mapping) else type(conditions).__name__}."
        )
    layout, folder_config = None, None
    rows, row_tasks, stats = [], [], {}
    for task, items in task_adapters.items():
        if isinstance(items, (str, os.PathLike, Mapping)) or not isinstance(items, Sequence) or not items:
            raise ValueError(f"train_lora_cvae: task {task!r} needs a non-empty list of adapter checkpoints.")
        means, stds = [], []
        for i, item in enumerate(items):
            what = f"task {task!r}, checkpoint {i}"
            state_dict, cfg = _read_adapter(item, what)
            if not state_dict:
                raise ValueError(f"{what}: the adapter has no tensors.")
            if layout is None:
                layout, first = AdapterLayout.from_state_dict(state_dict), what
            try:
                layout.check(state_dict, what)
            except ValueError as exc:
                raise ValueError(f"{exc} (first adapter: {first})") from None
            folder_config = cfg if cfg is not None else folder_config
            vector, mean, std = normalize_adapter(layout, state_dict, config.std_eps)
            rows.append(vector.float())
            row_tasks.append(task)
            means.append(mean)
            stds.append(std)
        stats[task] = (means[-1], stds[-1]) if config.stats == "last" else (torch.stack(means).mean(0),
                                                                            torch.stack(stds).mean(0))
    conds = {}
    for task in task_adapters:
        c = torch.as_tensor(conditions[task], dtype=torch.float32)
        if c.dim() != 1 or not torch.isfinite(c).all():
            raise ValueError(f"train_lora_cvae: condition of task {task!r} must be a finite 1-D vector; got shape "
                             f"{tuple(c.shape)}.")
        conds[task] = c
    dims = {t: c.numel() for t, c in conds.items()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"train_lora_cvae: all conditions must have one size; got {dims}.")
    cond_dim = next(iter(dims.values()))
    for name, value in (("input_length", layout.length), ("condition_dim", cond_dim)):
        if getattr(config, name) not in (None, value):
            raise ValueError(f"train_lora_cvae: config.{name} is {getattr(config, name)} but the data gives {value}.")
    config = IcmLoraConfig(**{**asdict(config), "input_length": layout.length, "condition_dim": cond_dim})
    peft_dict = _peft_config_dict(peft_config) if peft_config is not None else folder_config

    torch.manual_seed(config.seed)
    cvae = LoraCVAE(config)
    x = torch.stack(rows)
    c = torch.stack([conds[t] for t in row_tasks])
    optimizer = torch.optim.AdamW(cvae.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, round(config.cosine_t_max_factor * config.epochs))
    )
    order_gen = torch.Generator().manual_seed(config.seed)
    history = []
    cvae.train()
    start = time.perf_counter()
    for epoch in range(config.epochs):
        totals = {"loss": 0.0, "recon_loss": 0.0, "kld_loss": 0.0}
        batches = torch.randperm(len(rows), generator=order_gen).split(config.batch_size)
        for idx in batches:
            optimizer.zero_grad(set_to_none=True)
            out = cvae(x[idx], c[idx])
            out["loss"].backward()
            optimizer.step()
            for k in totals:
                totals[k] += out[k].item() / len(batches)
        record = {"epoch": epoch + 1, **totals, "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step()
        if log is not None:
            log(record)
        if epoch == 0 or epoch + 1 == config.epochs or (epoch + 1) % max(1, config.epochs // 20) == 0:
            history.append({**record, "seconds": round(time.perf_counter() - start, 2)})
    cvae.eval()
    return IcmLoraGenerator(cvae=cvae, layout=layout, conditions=conds, stats=stats, peft_config=peft_dict,
                            history=history)


def icm_fusion(
    generator: IcmLoraGenerator,
    tasks: Optional[Sequence[str]] = None,
    weights: Optional[Sequence[float]] = None,
    fuse: str = "mean",
    num_samples: int = 1,
    seed: int = 0,
    latent: str = "sample",
) -> list:
    """ICM-Fusion, our design (the paper's F-VAE and manifold projection have no readable code): one multi-task
    adapter from a CVAE trained on several tasks, decoded with the fused condition ``fuse_conditions(c_1…c_T)`` and
    de-normalised with the same weighted mean of the tasks' statistics (means and stds). One task gives exactly
    ``generator.generate(task=…)`` (same seed)."""
    tasks = generator.tasks if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("icm_fusion: tasks must name at least one task.")
    for t in tasks:
        generator._task(t)
    w = _weights(weights, len(tasks), "icm_fusion")
    condition = fuse_conditions([generator.conditions[t] for t in tasks], w.tolist(), fuse)
    mean = sum(wi * generator.stats[t][0] for wi, t in zip(w, tasks))
    std = sum(wi * generator.stats[t][1] for wi, t in zip(w, tasks))
    if len(tasks) == 1:
        mean, std = generator.stats[tasks[0]]
    return generator.generate(condition=condition, stats=(mean, std), num_samples=num_samples, seed=seed,
                              latent=latent)
