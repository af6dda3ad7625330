"""Data-driven initialisers that run before training: LoRA-SB's gradient SVD and the paper-faithful LoRA-GA."""

from .lora_ga import LoraGAInit, apply_lora_ga_offset, estimate_lora_ga_gradients, lora_ga_init, lora_ga_to_lora
from .lora_sb import copy_lora_sb_factors, estimate_gradients, lora_sb_init, lora_sb_init_from_trainer

__all__ = [
    "LoraGAInit",
    "apply_lora_ga_offset",
    "estimate_lora_ga_gradients",
    "lora_ga_init",
    "lora_ga_to_lora","copy_lora_sb_factors", "estimate_gradients", "lora_sb_init", "lora_sb_init_from_trainer"]
