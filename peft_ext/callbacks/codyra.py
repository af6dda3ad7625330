"""Re-export of ``peft_ext.tuners.codyra.callback`` under its former path."""

from ..tuners.codyra.callback import CoDyRAThresholdCallback, CodyraThresholdCallback

__all__ = ["CoDyRAThresholdCallback", "CodyraThresholdCallback"]
