"""Optimizers from the reading list, as ``torch.optim.Optimizer`` subclasses plus ``create_*_optimizer`` helpers for
``Trainer(optimizers=(optimizer, scheduler))``:

* ``LoraProAdamW`` — *LoRA-Pro: Are Low-Rank Adapters Properly Optimized?* (ICLR 2025), official code
  https://github.com/mrflogs/LoRA-Pro; for PEFT LoRA and every peft-ext tuner whose spec declares ``ba_shape``.
* ``ALLoRA`` — *ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws* (arXiv 2410.09692), no official code.
* ``SwitchLoraAdamW`` — AdamW with per-row / per-column step counts for SwitchLoRA (*SwitchLoRA: Switched Low-Rank
  Adaptation Can Learn Full-Rank Information*, arXiv 2406.06564), official code https://github.com/asfsdsf/SwitchLoRA.
"""

from .allora import ALLoRA, allora_lora_config, create_allora_optimizer
from .lorapro import LoraProAdamW, create_lorapro_optimizer
from ..tuners.switchlora.optim import SwitchLoraAdamW, create_switchlora_optimizer

__all__ = [
    "ALLoRA",
    "LoraProAdamW",
    "SwitchLoraAdamW",
    "allora_lora_config",
    "create_allora_optimizer",
    "create_lorapro_optimizer",
    "create_switchlora_optimizer",
]
