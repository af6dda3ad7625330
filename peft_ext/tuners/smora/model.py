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
    """All SMoRA layers inside ``model`` (a PeftModel, a SmoraModel or any module holding them)."""
    return [m for m in model.modules() if isinstance(m, SmoraLayer)]


def _all_reduce_load(pairs: list) -> None:
    """Sum the accumulated selections and token counts of ``(layer, adapter)`` pairs over all processes, in place.

    Under ``torch.distributed`` each rank counts only its own micro-batches; without this every rank would move its
    bias by its own load and the replicas would drift apart (DDP's ``broadcast_buffers`` keeps only rank 0's). One
    all-reduce of one flat float64 tensor (exact counts), in the same ``(layer, adapter)`` order on every rank, on the
    device of the SMoRA buffers (the model's device: CUDA under NCCL)."""
    import torch.distributed as dist

    if not pairs or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = pairs[0][0].smora_bias[pairs[0][1]].device
    parts = []
    for layer, adapter in pairs:
        parts.append(layer.load_sum[adapter].to(device=device, dtype=torch.float64))
        parts.append(torch.tensor([float(layer.load_tokens[adapter])], dtype=torch.float64, device=device))
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    chunks = flat.split([layer.load_sum[adapter].numel() + 1 for layer, adapter in pairs])  # [counts..., tokens]
    tokens = torch.stack([chunk[-1] for chunk in chunks]).tolist()  # one device read for every pair
    for (layer, adapter), chunk, count in zip(pairs, chunks, tokens):
        layer.load_sum[adapter] = chunk[:-1].float()
        layer.load_tokens[adapter] = int(round(count))


def update_smora_bias(
    model: nn.Module, adapter_name: Optional[str] = None, rate: Optional[float] = None
) -> dict[str, torch.Tensor]:
    """Apply the balancing-bias rule on every SMoRA layer of ``model`` (see ``SmoraLayer.update_bias``).

    ``adapter_name``: only that adapter (default: every adapter that accumulated load). Returns ``{module name:
    load used}`` for the layers updated. When ``torch.distributed`` is initialised, the load of all processes is summed
    first (one all-reduce), so every rank applies the same update from the global load; every rank must then call this
    at the same step."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SmoraLayer)]
    if not layers:
        raise ValueError("update_smora_bias: the model has no SMoRA layers.")
    todo = [
        (name, layer, adapter)
        for name, layer in layers
        for adapter in ([adapter_name] if adapter_name else sorted(layer.load_tokens))
        if adapter in layer.load_tokens
    ]
    _all_reduce_load([(layer, adapter) for _, layer, adapter in todo])
    used = {}
    for name, layer, adapter in todo:
        load = layer.update_bias(adapter, rate)
        if load is not None:
            used[f"{name}.{adapter}" if not adapter_name else name] = load
    return used


class SmoraModel(ExtModel):
    """SMoRA tuner model.

    No auxiliary loss: balance comes from the selection bias, updated by ``peft_ext.callbacks.smora.SmoraBiasCallback``
    (or ``update_smora_bias(model)`` in a hand-written loop) once per optimizer step."""

    prefix: str = "smora_"
    tuner_layer_cls = SmoraLayer
    layer_cls = SmoraLinear

    def update_bias(self, adapter_name: Optional[str] = None, rate: Optional[float] = None) -> dict:
        """Apply the balancing-bias rule on every layer; see ``update_smora_bias``."""
        return update_smora_bias(self, adapter_name, rate)
