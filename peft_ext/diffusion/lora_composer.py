"""LoRA-Composer on one diffusers pipeline with N PEFT adapters: region-aware cross-attention, concept isolation,
latent re-initialisation and latent optimisation, as diffusers attention processors.

Paper: *LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept Customization in Training-Free Diffusion
Models* (https://arxiv.org/abs/2403.11627); official code https://github.com/Young98CN/LoRA_Composer
(``region_lora/multi_lora_sample.py``: ``register_region_aware_attention``, ``replace_latents``,
``_compute_max_attention_per_index``, ``_compute_loss``). The official code keeps one pipeline per concept in memory
(a diffusers 0.14 fork); here every concept is a named PEFT adapter on the one ``pipe.unet``.

What a concept's adapter does, as in the official code: only the cross-attention ``to_k`` / ``to_v`` / ``to_out.0`` of
the concept's adapter are used, inside the concept's box, on the concept's region prompt; the query, the
self-attention and every other layer are the base model's. Pixels outside every box keep the base cross-attention
(global prompt); pixels inside several boxes average the boxes' outputs.

The pieces are plain functions (``isolation_bias``, ``reinit_latents``, ``composer_loss``, ``box_pixels``) so that
they can be checked on hand-built inputs; ``lora_composer_generate`` runs the whole sampler.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ISOLATION_VALUE = -1e6  # the official key penalty for other concepts' boxes in self-attention


def _fail(owner: str, name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{owner}.{name}={value!r} is invalid; allowed: {allowed}.")


# --------------------------------------------------------------------------------------------------------------------
# configuration
@dataclass
class ComposerConcept:
    """One concept of a LoRA-Composer layout: its adapter, its box and its region prompt."""

    adapter: str = field(metadata={"help": "Name of the concept's PEFT adapter on pipe.unet (diffusers' "
                                           "load_lora_weights(..., adapter_name=...) or unet.add_adapter)."})
    box: tuple = field(metadata={"help": "(top, left, bottom, right) in [0, 1], fractions of the image height / "
                                         "width (the official (start_h, start_w, end_h, end_w)); a feature map of "
                                         "h×w covers rows ceil(top·h)..floor(bottom·h)-1, likewise columns."})
    prompt: str = field(metadata={"help": "Region prompt encoded for this concept's keys/values, e.g. 'a <cat1> cat'."})
    token_indices: Sequence[int] = field(
        default=(),
        metadata={"help": "Positions of the concept's tokens in the tokenized region prompt (BOS = 0), used by the "
                          "latent re-initialisation and the latent-optimisation loss (see token_positions). Empty: "
                          "both are skipped for this concept."})
    negative_prompt: str = field(default="", metadata={"help": "Region prompt of the unconditional CFG half."})

    def __post_init__(self):
        owner = "ComposerConcept"
        if not isinstance(self.adapter, str) or not self.adapter:
            raise _fail(owner, "adapter", self.adapter, "a non-empty adapter name")
        box = self.box
        if (not isinstance(box, (tuple, list)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
                or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1)):
            raise _fail(owner, "box", box, "(top, left, bottom, right) with 0 <= top < bottom <= 1 and "
                                           "0 <= left < right <= 1")
        self.box = tuple(float(v) for v in box)
        if not isinstance(self.prompt, str):
            raise _fail(owner, "prompt", self.prompt, "a string")
        if not isinstance(self.negative_prompt, str):
            raise _fail(owner, "negative_prompt", self.negative_prompt, "a string")
        idx = self.token_indices
        if not isinstance(idx, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                         for i in idx):
            raise _fail(owner, "token_indices", idx, "a list of token positions >= 0")
        self.token_indices = tuple(idx)


@dataclass
class LoraComposerConfig:
    """Sampler settings of LoRA-Composer; the defaults are the official ones (``multi_lora_sample.py``)."""

    num_inference_steps: int = field(default=50, metadata={"help": "Denoising steps (official 50)."})
    guidance_scale: float = field(default=7.5, metadata={"help": "Classifier-free guidance scale (official 7.5)."})
    isolation: bool = field(default=True, metadata={
        "help": "Concept isolation: in self-attention, queries inside box k get isolation_value added on keys inside "
                "the other concepts' boxes (official self_attn_mask=True)."})
    isolation_value: Optional[float] = field(default=None, metadata={
        "help": "The key penalty; None: the official -1e6, clamped to the dtype's lowest finite value (fp16)."})
    reinit: bool = field(default=True, metadata={
        "help": "Latent re-initialisation before the first step: per concept, the box-sized latent patch with the "
                "highest summed token attention is copied into the box, then the latent is renormalised."})
    optimize: bool = field(default=True, metadata={
        "help": "Latent optimisation: z <- z - step_size·sqrt(linspace(1, 0.5, T)[i])·grad(loss) before step i, "
                "until the loss rises after min_optimize_step or at max_optimize_step."})
    step_size: float = field(default=20.0, metadata={"help": "Latent-optimisation step size (official 20)."})
    min_optimize_step: int = field(default=5, metadata={
        "help": "From this step on a rising loss stops the optimisation (official 5)."})
    max_optimize_step: int = field(default=25, metadata={
        "help": "The optimisation runs at steps 0..max_optimize_step (it stops after this step; official 25)."})
    fg_weight: float = field(default=8.0, metadata={
        "help": "Weight of the concept-enhancement term max(0, 1 - top-k mean of in-box token attention) "
                "(official 8)."})
    bg_weight: float = field(default=10.0, metadata={
        "help": "Weight of the region term: top-k mean of self-attention from box queries to outside keys "
                "(official 10; the paper's equation has no weight)."})
    fill_weight: float = field(default=2.0, metadata={
        "help": "Weight of each fill term: L1 between the max-projection of in-box attention on x (and y) and the "
                "box's projection (official 2)."})
    top_k_ratio: float = field(default=0.2, metadata={
        "help": "k = floor(box area · ratio), at least 1 (official 0.2)."})
    smooth_sigma: float = field(default=0.5, metadata={
        "help": "Gaussian smoothing σ of the token maps (official 0.5)."})
    smooth_kernel: int = field(default=3, metadata={"help": "Gaussian smoothing kernel size, odd (official 3)."})
    gaussian_weighting: bool = field(default=True, metadata={
        "help": "Weight the in-box token map by a box-sized Gaussian (peak 1) before the top-k (official "
                "gassion_sample=True)."})
    loss_resolution: Optional[int] = field(default=None, metadata={
        "help": "Height of the attention maps the loss and re-initialisation use. None: the UNet attention resolution "
                "nearest latent height / 4 (16 for SD1.5 at 512², as the official attention store)."})

    def __post_init__(self):
        owner = "LoraComposerConfig"
        for name in ("num_inference_steps", "smooth_kernel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(owner, name, v, "an integer >= 1")
        if self.smooth_kernel % 2 == 0:
            raise _fail(owner, "smooth_kernel", self.smooth_kernel, "an odd integer")
        for name in ("min_optimize_step", "max_optimize_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _fail(owner, name, v, "an integer >= 0")
        for name in ("guidance_scale", "step_size", "fg_weight", "bg_weight", "fill_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise _fail(owner, name, v, "a number >= 0")
        if isinstance(self.top_k_ratio, bool) or not isinstance(self.top_k_ratio, (int, float)) \
                or not 0 < self.top_k_ratio <= 1:
            raise _fail(owner, "top_k_ratio", self.top_k_ratio, "a number in (0, 1]")
        if not isinstance(self.smooth_sigma, (int, float)) or isinstance(self.smooth_sigma, bool) \
                or not self.smooth_sigma > 0:
            raise _fail(owner, "smooth_sigma", self.smooth_sigma, "a number > 0")
        for name in ("isolation", "reinit", "optimize", "gaussian_weighting"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(owner, name, getattr(self, name), "True or False")
        if self.isolation_value is not None and (not isinstance(self.isolation_value, (int, float))
                                                 or not self.isolation_value < 0):
            raise _fail(owner, "isolation_value", self.isolation_value, "None or a negative number")
        if self.loss_resolution is not None and (isinstance(self.loss_resolution, bool)
                                                 or not isinstance(self.loss_resolution, int)
                                                 or self.loss_resolution < 1):
            raise _fail(owner, "loss_resolution", self.loss_resolution, "None or an integer >= 1")


def check_config_kwargs(cls, kwargs: dict) -> None:
    """Refuse unknown keyword arguments of a config dataclass with the allowed names (shared by the samplers)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; allowed: {sorted(names)}.")


