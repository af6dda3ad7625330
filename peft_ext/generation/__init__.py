"""Adapter generators: ICM-LoRA (a conditional VAE that generates LoRA adapters) and ICM-Fusion (our multi-task
design on top of it). Each returns ordinary PEFT LoRA adapters (state dicts, or folders ``PeftModel.from_pretrained``
loads)."""

from .icm import (
    AdapterLayout,
    IcmLoraConfig,
    IcmLoraGenerator,
    LoraCVAE,
    denormalize_adapter,
    fuse_conditions,
    icm_fusion,
    normalize_adapter,
    save_lora_folder,
    task_condition,
    train_lora_cvae,
)

__all__ = [
    "AdapterLayout",
    "IcmLoraConfig",
    "IcmLoraGenerator",
    "LoraCVAE",
    "denormalize_adapter",
    "fuse_conditions",
    "icm_fusion",
    "normalize_adapter",
    "save_lora_folder",
    "task_condition",
    "train_lora_cvae",
]
