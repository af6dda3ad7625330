"""TARA (token-aware LoRA) on a diffusers UNet, built on peft-ext's ``gated_lora`` tuner.

Paper: *TARA: Token-Aware LoRA for Composable Personalization in Diffusion Models* (https://arxiv.org/abs/2508.08812);
official code https://github.com/YuqiPeng77/TARA (``tara.py`` ``TARALinearLayer``, ``train_dreambooth_tara_sd.py``,
``utils.py`` ``insert_multi_sd_tara_to_unet``).

A TARA adapter is a ``GatedLoraConfig`` adapter (one branch per concept) on the UNet's attention projections: in the
cross-attention ``to_k`` / ``to_v`` a branch acts only on its concept's rare-token positions (``route_ids`` over the
text tokens, following the CFG batch doubling), everywhere else (``to_q``, ``to_out.0``, self-attention) every branch
is a plain LoRA. The token alignment loss is ``gated_lora``'s (``alignment_loss_weight`` on ``attn2.to_k``); the
official "focus loss" is never added to the loss in the official script and is not implemented here.

* ``tara_config`` / ``add_tara``: the official SD1.5 setting (r=8, α=32, down ~ N(0, 1/r), up = 0).
* ``tara_routes``: per-call token routes for the gated layers (a context manager around UNet / pipeline calls).
* ``train_tara``: DreamBooth-style training of one concept (MSE + token alignment loss).
* ``save_tara`` / ``load_tara`` / ``compose_tara``: files, and multi-concept inference that stacks several concepts'
  adapters into one multi-branch adapter (each k/v branch masked by its own rare token, the rest summed).
* ``tara_generate``: a pipeline call with the right routes for its CFG batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._io import atomic_write, atomic_write_json
from ..tuners.gated_lora import GatedLoraConfig
from ..tuners.gated_lora.layer import GatedLoraLayer
from .lora_composer import check_config_kwargs

TARA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
GATED = r".*attn2\.to_[kv]"  # cross-attention keys / values: the token-aware layers
ALIGNED = r".*attn2\.to_k"  # the official alignment loss reads the cross-attention keys
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def tara_config(concepts: Sequence[str] = ("concept",), r: int = 8, lora_alpha: float = 32,
                alignment_loss_weight: float = 1.0, target_modules: Sequence[str] = TARA_TARGETS,
                **kwargs) -> GatedLoraConfig:
    """``GatedLoraConfig`` of a TARA adapter (the official SD1.5 setting by default; ``kwargs`` go to the config)."""
    return GatedLoraConfig(branches=list(concepts), r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                           gated_modules=GATED, alignment_loss_weight=alignment_loss_weight,
                           alignment_modules=ALIGNED, **kwargs)


def tara_layers(unet, adapter_name: Optional[str] = None) -> list:
    """The gated LoRA layers of ``unet`` (those holding ``adapter_name`` when given)."""
    return [m for m in unet.modules() if isinstance(m, GatedLoraLayer)
            and (adapter_name is None or adapter_name in m.branches)]


def add_tara(unet, config: Optional[GatedLoraConfig] = None, adapter_name: str = "tara",
             official_init: bool = True) -> GatedLoraConfig:
    """Add a TARA adapter to a diffusers UNet (diffusers' ``add_adapter``, so ``set_adapter`` / ``disable_adapters``
    work) and make it the active one. ``official_init``: down ~ N(0, 1/r) per branch as the official
    ``TARALinearLayer`` (diffusers' ``LoRALinearLayer``); False keeps gated_lora's kaiming-uniform."""
    config = config or tara_config()
    if not isinstance(config, GatedLoraConfig):
        raise ValueError(f"add_tara: config must be a GatedLoraConfig (see tara_config); got {type(config).__name__}.")
    unet.add_adapter(config, adapter_name=adapter_name)
    if official_init:
        with torch.no_grad():
            for layer in tara_layers(unet, adapter_name):
                down = layer.gated_lora_down[adapter_name].weight
                for b, rank in enumerate(layer.ranks[adapter_name]):
                    down[layer._slice(adapter_name, b)].normal_(0.0, 1.0 / rank)
    return config


def word_mask(tokenizer, prompts: Sequence[str], word: str) -> torch.Tensor:
    """Bool ``[len(prompts), model_max_length]``: True at every occurrence of ``word``'s token sequence in each
    prompt tokenized as the pipeline does (official ``build_token_masks``)."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word must be a non-empty string; got {word!r}.")
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    sub = torch.tensor(tokenizer(word, add_special_tokens=False).input_ids)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    n = len(sub)
    if n == 0 or n > ids.shape[1]:
        return mask
    windows = ids.unfold(1, n, 1)  # [B, T - n + 1, n]
    hits = (windows == sub).all(-1)
    for j in range(n):
        mask[:, j:j + hits.shape[1]] |= hits
    return mask