# --------------------------------------------------------------------------------------------------------------------
# boxes, masks and the official loss pieces
def box_pixels(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    """Rows ``x1:x2`` and columns ``y1:y2`` of ``box`` on an ``h×w`` map: ceil of the start, floor of the end (as the
    official code)."""
    top, left, bottom, right = box
    return math.ceil(top * h), math.ceil(left * w), math.floor(bottom * h), math.floor(right * w)


def box_mask(box: Sequence[float], h: int, w: int, device=None) -> torch.Tensor:
    """Bool ``[h, w]`` mask of ``box``."""
    x1, y1, x2, y2 = box_pixels(box, h, w)
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[x1:x2, y1:y2] = True
    return mask


def isolation_bias(boxes: Sequence[Sequence[float]], h: int, w: int, value: float = ISOLATION_VALUE,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """Self-attention bias ``[h·w (queries), h·w (keys)]`` of concept isolation: for every concept k, queries inside
    box k get ``value`` on the keys inside each other concept's box (summed over those boxes, as the official code;
    a query inside two boxes is penalised on both). Zero elsewhere."""
    masks = [box_mask(b, h, w, device).reshape(-1) for b in boxes]
    bias = torch.zeros(h * w, h * w, dtype=dtype, device=device)
    for k, own in enumerate(masks):
        for j, other in enumerate(masks):
            if j != k:
                bias += (own[:, None] & other[None, :]).to(dtype) * value
    return bias


def gaussian_kernel(kernel_size: int, sigma: float) -> torch.Tensor:
    """The Attend-and-Excite / official smoothing kernel ``[k, k]``: ∝ exp(-((x - mean) / (2σ))²) per axis, summing
    to 1 (note the official 2σ in the exponent's denominator)."""
    ax = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    g = torch.exp(-((ax / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def smooth_map(image: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian smoothing of a ``[h, w]`` map with reflect padding (official ``smooth_attentions``)."""
    pad = (kernel_size - 1) // 2
    kernel = gaussian_kernel(kernel_size, sigma).to(image)
    x = F.pad(image[None, None], (pad, pad, pad, pad), mode="reflect" if min(image.shape) > pad else "replicate")
    return F.conv2d(x, kernel[None, None])[0, 0]


def box_gaussian(bh: int, bw: int) -> torch.Tensor:
    """The official in-box weighting: exp(-(x²/2 + y²/2)) on a linspace(-1, 1) grid of the box, divided by its max."""
    x, y = torch.meshgrid(torch.linspace(-1, 1, bh), torch.linspace(-1, 1, bw), indexing="ij")
    g = torch.exp(-(x ** 2 / 2 + y ** 2 / 2))
    return g / g.max()


def composer_loss(cross_maps: Sequence[torch.Tensor], self_map: torch.Tensor, boxes: Sequence[Sequence[float]],
                  token_indices: Sequence[Sequence[int]], config: Optional[LoraComposerConfig] = None) -> torch.Tensor:
    """LoRA-Composer's latent-optimisation loss (official ``_compute_max_attention_per_index`` + ``_compute_loss``).

    ``cross_maps[k]``: ``[h, w, tokens]`` region cross-attention of concept k (its adapter's keys, all pixels as
    queries), averaged over layers and heads; ``self_map``: ``[h·w, h·w]`` self-attention averaged likewise.
    For concept k with box B_k (area a_k, k_top = max(1, floor(a_k·ratio))) and each of its tokens i (map m smoothed):
    ``fg_weight·max(0, 1 − topk_mean(m ⊙ G_k))`` (G_k = box Gaussian inside B_k, 0 outside), plus
    ``fill_weight·(L1(max_rows(m ⊙ B_k), max_rows(B_k)) + L1(max_cols(m ⊙ B_k), max_cols(B_k)))``; per concept
    ``bg_weight·topk_mean(self_map[B_k queries, keys outside B_k])``. Returns the sum."""
    cfg = config or LoraComposerConfig()
    total = self_map.new_zeros(())
    for maps, box, tokens in zip(cross_maps, boxes, token_indices):
        h, w = maps.shape[0], maps.shape[1]
        x1, y1, x2, y2 = box_pixels(box, h, w)
        obj = box_mask(box, h, w, maps.device).to(maps.dtype)
        k_top = max(1, int(float(obj.sum()) * cfg.top_k_ratio))
        weight = obj.clone()
        if cfg.gaussian_weighting and x2 > x1 and y2 > y1:
            weight[x1:x2, y1:y2] = box_gaussian(x2 - x1, y2 - y1).to(weight)
        for i in tokens:
            image = smooth_map(maps[:, :, i], cfg.smooth_kernel, cfg.smooth_sigma)
            fg = (image * weight).reshape(-1).topk(k_top).values.mean()
            total = total + cfg.fg_weight * torch.clamp(1.0 - fg, min=0.0)
            if cfg.fill_weight:
                inside = image * obj
                total = total + cfg.fill_weight * F.l1_loss(inside.max(dim=0).values, obj.max(dim=0).values)
                total = total + cfg.fill_weight * F.l1_loss(inside.max(dim=1).values, obj.max(dim=1).values)
        if cfg.bg_weight and tokens:
            own = obj.reshape(-1) > 0
            rows = self_map[own][:, ~own]
            if rows.numel():
                total = total + cfg.bg_weight * rows.reshape(-1).topk(min(k_top, rows.numel())).values.mean()
    return total


def reinit_latents(latents: torch.Tensor, cross_maps: Sequence[torch.Tensor], boxes: Sequence[Sequence[float]],
                   token_indices: Sequence[Sequence[int]]) -> torch.Tensor:
    """Latent re-initialisation (official ``replace_latents`` with n=1): for each concept, the token maps
    (``[h, w, tokens]``) summed over its tokens are convolved with a box-sized box filter; the latent patch at the
    best position is copied into the concept's box (patches read from the original latents); finally the whole latent
    is renormalised to the original mean and std."""
    out = latents.detach().clone()
    for maps, box, tokens in zip(cross_maps, boxes, token_indices):
        if not tokens:
            continue
        h, w = maps.shape[0], maps.shape[1]
        scale = latents.shape[-1] // w
        x1, y1, x2, y2 = box_pixels(box, h, w)
        if x2 <= x1 or y2 <= y1:
            continue
        kernel = torch.ones(1, 1, x2 - x1, y2 - y1, dtype=maps.dtype, device=maps.device)
        score = sum(F.conv2d(maps[:, :, i][None, None], kernel) for i in tokens)
        best = int(score.reshape(-1).argmax())
        tx, ty = divmod(best, score.shape[-1])
        patch = latents[:, :, tx * scale:(tx + x2 - x1) * scale, ty * scale:(ty + y2 - y1) * scale]
        out[:, :, x1 * scale:x2 * scale, y1 * scale:y2 * scale] = patch
    return (out - out.mean()) / out.std() * latents.std() + latents.mean()


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in ``tokenizer(prompt)`` (BOS included as position 0); a ValueError when the
    word's token sequence does not occur."""
    ids = tokenizer(prompt).input_ids
    sub = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(sub) + 1):
        if sub and ids[start:start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise ValueError(f"word {word!r} (tokens {sub}) does not occur in prompt {prompt!r} (tokens {ids}).")


# --------------------------------------------------------------------------------------------------------------------
# adapters inside attention processors
def linear_with_adapter(module, x: torch.Tensor, adapter: Optional[str] = None) -> torch.Tensor:
    """``module(x)`` with exactly one PEFT LoRA adapter (or none: the base layer), whatever adapters are active or
    disabled on the model. A module the adapter does not target gives its base output."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    out = base(x)
    if adapter is None or not isinstance(module, LoraLayer) or adapter not in module.lora_A:
        return out
    if module.use_dora.get(adapter, False):
        raise NotImplementedError(f"adapter {adapter!r} is a DoRA adapter; LoRA-Composer / CLoRA use plain LoRA.")
    A, B = module.lora_A[adapter], module.lora_B[adapter]
    delta = B(A(module.lora_dropout[adapter](x.to(A.weight.dtype)))) * module.scaling[adapter]
    return out + delta.to(out.dtype)


def unet_adapters(unet) -> set:
    """Names of the PEFT adapters on a diffusers UNet."""
    return set(getattr(unet, "peft_config", {}) or {})


def check_adapters(unet, names: Sequence[str], field_name: str) -> None:
    """ValueError naming ``field_name`` when an adapter is not on the UNet."""
    have = unet_adapters(unet)
    missing = [n for n in names if n not in have]
    if missing:
        raise ValueError(f"{field_name}: adapter(s) {missing} are not on pipe.unet; its adapters: {sorted(have)}. "
                         "Load them with pipe.load_lora_weights(..., adapter_name=...) first.")


@contextmanager
def adapters_disabled(module):
    """Every PEFT adapter layer inside ``module`` switched off (the base model), restoring each layer's flag and its
    parameters' ``requires_grad`` afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    flags = [m.disable_adapters for m in layers]
    grads = {p: p.requires_grad for m in layers for p in m.parameters()}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, flag in zip(layers, flags):
            m.enable_adapters(not flag)
        for p, g in grads.items():
            p.requires_grad_(g)


@contextmanager
def attn_processors(unet, processors: dict):
    """Install ``processors`` (name -> processor) on ``unet`` and restore the previous ones afterwards."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({**previous, **processors})
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


def attention_resolutions(unet, latent_h: int) -> list[int]:
    """Feature-map heights at which the UNet runs attention for a latent of height ``latent_h``."""
    types = unet.config.down_block_types
    out = {latent_h // 2 ** i for i, t in enumerate(types) if "Attn" in t}
    if "Attn" in (unet.config.mid_block_type or "UNetMidBlock2DCrossAttn"):
        out.add(latent_h // 2 ** (len(types) - 1))
    return sorted(out, reverse=True)


def pick_resolution(unet, latent_h: int, wanted: Optional[int], field_name: str) -> int:
    """``wanted`` if attention runs at that height, None -> the one nearest ``latent_h / 4``; else a ValueError."""
    have = attention_resolutions(unet, latent_h)
    if wanted is None:
        return min(have, key=lambda r: (abs(r - latent_h / 4), -r))
    if wanted not in have:
        raise ValueError(f"{field_name}={wanted}: the UNet runs attention at heights {have} for this latent size.")
    return wanted


def _split_heads(attn, x: torch.Tensor) -> torch.Tensor:
    return attn.head_to_batch_dim(x)


def attention_probs(attn, query: torch.Tensor, key: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """softmax(q·kᵀ·scale + bias) for ``[batch·heads, n, d]`` tensors, in fp32 when the module upcasts."""
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    scores = torch.baddbmm(
        torch.zeros(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device)
        if bias is None else bias.to(query.dtype).expand(query.shape[0], -1, -1),
        query, key.transpose(-1, -2), beta=0 if bias is None else 1, alpha=attn.scale)
    if attn.upcast_softmax:
        scores = scores.float()
    return scores.softmax(dim=-1).to(dtype)


def _heads_mean(attn, probs: torch.Tensor) -> torch.Tensor:
    """``[batch·heads, n, m]`` -> ``[batch, n, m]`` averaged over heads."""
    return probs.reshape(-1, attn.heads, probs.shape[1], probs.shape[2]).mean(dim=1)


# --------------------------------------------------------------------------------------------------------------------
# the attention processor
class _ComposerState:
    """What the processors read during one sampler call (set by ``lora_composer_generate``)."""

    def __init__(self, concepts, config, latent_hw, resolution):
        self.concepts = concepts
        self.config = config
        self.latent_hw = latent_hw
        self.resolution = resolution
        self.regions: list = []  # per concept: region-prompt embeddings for the current batch
        self.record = False
        self.cross: list = [[] for _ in concepts]  # per concept: region maps [batch, hw, tokens] at the resolution
        self.self_maps: list = []
        self._bias: dict = {}

    def hw(self, seq: int) -> tuple[int, int]:
        H, W = self.latent_hw
        down = math.sqrt(H * W / seq)
        return int(round(H / down)), int(round(W / down))

    def bias(self, h, w, device, dtype):
        key = (h, w, device, dtype)
        if key not in self._bias:
            value = self.config.isolation_value
            if value is None:
                value = max(ISOLATION_VALUE, torch.finfo(dtype).min / max(1, len(self.concepts)))
            self._bias[key] = isolation_bias([c.box for c in self.concepts], h, w, value, device, dtype)
        return self._bias[key]


class LoraComposerAttnProcessor:
    """Attention processor of LoRA-Composer: base self-attention with concept isolation, base cross-attention
    outside the boxes and each concept's adapter (its ``to_k``/``to_v``/``to_out.0`` on its region prompt) inside its
    box; it records the attention maps the re-initialisation and the loss use."""

    def __init__(self, state: _ComposerState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        st = self.state
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None \
                or attention_mask is not None:
            raise NotImplementedError("LoRA-Composer's processor supports transformer-block attention without an "
                                      "attention mask only (Stable Diffusion's UNet).")
        residual = hidden_states
        is_cross = encoder_hidden_states is not None
        seq = hidden_states.shape[1]
        h, w = st.hw(seq)
        query = _split_heads(attn, linear_with_adapter(attn.to_q, hidden_states))
        context = hidden_states if not is_cross else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
        key = _split_heads(attn, linear_with_adapter(attn.to_k, context))
        value = _split_heads(attn, linear_with_adapter(attn.to_v, context))
        bias = None
        if not is_cross and st.config.isolation and len(st.concepts) > 1:
            bias = st.bias(h, w, query.device, query.dtype)
        probs = attention_probs(attn, query, key, bias)
        if st.record and not is_cross and h == st.resolution:
            st.self_maps.append(_heads_mean(attn, probs))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](linear_with_adapter(attn.to_out[0], out))
        if is_cross and st.concepts:
            out = self._region_rewrite(attn, query, out, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _region_rewrite(self, attn, query, base_out, h, w):
        st = self.state
        masks = [box_mask(c.box, h, w, base_out.device).reshape(-1) for c in st.concepts]
        count = torch.stack(masks).sum(0)
        new = torch.where((count == 0)[None, :, None], base_out, torch.zeros_like(base_out))
        for k, (concept, mask) in enumerate(zip(st.concepts, masks)):
            embeds = st.regions[k]
            rk = _split_heads(attn, linear_with_adapter(attn.to_k, embeds, concept.adapter))
            rv = _split_heads(attn, linear_with_adapter(attn.to_v, embeds, concept.adapter))
            if st.record and h == st.resolution:
                st.cross[k].append(_heads_mean(attn, attention_probs(attn, query, rk)))
            if not bool(mask.any()):
                continue
            idx = mask.nonzero().squeeze(-1)
            probs = attention_probs(attn, query[:, idx], rk)
            region = attn.batch_to_head_dim(torch.bmm(probs, rv))
            region = attn.to_out[1](linear_with_adapter(attn.to_out[0], region, concept.adapter))
            share = (region / count[idx][None, :, None].to(region.dtype))
            new = new.index_add(1, idx, share)
        return new


# --------------------------------------------------------------------------------------------------------------------
# the sampler
@contextmanager
def text_encoder_adapter(pipe, adapter: Optional[str]):
    """Encode with ``adapter`` active on the text encoder when it has that adapter, else with its adapters off (the
    base text encoder, as the official code encodes the global prompt)."""
    te = pipe.text_encoder
    have = set(getattr(te, "peft_config", {}) or {})
    if not have:
        yield
        return
    if adapter in have:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in te.modules() if isinstance(m, BaseTunerLayer)]
        before = [(m.active_adapters, m.disable_adapters) for m in layers]
        for m in layers:
            m.enable_adapters(True)
            m.set_adapter(adapter)
        try:
            yield
        finally:
            for m, (active, disabled) in zip(layers, before):
                m.set_adapter(active)
                m.enable_adapters(not disabled)
        return
    with adapters_disabled(te):
        yield


def encode_text(pipe, text: str, adapter: Optional[str] = None) -> torch.Tensor:
    """``[1, tokens, dim]`` text-encoder states of ``text`` (padded to the tokenizer's length, as the pipeline)."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(pipe.device)
    with text_encoder_adapter(pipe, adapter), torch.no_grad():
        return pipe.text_encoder(ids)[0]


def prepare_sampling(pipe, num_inference_steps: int, generator=None, latents=None, height=None, width=None):
    """Timesteps, initial latents and scheduler kwargs exactly as ``StableDiffusionPipeline.__call__`` makes them."""
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.scheduler.set_timesteps(num_inference_steps, device=pipe.device)
    latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width, pipe.unet.dtype, pipe.device,
                                   generator, latents)
    return pipe.scheduler.timesteps, latents, pipe.prepare_extra_step_kwargs(generator, 0.0)


def finish(pipe, latents: torch.Tensor, output_type: str, generator=None):
    """``latents`` as they are (``output_type='latent'``) or decoded by the VAE and post-processed by the pipeline."""
    if output_type == "latent":
        return latents
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def _mean_maps(maps: list, h: int, w: int) -> torch.Tensor:
    """Per-layer ``[1, hw, m]`` maps -> their mean ``[h, w, m]`` (batch 1)."""
    return torch.stack(maps).mean(0)[0].reshape(h, w, -1)


def lora_composer_generate(pipe, prompt: str, concepts: Sequence[ComposerConcept],
                           config: Optional[LoraComposerConfig] = None, negative_prompt: str = "", generator=None,
                           latents: Optional[torch.Tensor] = None, output_type: str = "latent", **config_kwargs):
    """Sample one image with LoRA-Composer from ``pipe`` (a ``StableDiffusionPipeline`` whose UNet holds every
    concept's adapter). ``prompt`` is the global prompt (base model, outside the boxes). Config fields may be passed
    as keywords. Returns the final latents (``output_type='latent'``) or the decoded images."""
    if config is None:
        check_config_kwargs(LoraComposerConfig, config_kwargs)
        config = LoraComposerConfig(**config_kwargs)
    elif config_kwargs:
        raise ValueError("Pass either config= or config fields as keywords, not both.")
    concepts = list(concepts)
    if not all(isinstance(c, ComposerConcept) for c in concepts):
        raise ValueError("concepts must be a list of ComposerConcept.")
    check_adapters(pipe.unet, [c.adapter for c in concepts], "ComposerConcept.adapter")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string; got {type(prompt).__name__}.")
    unet = pipe.unet
    tokens = pipe.tokenizer.model_max_length
    for c in concepts:
        bad = [i for i in c.token_indices if i >= tokens]
        if bad:
            raise ValueError(f"ComposerConcept.token_indices {bad} of adapter {c.adapter!r} are beyond the "
                             f"tokenizer's {tokens} positions.")
    timesteps, latents, extra = prepare_sampling(pipe, config.num_inference_steps, generator, latents)
    latent_hw = tuple(latents.shape[-2:])
    resolution = pick_resolution(unet, latent_hw[0], config.loss_resolution, "LoraComposerConfig.loss_resolution")
    pos = encode_text(pipe, prompt)
    neg = encode_text(pipe, negative_prompt)
    region_pos = [encode_text(pipe, c.prompt, c.adapter) for c in concepts]
    region_neg = [encode_text(pipe, c.negative_prompt, c.adapter) for c in concepts]
    state = _ComposerState(concepts, config, latent_hw, resolution)
    processor = LoraComposerAttnProcessor(state)
    boxes = [c.box for c in concepts]
    token_lists = [list(c.token_indices) for c in concepts]
    h = resolution
    w = resolution * latent_hw[1] // latent_hw[0]
    cfg_on = config.guidance_scale > 1.0

    def run(x, t, embeds, regions, record=False):
        state.regions = regions
        state.record = record
        state.cross = [[] for _ in concepts]
        state.self_maps = []
        return unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]

    with attn_processors(unet, {name: processor for name in unet.attn_processors}), adapters_disabled(unet):
        if config.reinit and any(token_lists):
            with torch.no_grad():
                run(latents, timesteps[0], pos, region_pos, record=True)
            maps = [_mean_maps(m, h, w) for m in state.cross]
            latents = reinit_latents(latents, maps, boxes, token_lists)
        scales = np.linspace(1.0, 0.5, len(timesteps))
        refine, previous = config.optimize and any(token_lists), 1.0e3
        for i, t in enumerate(timesteps):
            if refine:
                with torch.enable_grad():
                    x = latents.detach().requires_grad_(True)
                    run(pipe.scheduler.scale_model_input(x, t), t, pos, region_pos, record=True)
                    loss = composer_loss([_mean_maps(m, h, w) for m in state.cross],
                                         _mean_maps(state.self_maps, h, w).reshape(h * w, h * w), boxes,
                                         token_lists, config)
                    if loss.requires_grad and float(loss.detach()) != 0:
                        grad = torch.autograd.grad(loss, [x])[0]
                        x = x - config.step_size * float(np.sqrt(scales[i])) * grad
                latents = x.detach()
                value = float(loss.detach())
                if (previous < value and i >= config.min_optimize_step) or i >= config.max_optimize_step:
                    refine = False
                else:
                    previous = value
            with torch.no_grad():
                if cfg_on:
                    x = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    regions = [torch.cat([n, p]) for n, p in zip(region_neg, region_pos)]
                    eps_u, eps_c = run(x, t, torch.cat([neg, pos]), regions).chunk(2)
                    eps = eps_u + config.guidance_scale * (eps_c - eps_u)
                else:
                    eps = run(pipe.scheduler.scale_model_input(latents, t), t, pos, region_pos)
                latents = pipe.scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
    return finish(pipe, latents, output_type, generator)
