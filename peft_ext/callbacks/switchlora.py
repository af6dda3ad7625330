"""Re-export of ``peft_ext.tuners.switchlora.callback`` under its former path."""

from ..tuners.switchlora.callback import SwitchLoraCallback, switch_interval, switch_rate

__all__ = ["SwitchLoraCallback", "switch_interval", "switch_rate"]
