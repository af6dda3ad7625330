"""Trainer callbacks that drive method schedules; each also has a plain ``step()`` for hand-written loops."""

from .dylora import DyLoraRankSampler
from .lisa import LisaCallback

__all__ = ["DyLoraRankSampler", "LisaCallback"]
