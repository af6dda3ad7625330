"""DyLoRA model: injects ``DyLoraLinear`` layers and exposes ``set_rank``.

Paper: *DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation*
(https://arxiv.org/abs/2210.07558). Official code: https://github.com/huawei-noah/Efficient-NLP (DyLoRA/).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .._shared.base import ExtModel
from .layer import DyLoraLayer, DyLoraLinear


def dylora_layers(model: nn.Module) -> list[DyLoraLayer]:
    """All DyLoRA layers inside ``model`` (a PeftModel, a DyLoraModel or any module holding them)."""
    return [m for m in model.modules() if isinstance(m, DyLoraLayer)]


def max_rank(model: nn.Module, adapter_name: Optional[str] = None) -> int:
    """The largest rank ``r`` of the DyLoRA adapter ``adapter_name`` (default: each layer's active adapters)."""
    ranks = [
        layer.r[name]
        for layer in dylora_layers(model)
        for name in ([adapter_name] if adapter_name else layer.active_adapters)
        if name in layer.r
    ]
    if not ranks:
        raise ValueError(f"The model has no DyLoRA adapter {adapter_name or '(active)'}.")
    return max(ranks)


def set_rank(model: nn.Module, rank: Optional[int], adapter_name: Optional[str] = None, training_only: bool = False):
    """Set the DyLoRA rank of every layer of ``model`` for ``adapter_name`` (default: the active adapters).

    ``training_only=True`` sets the sampled training rank (``None`` clears it); otherwise it sets the evaluation and
    merge rank and records it in the adapter's config so that ``save_pretrained`` keeps it. Changing the rank of a
    merged adapter is an error: unmerge first."""
    layers = dylora_layers(model)
    if not layers:
        raise ValueError("set_rank: the model has no DyLoRA layers.")
    touched = set()
    for layer in layers:
        for name in [adapter_name] if adapter_name else layer.active_adapters:
            if name in layer.r:
                layer.set_rank(name, rank, training_only=training_only)
                touched.add(name)
    if adapter_name and adapter_name not in touched:
        raise ValueError(f"set_rank: adapter_name {adapter_name!r} is not a DyLoRA adapter of this model.")
    if not training_only:
        configs = getattr(model, "peft_config", {}) or {}
        for name in touched:
            if name in configs:
                configs[name].eval_rank = rank
    return touched


class DyLoraModel(ExtModel):
    """DyLoRA tuner model.

    ``model.set_rank(b)`` (also on the ``PeftModel``) evaluates and merges the same adapter at rank ``b``."""

    prefix: str = "dylora_"
    tuner_layer_cls = DyLoraLayer
    layer_cls = DyLoraLinear

    def set_rank(self, rank: int, adapter_name: Optional[str] = None) -> None:
        """Use rank ``rank`` (1..r) for evaluation and merging; see ``peft_ext.tuners.dylora.set_rank``."""
        set_rank(self, rank, adapter_name)

    def get_rank(self, adapter_name: Optional[str] = None) -> int:
        """The evaluation rank of ``adapter_name`` (default: the active adapter)."""
        name = adapter_name or self.active_adapters[0]
        return self.peft_config[name].eval_rank