def token_routes(tokenizer, prompts: Sequence[str], rare_words: Sequence[str]) -> torch.Tensor:
    """Long ``[len(prompts), tokens]``: concept index b at ``rare_words[b]``'s tokens, -1 elsewhere."""
    routes = torch.full((len(prompts), tokenizer.model_max_length), -1, dtype=torch.long)
    for b, word in enumerate(rare_words):
        mask = word_mask(tokenizer, prompts, word)
        clash = mask & (routes >= 0)
        if bool(clash.any()):
            raise ValueError(f"rare_words: {word!r} overlaps the tokens of another concept's rare word.")
        routes[mask] = b
    return routes


@contextmanager
def tara_routes(unet, route_ids: torch.Tensor, align_mask: Optional[torch.Tensor] = None):
    """Hand per-token routes (``[batch, text tokens]``: branch index, -1 = no concept) and optionally the class-word
    mask of the alignment loss to every gated layer of ``unet`` for the calls inside the block. The batch must be the
    UNet's batch: with classifier-free guidance the pipeline's ``[uncond; cond]`` doubling (see ``cfg_routes``)."""
    layers = tara_layers(unet)
    if not layers:
        raise ValueError("tara_routes: the UNet has no TARA (gated_lora) adapter; add one with add_tara.")
    if not isinstance(route_ids, torch.Tensor) or route_ids.dim() != 2 or route_ids.is_floating_point():
        raise ValueError("route_ids must be an integer tensor [batch, text tokens] (-1 = no concept).")
    # the active TARA adapters route (other TARA adapters on the UNet, e.g. the single concepts a composed adapter was
    # stacked from, may have fewer branches and are not run)
    active = [len(layer.branches[a]) for layer in layers for a in layer.active_adapters if a in layer.branches]
    if not active:
        raise ValueError("tara_routes: no TARA (gated_lora) adapter is active; activate one with "
                         "unet.set_adapters([...]).")
    nb = min(active)
    if int(route_ids.min()) < -1 or int(route_ids.max()) >= nb:
        raise ValueError(f"route_ids must hold -1 or a concept index in 0..{nb - 1}.")
    device = next(unet.parameters()).device
    inputs = {"route_ids": route_ids.long().to(device)}
    if align_mask is not None:
        if align_mask.shape != route_ids.shape or align_mask.dtype != torch.bool:
            raise ValueError(f"align_mask must be a bool tensor of route_ids' shape {tuple(route_ids.shape)}.")
        n_rare, n_cls = int((route_ids >= 0).sum()), int(align_mask.sum())
        if n_rare != n_cls:
            raise ValueError(f"align_mask marks {n_cls} class-word tokens but route_ids routes {n_rare} rare tokens; "
                             "TARA's alignment loss pairs them one to one (use a class word with as many tokens as "
                             "the rare word).")
        inputs["align_mask"] = align_mask.to(device)
    previous = [layer.call_inputs for layer in layers]
    for layer in layers:
        layer.call_inputs = inputs
        layer.aux_losses.clear()
    try:
        yield
    finally:
        for layer, before in zip(layers, previous):
            layer.call_inputs = before


def alignment_loss(unet) -> Optional[torch.Tensor]:
    """TARA's token alignment loss of the last UNet forward inside ``tara_routes(..., align_mask=...)``: the weighted
    per-layer terms ``mean|(base+Δ)[rare] − base[class]|`` averaged over the aligned layers (as the official script
    averages over its ``attn2.to_k`` hooks); None when nothing was recorded."""
    terms = [t for layer in tara_layers(unet) for t in layer.aux_losses]
    return torch.stack([t.float() for t in terms]).mean() if terms else None


