"""Trainer callbacks that drive method schedules; each also has a plain ``step()`` for hand-written loops.

``LisaCallback`` is method-agnostic and lives here; the others serve one tuner each and live in its folder
(``peft_ext/tuners/<method>/callback.py``), re-exported here so every callback imports from one place.
"""

from ..tuners.codyra.callback import CoDyRAThresholdCallback, CodyraThresholdCallback
from ..tuners.dylora.callback import DyLoraRankSampler
from ..tuners.smora.callback import SmoraBiasCallback
from ..tuners.switchlora.callback import SwitchLoraCallback
from .lisa import LisaCallback, lisa_parameters

__all__ = [
    "CoDyRAThresholdCallback",  # the name METHODS.md §5.4 uses; an alias of CodyraThresholdCallback
    "CodyraThresholdCallback",
    "DyLoraRankSampler",
    "LisaCallback",
    "SmoraBiasCallback",
    "SwitchLoraCallback",
    "lisa_parameters",  # the parameters a LisaCallback can switch on, for a hand-built optimizer
]
