"""Re-export of ``peft_ext.tuners.dylora.callback`` under its former path."""

from ..tuners.dylora.callback import DyLoraRankSampler

__all__ = ["DyLoraRankSampler"]
