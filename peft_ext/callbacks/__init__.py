"""Trainer callbacks that drive method schedules; each also has a plain ``step()`` for hand-written loops.

The classes load on first access (``peft_ext.callbacks.LisaCallback``): a method folder imports its own callback
module for its ``MethodSpec``, and the callback modules import their method folders, so importing all of them here
eagerly would be circular.
"""

import importlib

_MODULES = {
    "CodyraThresholdCallback": "codyra",
    "DyLoraRankSampler": "dylora",
    "LisaCallback": "lisa",
    "SmoraBiasCallback": "smora",
    "SwitchLoraCallback": "switchlora",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'peft_ext.callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
