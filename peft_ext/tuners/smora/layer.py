"""SMoRA layer: a rank-r LoRA whose ranks are experts, activated per token by a top-k router.

Paper: *Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning*
(https://arxiv.org/abs/2501.15103). No public code.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from .._shared.base import ExtLayer
from .config import SmoraConfig


class SmoraLayer(ExtLayer):
    """SMoRA tuner layer.

    Weights per adapter: ``smora_down`` (A, ``[r, in]``, kaiming-uniform), ``smora_up`` (B, ``[out, r]``, zeros),
    ``smora_router`` (W_g, ``[r/block_size, in]``, no bias, kaiming-uniform) and the persistent buffer
    ``smora_bias`` (b, ``[r/block_size]``, fp32, zeros), the selection-only balancing bias, saved with the adapter
    and changed only by ``update_bias`` (``SmoraBiasCallback``), never by the optimizer.

    Forward (no gather, no loop): ``s = σ(W_g x)`` (or softmax), the top-k of ``s + b`` are selected,
    ``g = s`` on them (``s + b`` with ``bias_in_gate``; optionally normalised to sum 1) and 0 elsewhere;
    ``h = drop(x) Aᵀ`` (one GEMM), ``h`` times ``g`` repeated over each block's ranks, ``y = (α/r)·h Bᵀ``.
    ``last_load[adapter]`` holds each expert's share of the routing slots of the last forward (sums to k); in training
    mode the selections are also accumulated for the next bias update."""

    adapter_layer_names = ("smora_down", "smora_up", "smora_router")
    other_param_names = (
        "r", "lora_alpha", "top_k", "block_size", "gate_fn", "normalize_gates", "bias_in_gate", "bias_update_rate",
        "smora_bias", "smora_dropout", "last_load", "load_sum", "load_tokens",
    )
    mergeable = False
    merge_refusal = (
        "SMoRA activates a different subset of ranks for every token, so its update is not one weight matrix; merging "
        "(merge_adapter, merge_and_unload, save_as_lora) is impossible. Keep the adapter unmerged."
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SmoraConfig, **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        self.r, self.lora_alpha, self.top_k, self.block_size = {}, {}, {}, {}
        self.gate_fn, self.normalize_gates, self.bias_in_gate, self.bias_update_rate = {}, {}, {}, {}
        self.last_load: dict[str, torch.Tensor] = {}
        self.load_sum: dict[str, torch.Tensor] = {}
        self.load_tokens: dict[str, int] = {}
        self.smora_down = nn.ModuleDict({})
        self.smora_up = nn.ModuleDict({})
        self.smora_router = nn.ModuleDict({})
        self.smora_dropout = nn.ModuleDict({})
        self.smora_bias = BufferDict({}, persistent=True)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: SmoraConfig, **kwargs) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``."""
        r, nb = config.r, config.num_blocks
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.top_k[adapter_name] = config.top_k
        self.block_size[adapter_name] = config.block_size
        self.gate_fn[adapter_name] = config.gate_fn
        self.normalize_gates[adapter_name] = config.normalize_gates
        self.bias_in_gate[adapter_name] = config.bias_in_gate
        self.bias_update_rate[adapter_name] = float(config.bias_update_rate)
        self.smora_down[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.smora_up[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.smora_router[adapter_name] = nn.Linear(self.in_features, nb, bias=False)
        self.smora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.smora_bias[adapter_name] = torch.zeros(nb)
        nn.init.kaiming_uniform_(self.smora_down[adapter_name].weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.smora_router[adapter_name].weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.smora_up[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.smora_up[adapter_name].weight, a=math.sqrt(5))
        self.reset_load(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        bias = self.smora_bias[adapter_name]
        self.smora_bias[adapter_name] = bias.float()  # small ±u steps must not vanish in a bf16 buffer
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def gates(self, adapter: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gates, mask)`` for input ``x``, each ``[..., r/block_size]`` in fp32: the gate of every expert (zero
        where not selected) and the 0/1 selection."""
        logits = self.smora_router[adapter](x).float()
        scores = torch.sigmoid(logits) if self.gate_fn[adapter] == "sigmoid" else torch.softmax(logits, dim=-1)
        bias = self.smora_bias[adapter].float()
        k, nb = self.top_k[adapter], scores.shape[-1]
        if k >= nb:
            mask = torch.ones_like(scores)
        else:
            idx = (scores + bias).detach().topk(k, dim=-1).indices
            mask = torch.zeros_like(scores).scatter_(-1, idx, 1.0)
        gate = (scores + bias) if self.bias_in_gate[adapter] else scores
        gate = gate * mask
        if self.normalize_gates[adapter]:
            gate = gate / gate.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return gate, mask

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        gate, mask = self.gates(adapter, x)
        nb, bs = gate.shape[-1], self.block_size[adapter]
        h = F.linear(self.smora_dropout[adapter](x), self.smora_down[adapter].weight)  # [..., r]: x Aᵀ once, then mask
        h = (h.unflatten(-1, (nb, bs)) * gate.to(h.dtype).unsqueeze(-1)).flatten(-2)
        out = F.linear(h, self.smora_up[adapter].weight) * (self.lora_alpha[adapter] / self.r[adapter])
        with torch.no_grad():
            flat = mask.reshape(-1, nb)
            counts = flat.sum(0)
            self.last_load[adapter] = counts / max(flat.shape[0], 1)
            if self.training:
                self.load_sum[adapter] = self.load_sum[adapter].to(counts.device) + counts
                self.load_tokens[adapter] += flat.shape[0]
        return out

    def reset_load(self, adapter: str) -> None:
        """Forget the selections accumulated since the last bias update."""
        self.load_sum[adapter] = torch.zeros(self.r[adapter] // self.block_size[adapter])
        self.load_tokens[adapter] = 0

    def accumulated_load(self, adapter: str) -> Optional[torch.Tensor]:
        """Each expert's share of the routing slots accumulated in training since the last update (sums to k), or
        None when no training forward ran."""
        tokens = self.load_tokens.get(adapter, 0)
        return self.load_sum[adapter] / tokens if tokens else None

    @torch.no_grad()
    def update_bias(self, adapter: str, rate: Optional[float] = None) -> Optional[torch.Tensor]:
        """Apply ``b_i ← b_i + u·sign(mean load − load_i)`` from the accumulated load and reset it.

        Under-loaded experts get a higher bias, over-loaded ones a lower one (DeepSeek-V3 style; the sign convention
        and ``u`` are UNCERTAIN for SMoRA). Returns the load used, or None when
        nothing was accumulated. ``rate`` overrides the config's ``bias_update_rate``."""
        load = self.accumulated_load(adapter)
        if load is None:
            return None
        u = self.bias_update_rate[adapter] if rate is None else float(rate)
        bias = self.smora_bias[adapter]
        bias.add_((u * torch.sign(load.mean() - load)).to(device=bias.device, dtype=bias.dtype))
        self.reset_load(adapter)
        return load

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Refused: the rank selection depends on the token (see ``merge_refusal``)."""
        raise ValueError(f"{type(self).__name__} cannot be merged: {self.merge_refusal}")

    def __repr__(self) -> str:
        return "smora." + super().__repr__()


class SmoraLinear(nn.Module, SmoraLayer):
    """SMoRA around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SmoraConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        SmoraLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = SmoraLayer.forward  # nn.Module comes first in the bases; use the tuner forward
