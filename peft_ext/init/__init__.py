"""Data-driven initialisers that run before training: the paper-faithful LoRA-GA (method-agnostic, for PEFT LoRA) and
LoRA-SB's gradient SVD (which lives in ``peft_ext/tuners/lora_sb/init.py`` and is re-exported here)."""

from ..tuners.lora_sb.init import copy_lora_sb_factors, estimate_gradients, lora_sb_init, lora_sb_init_from_trainer
from .lora_ga import LoraGAInit, apply_lora_ga_offset, estimate_lora_ga_gradients, lora_ga_init, lora_ga_to_lora

__all__ = [
    "LoraGAInit",
    "apply_lora_ga_offset",
    "copy_lora_sb_factors",
    "estimate_gradients",
    "estimate_lora_ga_gradients",
    "lora_ga_init",
    "lora_ga_to_lora",
    "lora_sb_init",
    "lora_sb_init_from_trainer",
]