def cfg_routes(tokenizer, prompt: str, rare_words: Sequence[str], negative_prompt: str = "",
               num_images_per_prompt: int = 1, do_cfg: bool = True, uncond_routes: str = "own") -> torch.Tensor:
    """Routes for a pipeline call's UNet batch: ``[uncond; cond]`` rows with CFG (the pipeline's order).

    ``uncond_routes='own'``: the unconditional half is routed by the negative prompt's own tokens (usually none);
    ``'copy'``: it gets the conditional prompt's routes, as the official inference broadcasts its mask over the
    doubled batch."""
    if uncond_routes not in ("own", "copy"):
        raise ValueError(f"uncond_routes={uncond_routes!r}; allowed: 'own' or 'copy'.")
    cond = token_routes(tokenizer, [prompt], rare_words).repeat(num_images_per_prompt, 1)
    if not do_cfg:
        return cond
    if uncond_routes == "copy":
        return torch.cat([cond, cond])
    uncond = token_routes(tokenizer, [negative_prompt or ""], rare_words).repeat(num_images_per_prompt, 1)
    return torch.cat([uncond, cond])


def tara_generate(pipe, prompt: str, rare_words: Sequence[str], negative_prompt: str = "",
                  uncond_routes: str = "own", **pipe_kwargs):
    """``pipe(prompt, ...)`` with the active TARA adapter routed by ``rare_words`` (one per branch, in branch order)."""
    if isinstance(rare_words, str):
        rare_words = [rare_words]
    n = pipe_kwargs.get("num_images_per_prompt", 1) or 1
    do_cfg = pipe_kwargs.get("guidance_scale", 7.5) > 1
    routes = cfg_routes(pipe.tokenizer, prompt, rare_words, negative_prompt, n, do_cfg, uncond_routes)
    with tara_routes(pipe.unet, routes):
        return pipe(prompt, negative_prompt=negative_prompt, **pipe_kwargs)


# --------------------------------------------------------------------------------------------------------------------
# files and composition
def tara_state(unet, adapter_name: str) -> tuple[GatedLoraConfig, dict]:
    """(config, {layer name: (down [Σr, in], up [out, Σr])}) of a TARA adapter on ``unet``."""
    config = (getattr(unet, "peft_config", {}) or {}).get(adapter_name)
    if not isinstance(config, GatedLoraConfig):
        raise ValueError(f"adapter {adapter_name!r} is not a TARA (gated_lora) adapter on this UNet.")
    weights = {name: (m.gated_lora_down[adapter_name].weight.detach(), m.gated_lora_up[adapter_name].weight.detach())
               for name, m in unet.named_modules() if isinstance(m, GatedLoraLayer) and adapter_name in m.branches}
    return config, weights


def save_tara(unet, path: Union[str, Path], adapter_name: str = "tara") -> Path:
    """Save a TARA adapter: ``adapter_config.json`` (GatedLoraConfig) and ``adapter_model.safetensors``
    (``<layer>.down`` / ``<layer>.up``); each file written atomically, the weights first."""
    from safetensors.torch import save

    config, weights = tara_state(unet, adapter_name)
    tensors = {}
    for name, (down, up) in weights.items():
        tensors[f"{name}.down"] = down.contiguous().cpu()
        tensors[f"{name}.up"] = up.contiguous().cpu()
    path = Path(path)
    atomic_write(path / WEIGHTS_NAME, lambda f: f.write(save(tensors)), binary=True)
    atomic_write_json(path / CONFIG_NAME, config.to_dict())
    return path


def _read_tara(path: Union[str, Path]) -> tuple[GatedLoraConfig, dict]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{path} is not a saved TARA adapter (needs {CONFIG_NAME} and {WEIGHTS_NAME}).")
    config = GatedLoraConfig.from_pretrained(str(path))
    if not isinstance(config, GatedLoraConfig):
        raise ValueError(f"{path / CONFIG_NAME} is a {type(config).__name__}, not a TARA (gated_lora) config.")
    tensors = load_file(str(path / WEIGHTS_NAME))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return config, {n: (tensors[f"{n}.down"], tensors[f"{n}.up"]) for n in names}


