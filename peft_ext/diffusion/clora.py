"""CLoRA on one diffusers pipeline with N PEFT adapters: a contrastive loss on cross-attention maps that updates the
latent at test time, and masked latent fusion.

Paper: *CLoRA: A Contrastive Approach to Compose Multiple LoRA Models* (https://arxiv.org/abs/2403.19776); official
code https://github.com/gemlab-vt/clora (SD1.5 notebooks). Nothing of the algorithm's constants is confirmed in code
here (the repository was not readable offline): every constant is a field of ``CLoraConfig`` and the defaults follow
the paper's description as summarised in the project's METHODS.md §9.4 — UNCERTAIN.

Per denoising step, one batched UNet call runs every pass: the base model on the base prompt and adapter i on its own
prompt (PEFT's per-sample ``adapter_names``, ``'__base__'`` = no adapter), each with its CFG pair. Cross-attention maps
of the concept tokens (conditional rows, at ``map_resolution``, averaged over layers and heads) feed

* the contrastive loss (InfoNCE, cosine similarity, temperature τ): the maps of one concept across passes are
  positives of each other, the maps of other concepts negatives; ``z_t <- z_t - step_size·∇L`` at every step below
  ``max_update_step`` (and ``refine_iterations`` times at ``refine_steps``);
* masked latent fusion: after the scheduler step of every pass, ``z = Σ_i M_i ⊙ z^{L_i} / max(1, Σ_i M_i)
  + (1 − min(1, Σ_i M_i)) ⊙ z^{base}``, ``M_i`` = adapter i's own concept map (max-normalised) above
  ``mask_threshold``, or masks given by the caller.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .lora_composer import (
    _fail,
    _heads_mean,
    adapters_disabled,
    attention_probs,
    attn_processors,
    check_adapters,
    check_config_kwargs,
    encode_text,
    finish,
    pick_resolution,
    prepare_sampling,
)

BASE = "__base__"  # PEFT's per-sample adapter name for "no adapter"


@dataclass
class CLoraConfig:
    """CLoRA sampler settings; every default is UNCERTAIN (not confirmed in official code)."""

    num_inference_steps: int = field(default=50, metadata={"help": "Denoising steps."})
    guidance_scale: float = field(default=7.5, metadata={"help": "Classifier-free guidance scale."})
    temperature: float = field(default=0.5, metadata={"help": "InfoNCE temperature τ (paper: 0.5)."})
    step_size: float = field(default=20.0, metadata={"help": "Latent update step α (UNCERTAIN)."})
    max_update_step: int = field(default=25, metadata={
        "help": "The latent is updated at steps 0..max_update_step-1 (paper: none after 25)."})
    refine_steps: Sequence[int] = field(default=(0, 10, 20), metadata={
        "help": "Steps with refine_iterations latent updates instead of one (paper: iterations 0, 10, 20)."})
    refine_iterations: int = field(default=3, metadata={"help": "Updates at each refine step (UNCERTAIN)."})
    map_resolution: Optional[int] = field(default=None, metadata={
        "help": "Height of the cross-attention maps used. None: the UNet attention resolution nearest latent "
                "height / 4 (16×16 for SD1.5 at 512², the paper's maps)."})
    mask_threshold: float = field(default=0.5, metadata={
        "help": "Fusion mask M_i = (map / max(map) > threshold) of adapter i's own concept (UNCERTAIN)."})
    fuse: bool = field(default=True, metadata={"help": "Masked latent fusion; False: the base pass's latent."})

    def __post_init__(self):
        owner = "CLoraConfig"
        for name in ("num_inference_steps", "refine_iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(owner, name, v, "an integer >= 1")
        if isinstance(self.max_update_step, bool) or not isinstance(self.max_update_step, int) \
                or self.max_update_step < 0:
            raise _fail(owner, "max_update_step", self.max_update_step, "an integer >= 0")
        for name in ("guidance_scale", "step_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise _fail(owner, name, v, "a number >= 0")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise _fail(owner, "temperature", self.temperature, "a number > 0")
        if not isinstance(self.mask_threshold, (int, float)) or not 0 <= self.mask_threshold < 1:
            raise _fail(owner, "mask_threshold", self.mask_threshold, "a number in [0, 1)")
        steps = self.refine_steps
        if not isinstance(steps, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                           for s in steps):
            raise _fail(owner, "refine_steps", steps, "a list of step indices >= 0")
        self.refine_steps = tuple(steps)
        if not isinstance(self.fuse, bool):
            raise _fail(owner, "fuse", self.fuse, "True or False")
        if self.map_resolution is not None and (isinstance(self.map_resolution, bool)
                                                or not isinstance(self.map_resolution, int) or self.map_resolution < 1):
            raise _fail(owner, "map_resolution", self.map_resolution, "None or an integer >= 1")


def contrastive_loss(maps: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """InfoNCE over attention maps: ``maps`` ``[M, P]`` (one flattened map per row), ``labels`` ``[M]`` concept ids.
    For every anchor a and positive p (same label, p ≠ a), with s = cosine similarity / τ and N(a) the rows of other
    labels: ``−log(exp s(a,p) / (exp s(a,p) + Σ_{n∈N(a)} exp s(a,n)))``; the mean over all (a, p) pairs (0 when there
    is no pair)."""
    if maps.dim() != 2 or labels.shape != maps.shape[:1]:
        raise ValueError("contrastive_loss: maps must be [M, P] and labels [M].")
    sim = F.cosine_similarity(maps[:, None, :], maps[None, :, :], dim=-1) / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=maps.device)
    pos = same & ~eye
    if not bool(pos.any()):
        return maps.new_zeros(())
    neg_sum = torch.where(~same, sim.exp(), torch.zeros_like(sim)).sum(dim=1, keepdim=True)
    terms = -sim + torch.log(sim.exp() + neg_sum)
    return terms[pos].mean()


def fuse_latents(base: torch.Tensor, adapted: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Masked latent fusion ``Σ_i M_i ⊙ z_i / max(1, ΣM) + (1 − min(1, ΣM)) ⊙ z_base`` (masks ``[H, W]`` in [0, 1],
    broadcast over batch and channels): with one adapter and an all-ones mask this is that adapter's latent."""
    total = torch.stack([m.to(base) for m in masks]).sum(0)
    acc = sum(m.to(base) * z for m, z in zip(masks, adapted))
    return acc / total.clamp(min=1) + (1 - total.clamp(max=1)) * base


