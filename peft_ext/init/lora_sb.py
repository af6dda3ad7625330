"""Re-export of ``peft_ext.tuners.lora_sb.init`` under its former path."""

from ..tuners.lora_sb.init import (
    copy_lora_sb_factors,
    effective_lr,
    estimate_gradients,
    lora_sb_init,
    lora_sb_init_from_trainer,
    sign_update,
)

__all__ = [
    "copy_lora_sb_factors",
    "effective_lr",
    "estimate_gradients",
    "lora_sb_init",
    "lora_sb_init_from_trainer",
    "sign_update",
]