def _install(unet, config: GatedLoraConfig, weights: dict, adapter_name: str) -> None:
    add_tara(unet, config, adapter_name, official_init=False)
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, GatedLoraLayer)
              and adapter_name in m.branches}
    if set(layers) != set(weights):
        raise ValueError(f"TARA weights cover layers {sorted(set(weights) ^ set(layers))[:4]}... that do not match "
                         "this UNet's target layers.")
    with torch.no_grad():
        for name, (down, up) in weights.items():
            layers[name].gated_lora_down[adapter_name].weight.copy_(down)
            layers[name].gated_lora_up[adapter_name].weight.copy_(up)


def load_tara(unet, path: Union[str, Path], adapter_name: str = "tara") -> GatedLoraConfig:
    """Load a TARA adapter saved by ``save_tara`` into ``unet`` under ``adapter_name`` (made active)."""
    config, weights = _read_tara(path)
    _install(unet, config, weights, adapter_name)
    return config


def compose_tara(unet, sources: Sequence[Union[str, Path]], adapter_name: str = "tara_multi") -> GatedLoraConfig:
    """Multi-concept TARA: stack the concepts' adapters (saved folders, or names of TARA adapters on ``unet``) into
    one adapter with one branch per concept, made active. Route each concept by its rare word (``tara_generate``):
    in the cross-attention k/v each branch acts only on its own rare tokens, elsewhere all branches are summed — the
    official ``insert_multi_sd_tara_to_unet`` sum of masked adapters. A branch whose α differs from the first
    concept's has its up-projection rescaled so that its α/r scale is unchanged."""
    if not sources:
        raise ValueError("compose_tara: sources is empty; give saved TARA folders or adapter names.")
    have = set(getattr(unet, "peft_config", {}) or {})
    parts = [tara_state(unet, s) if isinstance(s, str) and s in have else _read_tara(s) for s in sources]
    first = parts[0][0]
    branches, ranks = [], {}
    for cfg, _ in parts:
        for b, rank in zip(cfg.branches, cfg.branch_ranks()):
            if b in ranks:
                raise ValueError(f"compose_tara: concept name {b!r} occurs twice; branch names must be distinct.")
            branches.append(b)
            ranks[b] = rank
        if sorted(cfg.target_modules) != sorted(first.target_modules) or cfg.gated_modules != first.gated_modules:
            raise ValueError("compose_tara: the concepts' adapters target different modules "
                             f"({sorted(cfg.target_modules)} vs {sorted(first.target_modules)}).")
    config = tara_config(branches, r=ranks, lora_alpha=first.lora_alpha,
                         alignment_loss_weight=first.alignment_loss_weight, target_modules=first.target_modules)
    names = set(parts[0][1])
    weights = {}
    for name in names:
        downs, ups = [], []
        for cfg, w in parts:
            if name not in w:
                raise ValueError(f"compose_tara: layer {name!r} is missing from one concept's adapter.")
            down, up = w[name]
            downs.append(down)
            ups.append(up * (cfg.lora_alpha / first.lora_alpha))
        weights[name] = (torch.cat(downs, 0), torch.cat(ups, 1))
    _install(unet, config, weights, adapter_name)
    return config


