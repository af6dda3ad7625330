"""Adapter generators: ICM-LoRA (a conditional VAE that generates LoRA adapters), ICM-Fusion (our multi-task design on
top of it) and Trans-LoRA (data-free transfer of an adapter to another base model). Each returns ordinary PEFT LoRA
adapters (state dicts, or folders ``PeftModel.from_pretrained`` loads)."""

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
from .translora import (
    TransLoraConfig,
    filter_synthetic,
    generate_synthetic,
    label_with_teacher,
    train_discriminator,
    train_student,
    transfer,
)

__all__ = [
    "AdapterLayout",
    "IcmLoraConfig",
    "IcmLoraGenerator",
    "LoraCVAE",
    "TransLoraConfig",
    "denormalize_adapter",
    "filter_synthetic",
    "fuse_conditions",
    "generate_synthetic",
    "icm_fusion",
    "label_with_teacher",
    "normalize_adapter",
    "save_lora_folder",
    "task_condition",
    "train_discriminator",
    "train_lora_cvae",
    "train_student",
    "transfer",
]
