"""Trainer callbacks that drive method schedules; each also has a plain ``step()`` for hand-written loops."""

from .dylora import DyLoraRankSampler

__all__ = ["DyLoraRankSampler"]