# --------------------------------------------------------------------------------------------------------------------
# DreamBooth-style training
@dataclass
class TaraTrainConfig:
    """DreamBooth-style TARA training of one concept (official ``train_dreambooth_tara_sd.py`` defaults for SD1.5)."""

    prompt: str = field(default="a photo of sks dog", metadata={"help": "Instance prompt with the rare word."})
    rare_word: str = field(default="sks", metadata={"help": "The concept's rare identifier (route of its branch)."})
    class_word: str = field(default="dog", metadata={
        "help": "Class word of the alignment loss; must tokenize to as many tokens as rare_word."})
    concept: str = field(default="concept", metadata={"help": "Branch name of the concept in the adapter."})
    adapter_name: str = field(default="tara", metadata={"help": "Adapter name on the UNet."})
    steps: int = field(default=1000, metadata={"help": "Optimizer steps (official 1000)."})
    batch_size: int = field(default=1, metadata={"help": "Images per step (official 1)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (official SD1.5 1e-4)."})
    r: int = field(default=8, metadata={"help": "LoRA rank (official 8)."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA α; scale α/r (official 32)."})
    alignment_loss_weight: float = field(default=1.0, metadata={
        "help": "Weight of the token alignment loss (official 1.0; 0 disables)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (official 1.0)."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, noise and timesteps."})

    def __post_init__(self):
        for name in ("prompt", "rare_word", "class_word", "concept", "adapter_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"TaraTrainConfig.{name}={getattr(self, name)!r}; allowed: a non-empty string.")
        for name in ("steps", "batch_size", "r"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TaraTrainConfig.{name}={v!r}; allowed: an integer >= 1.")
        for name in ("learning_rate", "lora_alpha", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"TaraTrainConfig.{name}={v!r}; allowed: a number > 0.")
        if not isinstance(self.alignment_loss_weight, (int, float)) or not self.alignment_loss_weight >= 0:
            raise ValueError(f"TaraTrainConfig.alignment_loss_weight={self.alignment_loss_weight!r}; allowed: >= 0.")


def diffusion_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """The regression target of the scheduler's prediction type (epsilon or v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; allowed: 'epsilon', 'v_prediction'.")


def train_tara(pipe, images: torch.Tensor, config: Optional[TaraTrainConfig] = None, **config_kwargs) -> dict:
    """Train one TARA concept on ``images`` (``[N, 3, H, W]`` in [-1, 1]) with the pipeline's frozen VAE and text
    encoder: ``loss = MSE(ε̂, ε) + alignment_loss_weight · L_align`` (no prior preservation, no focus loss). The adapter
    stays on ``pipe.unet`` (active); returns the per-step ``loss`` / ``mse`` / ``align`` lists."""
    if config is None:
        check_config_kwargs(TaraTrainConfig, config_kwargs)
        config = TaraTrainConfig(**config_kwargs)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError("images must be a float tensor [N, 3, H, W] in [-1, 1].")
    torch.manual_seed(config.seed)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    add_tara(unet, tara_config([config.concept], r=config.r, lora_alpha=config.lora_alpha,
                               alignment_loss_weight=config.alignment_loss_weight), config.adapter_name)
    params = [p for layer in tara_layers(unet, config.adapter_name) for n, p in layer.named_parameters()
              if config.adapter_name in n and "gated_lora_" in n]
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    rare = word_mask(tok, [config.prompt], config.rare_word)
    cls = word_mask(tok, [config.prompt], config.class_word)
    if not bool(rare.any()):
        raise ValueError(f"TaraTrainConfig.rare_word {config.rare_word!r} does not occur in the prompt.")
    if config.alignment_loss_weight and int(rare.sum()) != int(cls.sum()):
        raise ValueError(f"TaraTrainConfig.class_word {config.class_word!r} has {int(cls.sum())} tokens in the prompt "
                         f"but rare_word {config.rare_word!r} has {int(rare.sum())}; the alignment loss pairs them.")
    device = pipe.device
    ids = tok([config.prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        text = te(ids)[0]
    scheduler = pipe.scheduler
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    g = torch.Generator().manual_seed(config.seed)
    history = {"loss": [], "mse": [], "align": []}
    unet.train()
    for step in range(config.steps):
        pick = torch.randint(0, images.shape[0], (config.batch_size,), generator=g)
        with torch.no_grad():
            latents = vae.encode(images[pick].to(device, vae.dtype)).latent_dist.sample(g)
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=g).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        b = config.batch_size
        routes = torch.where(rare.repeat(b, 1), 0, -1)
        align = cls.repeat(b, 1) if config.alignment_loss_weight else None
        with tara_routes(unet, routes, align):
            pred = unet(noisy, t, encoder_hidden_states=text.repeat(b, 1, 1)).sample
            mse = F.mse_loss(pred.float(), diffusion_target(scheduler, latents, noise, t).float())
            align_term = alignment_loss(unet)
        loss = mse + (align_term if align_term is not None else 0.0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        history["loss"].append(float(loss.detach()))
        history["mse"].append(float(mse.detach()))
        history["align"].append(float(align_term.detach()) if align_term is not None else 0.0)
    unet.eval()
    for p in params:
        p.requires_grad_(False)
    history["config"] = asdict(config)
    return history
