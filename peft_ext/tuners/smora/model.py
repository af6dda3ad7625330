"""SMoRA model: injects ``SmoraLinear`` layers; the balancing bias is updated by ``SmoraBiasCallback``.

Paper: *Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning*
(https://arxiv.org/abs/2501.15103). No public code.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._shared.base import ExtModel
from .layer import SmoraLayer, SmoraLinear


def smora_layers(model: nn.Module) -> list[SmoraLayer]:
    """All SMoRA layers inside ``model`` (a PeftModel, a SmoraModel or any module holding them).

    SMoRA paper: https://arxiv.org/abs/2501.15103; no public code.
    """
    return [m for m in model.modules() if isinstance(m, SmoraLayer)]


def update_smora_bias(
    model: nn.Module, adapter_name: Optional[str] = None, rate: Optional[float] = None
) -> dict[str, torch.Tensor]:
    """Apply the balancing-bias rule on every SMoRA layer of ``model`` (see ``SmoraLayer.update_bias``).

    ``adapter_name``: only that adapter (default: every adapter that accumulated load). Returns ``{module name:
    load used}`` for the layers updated. Paper https://arxiv.org/abs/2501.15103; no public code.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SmoraLayer)]
    if not layers:
        raise ValueError("update_smora_bias: the model has no SMoRA layers.")
    used = {}
    for name, layer in layers:
        for adapter in [adapter_name] if adapter_name else list(layer.load_tokens):
            if adapter in layer.load_tokens:
                load = layer.update_bias(adapter, rate)
                if load is not None:
                    used[f"{name}.{adapter}" if not adapter_name else name] = load
    return used


class SmoraModel(ExtModel):
    """SMoRA tuner model (paper https://arxiv.org/abs/2501.15103; no public code).

    No auxiliary loss: balance comes from the selection bias, updated by ``peft_ext.callbacks.smora.SmoraBiasCallback``
    (or ``update_smora_bias(model)`` in a hand-written loop) once per optimizer step.
    """

    prefix: str = "smora_"
    tuner_layer_cls = SmoraLayer
    layer_cls = SmoraLinear

    def update_bias(self, adapter_name: Optional[str] = None, rate: Optional[float] = None) -> dict:
        """Apply the balancing-bias rule on every layer; see ``update_smora_bias``."""
        return update_smora_bias(self, adapter_name, rate)
