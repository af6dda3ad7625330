"""Multi-LoRA composition for text-to-image diffusion on diffusers' PEFT backend: one pipeline, N adapters.

Needs the ``diffusion`` extra (diffusers). One file per method; ``tiny`` builds offline test pipelines. The names below
import lazily, so ``import peft_ext.diffusion`` works without diffusers installed until one of them is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CompositionResult": "compose", "LoraSwitchCallback": "compose", "merge": "compose", "switch": "compose",
    "composite": "compose", "save_unet_lora": "compose", "count_unet_evals": "compose",
    "CMLoRAConfig": "cmlora", "cmlora": "cmlora", "cmlora_schedule": "cmlora", "dominant_weights": "cmlora",
    "frequency_metric": "cmlora", "lora_frequency_metrics": "cmlora", "order_by_frequency": "cmlora",
    "refresh_steps": "cmlora",
    "tiny_pipeline": "tiny", "add_random_lora": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