@contextmanager
def per_sample_adapters(unet, names: Sequence[str]):
    """Route the rows of every UNet batch inside the block to PEFT adapters: row r uses ``names[r % len(names)]``
    (``'__base__'``: none), through PEFT LoRA's own ``adapter_names=`` mixed-batch forward."""
    from peft.tuners.lora import LoraLayer

    handles = []
    names = list(names)

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        rows = [names[r % len(names)] for r in range(x.shape[0])]
        return args, {**kwargs, "adapter_names": rows}

    for m in unet.modules():
        if isinstance(m, LoraLayer):
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class MapRecorder:
    """Attention processor that computes attention explicitly and records cross-attention maps (heads averaged) of
    the layers at one resolution; adapters act through the projections as usual."""

    def __init__(self, latent_hw, resolution):
        self.latent_hw = latent_hw
        self.resolution = resolution
        self.maps: list = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 3 or attention_mask is not None or attn.group_norm is not None:
            raise NotImplementedError("CLoRA's recorder supports transformer-block attention without a mask only.")
        residual = hidden_states
        is_cross = encoder_hidden_states is not None
        context = hidden_states if not is_cross else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attention_probs(attn, query, key)
        H, W = self.latent_hw
        h = int(round(H / (H * W / hidden_states.shape[1]) ** 0.5))
        if is_cross and h == self.resolution:
            self.maps.append(_heads_mean(attn, probs))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _concept_maps(maps: torch.Tensor, groups, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """``maps`` ``[batch, P, tokens]`` -> one map per (concept, pass) with tokens (their mean) and its concept id."""
    out, labels = [], []
    for j, per_pass in enumerate(groups):
        for p, idx in enumerate(per_pass):
            if idx:
                out.append(maps[rows[p]][:, list(idx)].mean(-1))
                labels.append(j)
    return torch.stack(out), torch.tensor(labels, device=maps.device)


def clora_generate(pipe, prompt: str, adapters: Sequence[str], adapter_prompts: Sequence[str],
                   groups: Sequence[Sequence[Sequence[int]]], masks: Optional[Sequence[torch.Tensor]] = None,
                   config: Optional[CLoraConfig] = None, negative_prompt: str = "", generator=None,
                   latents: Optional[torch.Tensor] = None, output_type: str = "latent", **config_kwargs):
    """Sample one image with CLoRA. ``adapters[i]`` runs on ``adapter_prompts[i]``, the base model on ``prompt``.
    ``groups[j][p]``: token positions (tokenized prompt, BOS = 0) of concept j in pass p's prompt (p = 0 base,
    p = i + 1 adapter i); concept i is adapter i's own concept (its fusion mask). ``masks``: fixed fusion masks
    ``[latent H, latent W]`` per adapter instead of attention masks. Returns latents or decoded images."""
    if config is None:
        check_config_kwargs(CLoraConfig, config_kwargs)
        config = CLoraConfig(**config_kwargs)
    elif config_kwargs:
        raise ValueError("Pass either config= or config fields as keywords, not both.")
    adapters, adapter_prompts = list(adapters), list(adapter_prompts)
    if not adapters or len(adapters) != len(adapter_prompts):
        raise ValueError(f"adapters ({len(adapters)}) and adapter_prompts ({len(adapter_prompts)}) must be non-empty "
                         "and of equal length.")
    check_adapters(pipe.unet, adapters, "adapters")
    n_pass = len(adapters) + 1
    tokens = pipe.tokenizer.model_max_length
    if len(groups) < len(adapters) or any(len(g) != n_pass for g in groups) or any(
            not all(isinstance(i, int) and 0 <= i < tokens for i in idx) for g in groups for idx in g):
        raise ValueError(f"groups must hold one entry per concept (at least one per adapter, {len(adapters)}), each a "
                         f"list of {n_pass} token-position lists (base prompt first, then each adapter's prompt) with "
                         f"positions in 0..{tokens - 1}.")
    timesteps, latents, extra = prepare_sampling(pipe, config.num_inference_steps, generator, latents)
    H, W = latents.shape[-2:]
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(adapters) or any(tuple(m.shape) != (H, W) for m in masks):
            raise ValueError(f"masks must be {len(adapters)} tensors of the latent size ({H}, {W}).")
    unet = pipe.unet
    resolution = pick_resolution(unet, H, config.map_resolution, "CLoraConfig.map_resolution")
    h, w = resolution, resolution * W // H
    with adapters_disabled(pipe.text_encoder) if getattr(pipe.text_encoder, "peft_config", None) else _null():
        cond = torch.cat([encode_text(pipe, prompt)] + [encode_text(pipe, p) for p in adapter_prompts])
        uncond = encode_text(pipe, negative_prompt).expand(n_pass, -1, -1)
    names = [BASE] + adapters
    recorder = MapRecorder((H, W), resolution)
    cfg_on = config.guidance_scale > 1.0
    rows_cond = list(range(n_pass))

    def loss_of(x, t):
        recorder.maps = []
        with per_sample_adapters(unet, names):
            unet(pipe.scheduler.scale_model_input(x.expand(n_pass, -1, -1, -1), t), t, encoder_hidden_states=cond)
        maps = torch.stack(recorder.maps).mean(0)  # [n_pass, P, tokens]
        m, labels = _concept_maps(maps, groups, rows_cond)
        return contrastive_loss(m, labels, config.temperature)

    with attn_processors(unet, {name: recorder for name in unet.attn_processors}):
        for i, t in enumerate(timesteps):
            if i < config.max_update_step and config.step_size > 0:
                for _ in range(config.refine_iterations if i in config.refine_steps else 1):
                    with torch.enable_grad():
                        x = latents.detach().requires_grad_(True)
                        loss = loss_of(x, t)
                        if loss.requires_grad:
                            latents = (x - config.step_size * torch.autograd.grad(loss, [x])[0]).detach()
            with torch.no_grad():
                recorder.maps = []
                if cfg_on:
                    x = pipe.scheduler.scale_model_input(latents.expand(2 * n_pass, -1, -1, -1), t)
                    with per_sample_adapters(unet, names):
                        eps = unet(x, t, encoder_hidden_states=torch.cat([uncond, cond]), return_dict=False)[0]
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + config.guidance_scale * (eps_c - eps_u)
                    rows = [n_pass + p for p in range(n_pass)]
                else:
                    x = pipe.scheduler.scale_model_input(latents.expand(n_pass, -1, -1, -1), t)
                    with per_sample_adapters(unet, names):
                        eps = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
                    rows = rows_cond
                stepped = pipe.scheduler.step(eps, t, latents.expand(n_pass, -1, -1, -1), **extra,
                                              return_dict=False)[0]
                if not config.fuse:
                    latents = stepped[:1]
                    continue
                fusion = masks
                if fusion is None:
                    maps = torch.stack(recorder.maps).mean(0)
                    fusion = []
                    for k in range(len(adapters)):
                        own = groups[k][k + 1]
                        if not own:
                            fusion.append(torch.zeros(H, W))
                            continue
                        m = maps[rows[k + 1]][:, list(own)].mean(-1).reshape(1, 1, h, w)
                        m = F.interpolate(m / m.max().clamp_min(1e-12), size=(H, W), mode="nearest")[0, 0]
                        fusion.append((m > config.mask_threshold).float())
                latents = fuse_latents(stepped[:1], [stepped[k + 1:k + 2] for k in range(len(adapters))], fusion)
    return finish(pipe, latents, output_type, generator)


@contextmanager
def _null():
    yield
