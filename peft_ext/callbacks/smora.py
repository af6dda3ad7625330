"""Re-export of ``peft_ext.tuners.smora.callback`` under its former path."""

from ..tuners.smora.callback import SmoraBiasCallback

__all__ = ["SmoraBiasCallback"]
