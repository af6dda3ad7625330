"""Re-export of ``peft_ext.tuners.switchlora.optim`` under its former path."""

from ..tuners.switchlora.optim import SwitchLoraAdamW, create_switchlora_optimizer

__all__ = ["SwitchLoraAdamW", "create_switchlora_optimizer"]
