"""Trainer callbacks that drive method schedules; each also has a plain ``step()`` for hand-written loops.

The classes load on first access (``peft_ext.callbacks.LisaCallback``): a method folder imports its own callback
module for its ``MethodSpec``, and the callback modules import their method folders, so importing all of them here
eagerly would be circular.
"""

import importlib

_MODULES = {
    "CodyraThresholdCallback": "codyra",
    "CoDyRAThresholdCallback": "codyra",  # the name METHODS.md §5.4 uses; an alias of CodyraThresholdCallback
    "DyLoraRankSampler": "dylora",
    "LisaCallback": "lisa",
    "SmoraBiasCallback": "smora",
    "SwitchLoraCallback": "switchlora",
    "lisa_parameters": "lisa",  # the parameters a LisaCallback can switch on, for a hand-built optimizer
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'peft_ext.callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
