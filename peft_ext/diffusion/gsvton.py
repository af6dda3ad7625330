"""GS-VTON stage 1: RealFill-style inpainting LoRA training on a diffusers Stable-Diffusion inpainting pipeline.

Paper: *GS-VTON: Controllable 3D Virtual Try-on with Gaussian Splatting* (https://arxiv.org/abs/2410.05259); official
code https://github.com/yukangcao/GS-VTON (``stage1/train_lora.py``, RealFill-style). The LoRAs personalise an SD
inpainting UNet (9 input channels: noisy latent ⊕ mask ⊕ masked-image latent) and the CLIP text encoder to the
garment / person images; GS-VTON's 3-D Gaussian-splatting stage (stage 2) is outside PEFT and out of scope here.

Official settings (``InpaintLoraConfig`` defaults): LoRA r=16, α=27, dropout 0 on the UNet ``to_q/to_k/to_v/to_out.0``
and the text encoder ``q_proj/k_proj/v_proj/out_proj``; AdamW (0.9, 0.999, wd 1e-2), lr 2e-4 (UNet) / 4e-5 (text),
constant schedule, grad-norm clip 1.0, batch 4, prompt "a photo of sks". Each example gets, with probability 0.1, a
full mask, else 1–29 random boxes (sides 3–25 % of the image, 1 % margin) inverted with probability 0.5; the prompt
is empty with probability 0.1; the conditioning image keeps the pixels where mask < 0.5. The official loss weighting
is all ones (its weighting image is black, i.e. -1 < 0 after normalisation), so the loss is the plain MSE.

The adapters are saved in diffusers' layout (``pytorch_lora_weights.safetensors`` with the LoRA configs as metadata)
so that ``pipe.load_lora_weights(folder)`` loads both into a fresh pipeline.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .lora_composer import check_config_kwargs
from .tara import diffusion_target
from .tiny import tiny_pipeline, tiny_unet

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_TARGETS = ("k_proj", "q_proj", "v_proj", "out_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"


def tiny_inpaint_pipeline(seed: int = 0, sample_size: int = 8, max_prompt_tokens: int = 16,
                          cross_attention_dim: int = 32):
    """A random tiny ``StableDiffusionInpaintPipeline``: ``tiny_pipeline``'s VAE, text encoder, tokenizer and DDIM
    scheduler with a 9-input-channel UNet (noisy latent ⊕ mask ⊕ masked-image latent). Same ``seed`` -> same weights."""
    from diffusers import StableDiffusionInpaintPipeline

    base = tiny_pipeline(seed, sample_size=sample_size, max_prompt_tokens=max_prompt_tokens,
                         cross_attention_dim=cross_attention_dim)
    torch.manual_seed(seed)
    unet = tiny_unet(sample_size=sample_size, in_channels=9, out_channels=4, cross_attention_dim=cross_attention_dim)
    pipe = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=unet, scheduler=base.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class InpaintLoraConfig:
    """GS-VTON / RealFill inpainting-LoRA training (defaults: the official ``stage1/train_lora.py``)."""

    prompt: str = field(default="a photo of sks", metadata={"help": "Training prompt (official 'a photo of sks')."})
    steps: int = field(default=2000, metadata={
        "help": "Optimizer steps (the official script runs one epoch unless --max_train_steps is given; RealFill "
                "trains 2000)."})
    batch_size: int = field(default=4, metadata={"help": "Images per step (official 4)."})
    unet_learning_rate: float = field(default=2e-4, metadata={"help": "UNet LoRA learning rate (official 2e-4)."})
    text_encoder_learning_rate: float = field(default=4e-5, metadata={
        "help": "Text-encoder LoRA learning rate (official 4e-5)."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (official 1e-2)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank of both adapters (official 16)."})
    lora_alpha: float = field(default=27, metadata={"help": "LoRA α of both adapters (official 27)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (official 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (official 1.0)."})
    full_mask_prob: float = field(default=0.1, metadata={"help": "Probability of an all-ones mask (official 0.1)."})
    empty_prompt_prob: float = field(default=0.1, metadata={"help": "Probability of the empty prompt (official 0.1)."})
    max_boxes: int = field(default=30, metadata={"help": "Box count is uniform in 1..max_boxes-1 (official 30)."})
    box_min: float = field(default=0.03, metadata={"help": "Smallest box side, fraction of the image (0.03)."})
    box_max: float = field(default=0.25, metadata={"help": "Largest box side (exclusive), fraction (0.25)."})
    box_margin: float = field(default=0.01, metadata={"help": "Margin kept free at the border, fraction (0.01)."})
    invert_prob: float = field(default=0.5, metadata={"help": "Probability of inverting a box mask (official 0.5)."})
    adapter_name: str = field(default="gsvton", metadata={"help": "Adapter name on the UNet and the text encoder."})
    seed: int = field(default=0, metadata={"help": "Seed of masks, prompt dropout, noise and timesteps."})

    def __post_init__(self):
        owner = "InpaintLoraConfig"
        for name in ("steps", "batch_size", "lora_rank", "max_boxes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "max_boxes" else 1):
                raise ValueError(f"{owner}.{name}={v!r}; allowed: an integer >= {2 if name == 'max_boxes' else 1}.")
        for name in ("unet_learning_rate", "text_encoder_learning_rate", "lora_alpha", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{owner}.{name}={v!r}; allowed: a number > 0.")
        for name in ("lora_dropout", "full_mask_prob", "empty_prompt_prob", "invert_prob", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{owner}.{name}={v!r}; allowed: a number in [0, 1].")
        if not 0 < self.box_min < self.box_max <= 1 or not 0 <= self.box_margin < 0.5:
            raise ValueError(f"{owner}: box_min={self.box_min}, box_max={self.box_max}, box_margin={self.box_margin}; "
                             "allowed: 0 < box_min < box_max <= 1 and 0 <= box_margin < 0.5.")
        for name in ("prompt", "adapter_name"):
            if not isinstance(getattr(self, name), str) or (name == "adapter_name" and not self.adapter_name):
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r}; allowed: a string (adapter_name non-empty).")


def make_box_mask(size: int, rng: np.random.Generator, config: Optional[InpaintLoraConfig] = None) -> torch.Tensor:
    """The official random box mask ``[1, size, size]`` (1 = to inpaint): start from ones, zero 1..max_boxes-1 random
    boxes (integer sides in [box_min·size, box_max·size), margin box_margin·size), then invert with invert_prob."""
    cfg = config or InpaintLoraConfig()
    mask = torch.ones(1, size, size)
    lo, hi, margin = (np.array([cfg.box_min, cfg.box_max, cfg.box_margin]) * size).astype(float)
    hi = min(hi, size - margin * 2)
    for _ in range(int(rng.integers(1, cfg.max_boxes))):
        w = int(rng.integers(int(lo), max(int(lo) + 1, int(hi))))
        h = int(rng.integers(int(lo), max(int(lo) + 1, int(hi))))
        x = int(rng.integers(int(margin), max(int(margin) + 1, size - int(margin) - w + 1)))
        y = int(rng.integers(int(margin), max(int(margin) + 1, size - int(margin) - h + 1)))
        mask[:, y:y + h, x:x + w] = 0
    return 1 - mask if rng.random() < cfg.invert_prob else mask


def training_example(image: torch.Tensor, rng: np.random.Generator, config: InpaintLoraConfig) -> dict:
    """One official training example: mask (full with full_mask_prob, else boxes), conditioning image (pixels where
    mask < 0.5 kept) and prompt (empty with empty_prompt_prob)."""
    size = image.shape[-1]
    mask = torch.ones(1, size, size) if rng.random() < config.full_mask_prob else make_box_mask(size, rng, config)
    return {"image": image, "mask": mask, "conditioning": image * (mask < 0.5),
            "prompt": "" if rng.random() < config.empty_prompt_prob else config.prompt}


def add_inpaint_loras(pipe, config: InpaintLoraConfig) -> None:
    """The two official LoRAs: UNet attention projections and CLIP text-encoder attention projections."""
    from peft import LoraConfig

    unet_cfg = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(UNET_TARGETS))
    text_cfg = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(TEXT_TARGETS))
    pipe.unet.add_adapter(unet_cfg, adapter_name=config.adapter_name)
    pipe.text_encoder.add_adapter(text_cfg, adapter_name=config.adapter_name)


def _lora_params(model, adapter: str) -> list:
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n]


def train_inpaint_lora(pipe, images: torch.Tensor, config: Optional[InpaintLoraConfig] = None,
                       output_dir: Optional[Union[str, Path]] = None, **config_kwargs) -> dict:
    """Train GS-VTON's stage-1 LoRAs on ``images`` (``[N, 3, S, S]`` in [-1, 1]) with a
    ``StableDiffusionInpaintPipeline`` (UNet with 9 input channels). Adds the adapters to ``pipe`` (left active), saves
    them to ``output_dir`` in diffusers' layout when given, and returns the per-step losses."""
    if config is None:
        check_config_kwargs(InpaintLoraConfig, config_kwargs)
        config = InpaintLoraConfig(**config_kwargs)
    if pipe.unet.config.in_channels != 9:
        raise ValueError(f"pipe.unet has {pipe.unet.config.in_channels} input channels; GS-VTON trains an inpainting "
                         "UNet with 9 (noisy latent, mask, masked-image latent), e.g. tiny_inpaint_pipeline().")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or images.shape[-1] != images.shape[-2]:
        raise ValueError("images must be a float tensor [N, 3, S, S] (square) in [-1, 1].")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    unet, te, vae = pipe.unet, pipe.text_encoder, pipe.vae
    for module in (unet, te, vae):
        module.requires_grad_(False)
    add_inpaint_loras(pipe, config)
    unet_params, te_params = _lora_params(unet, config.adapter_name), _lora_params(te, config.adapter_name)
    for p in unet_params + te_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [{"params": unet_params, "lr": config.unet_learning_rate},
         {"params": te_params, "lr": config.text_encoder_learning_rate}],
        betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8)
    losses = []
    unet.train()
    te.train()
    for _ in range(config.steps):
        pick = torch.randint(0, images.shape[0], (config.batch_size,), generator=g)
        loss = inpaint_loss(pipe, [training_example(images[i], rng, config) for i in pick.tolist()], g)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet_params + te_params, config.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    unet.eval()
    te.eval()
    for p in unet_params + te_params:
        p.requires_grad_(False)
    if output_dir is not None:
        save_inpaint_lora(pipe, output_dir, config.adapter_name)
    return {"loss": losses, "config": asdict(config)}


def inpaint_loss(pipe, batch: list, generator: torch.Generator) -> torch.Tensor:
    """The official training loss of a batch of ``training_example`` dicts: MSE between the UNet's prediction on
    ``noisy latent ⊕ mask (latent size) ⊕ masked-image latent`` and the scheduler's target (noise), random t."""
    unet, te, vae, tok, scheduler = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer, pipe.scheduler
    device, sf, g = pipe.device, vae.config.scaling_factor, generator
    pixels = torch.stack([b["image"] for b in batch]).to(device, vae.dtype)
    cond = torch.stack([b["conditioning"] for b in batch]).to(device, vae.dtype)
    masks = torch.stack([b["mask"] for b in batch]).to(device, vae.dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(g) * sf
        conditionings = vae.encode(cond).latent_dist.sample(g) * sf
    masks = F.interpolate(masks, size=latents.shape[2:])
    noise = torch.randn(latents.shape, generator=g).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=g).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    ids = tok([b["prompt"] for b in batch], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(device)
    pred = unet(torch.cat([noisy, masks, conditionings], dim=1), t, te(ids)[0]).sample
    return F.mse_loss(pred.float(), diffusion_target(scheduler, latents, noise, t).float())


def evaluate_inpaint_loss(pipe, images: torch.Tensor, config: Optional[InpaintLoraConfig] = None, examples: int = 16,
                          seed: int = 1234) -> float:
    """``inpaint_loss`` on a fixed set of ``examples`` (masks, prompts, noise and timesteps drawn from ``seed``), no
    gradient: the same number before and after training tells whether training lowered the loss."""
    config = config or InpaintLoraConfig()
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    batch = [training_example(images[i % images.shape[0]], rng, config) for i in range(examples)]
    with torch.no_grad():
        return float(inpaint_loss(pipe, batch, g))


def save_inpaint_lora(pipe, output_dir: Union[str, Path], adapter_name: str = "gsvton") -> Path:
    """Save the UNet and text-encoder LoRAs in diffusers' layout (``pytorch_lora_weights.safetensors``, LoRA configs
    as metadata so α ≠ r survives), written to a temporary folder and moved into place (never half-written)."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    for part in ("unet", "text_encoder"):
        if adapter_name not in (getattr(getattr(pipe, part), "peft_config", {}) or {}):
            raise ValueError(f"pipe.{part} has no adapter {adapter_name!r} to save.")
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=adapter_name))
    te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder,
                                                                          adapter_name=adapter_name))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-lora-") as tmp:
        StableDiffusionInpaintPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
            unet_lora_adapter_metadata=pipe.unet.peft_config[adapter_name].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config[adapter_name].to_dict())
        os.replace(Path(tmp) / LORA_FILE, output_dir / LORA_FILE)
    return output_dir / LORA_FILE
