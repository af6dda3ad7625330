"""O3 orthogonal LoRA layer: a LoRA branch scaled by a per-call gate, plus frozen A snapshots of earlier requests.

Paper: *Practical Unlearning for Large Language Models* (O3, https://arxiv.org/abs/2407.10223). Official code:
https://github.com/GCYZSL/O3-LLM-UNLEARNING (``ScienceQA_expriment/src/lora_layer_hacked_o.py``).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from .._shared.base import ExtLayer
from .._shared.routing import check_route_input
from .config import O3LoraConfig

Gate = Union[float, torch.Tensor]


class O3LoraLayer(ExtLayer):
    """O3 tuner layer.

    Weights: ``o3_lora_down[adapter]`` (A, r×in, kaiming-uniform) and ``o3_lora_up[adapter]`` (B, out×r, zeros).
    Saved, never trained: ``o3_lora_snapshots[adapter]`` (the frozen A matrices of earlier requests stacked row-wise,
    ``Σ snapshot_ranks × in``; present only when there are snapshots).

    Forward: ``y = base(x) + w₁·(α/r)·drop(x)·Aᵀ·Bᵀ``. The gate ``w₁`` comes from ``call_inputs["ood_weight"]`` (set
    by ``O3LoraModel`` for each call): a Python float, a tensor with one value per sample or per token, or a dict
    adapter -> gate. Without one it is 1 in training mode and ``merge_gate`` in eval mode. A gate of exactly 0 selects
    the base output (bit-identical; the branch is skipped for a scalar 0 and ``torch.where``-selected per row).
    The official layer also multiplies the base output by a gate ``w₀``, which its scripts always set to 1; this
    layer has no ``w₀``."""

    adapter_layer_names = ("o3_lora_down", "o3_lora_up")
    other_param_names = (
        "r",
        "lora_alpha",
        "scaling",
        "o3_lora_dropout",
        "o3_lora_snapshots",
        "merge_gate",
        "prev_adapters",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: O3LoraConfig, **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        self.r, self.lora_alpha, self.scaling, self.merge_gate, self.prev_adapters = {}, {}, {}, {}, {}
        self.o3_lora_down = nn.ModuleDict({})
        self.o3_lora_up = nn.ModuleDict({})
        self.o3_lora_dropout = nn.ModuleDict({})
        self.o3_lora_snapshots = BufferDict({}, persistent=True)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: O3LoraConfig, **kwargs) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``; the snapshot buffer is
        created with ``sum(config.snapshot_ranks)`` zero rows, filled by loading or by ``snapshot_request``."""
        r = config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.scaling[adapter_name] = float(config.lora_alpha) / r
        self.merge_gate[adapter_name] = float(config.merge_gate)
        self.prev_adapters[adapter_name] = list(config.prev_adapters)
        self.o3_lora_down[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.o3_lora_up[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.o3_lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        nn.init.kaiming_uniform_(self.o3_lora_down[adapter_name].weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.o3_lora_up[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.o3_lora_up[adapter_name].weight, a=math.sqrt(5))
        rows = sum(config.snapshot_ranks)
        if rows:
            self.o3_lora_snapshots[adapter_name] = torch.zeros(rows, self.in_features)
        elif adapter_name in self.o3_lora_snapshots:
            del self.o3_lora_snapshots[adapter_name]
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ----------------------------------------------------------------------------------------------- snapshots
    def append_snapshot(self, adapter: str, rows: torch.Tensor) -> None:
        """Append frozen A rows (``k × in``, detached and copied) to the snapshot buffer of ``adapter``. Zero rows
        stand for a module the snapshot's source did not adapt (they add nothing to the loss). Use
        ``O3LoraModel.snapshot_request``, which also records the rank in the config so the adapter reloads."""
        weight = self.o3_lora_down[adapter].weight
        rows = rows.detach().to(device=weight.device, dtype=weight.dtype).clone()
        if rows.dim() != 2 or rows.shape[1] != self.in_features:
            raise ValueError(
                f"A snapshot for this layer must have shape (k, {self.in_features}); got {tuple(rows.shape)}."
            )
        if adapter in self.o3_lora_snapshots:
            rows = torch.cat([self.o3_lora_snapshots[adapter].to(rows), rows], dim=0)
        self.o3_lora_snapshots[adapter] = rows

    def orth_rows(self, adapter: str) -> Optional[torch.Tensor]:
        """The earlier requests' A rows that ``adapter`` must stay orthogonal to (snapshots, then the detached A of
        each live adapter in ``prev_adapters`` present on this layer), stacked; None when there are none."""
        parts = []
        if adapter in self.o3_lora_snapshots:
            parts.append(self.o3_lora_snapshots[adapter])
        for name in self.prev_adapters.get(adapter, ()):
            if name in self.o3_lora_down and name != adapter:
                parts.append(self.o3_lora_down[name].weight.detach())
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0]) for p in parts], dim=0)

    def orth_penalty(self, adapter: str) -> Optional[torch.Tensor]:
        """``Σ_j ‖A_j^prev · A_curᵀ‖_F²`` of this module in fp32 (gradient reaches A_cur only), or None."""
        prev = self.orth_rows(adapter)
        if prev is None:
            return None
        A = self.o3_lora_down[adapter].weight
        return (prev.float() @ A.float().T).pow(2).sum()

    # ----------------------------------------------------------------------------------------------- forward
    def gate(self, adapter: str, x: torch.Tensor) -> Gate:
        """This call's gate w₁ for ``adapter``: a float, or a float tensor broadcastable to ``x.shape[:-1]``."""
        value = self.call_inputs.get("ood_weight") if self.call_inputs else None
        if isinstance(value, dict):
            value = value.get(adapter)
        if value is None:
            return 1.0 if self.training else self.merge_gate[adapter]
        if isinstance(value, float):
            return value
        return check_route_input("ood_weight", value, x, kind="float", per_sample_ok=True)

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """The ungated branch ``(α/r)·drop(x)·Aᵀ·Bᵀ``."""
        A = self.o3_lora_down[adapter]
        B = self.o3_lora_up[adapter]
        return B(A(self.o3_lora_dropout[adapter](x))) * self.scaling[adapter]

    def add_adapter_output(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + w₁·branch``; tokens whose gate is 0 keep ``result`` bit for bit."""
        gate = self.gate(adapter, x)
        if isinstance(gate, float) and gate == 0.0:
            return result  # gate 0: the base output, bit for bit
        x_in = self._cast_input_dtype(x, self.adapter_dtype(adapter))
        out = self.adapter_forward(adapter, x_in).to(result.dtype)
        if isinstance(gate, float):
            return result + out if gate == 1.0 else result + gate * out
        g = gate.to(result.dtype).unsqueeze(-1)
        return torch.where(g != 0, result + g * out, result)

    # ----------------------------------------------------------------------------------------------- merge
    def lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with the branch ``s·B·A`` at gate 1 (training). The spec does not declare ``ba_shape``: the
        orthogonality loss sends gradient to A alone, which B·A optimizers such as LoRA-Pro would distort."""
        return self.o3_lora_down[adapter].weight, self.o3_lora_up[adapter].weight, self.scaling[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = merge_gate·(α/r)·B·A``: the update at the fixed gate that merging and ``save_as_lora`` use."""
        A = self.o3_lora_down[adapter].weight
        B = self.o3_lora_up[adapter].weight
        return ((B.float() @ A.float()) * (self.merge_gate[adapter] * self.scaling[adapter])).to(A.dtype)

    def __repr__(self) -> str:
        return "o3_lora." + super().__repr__()


class O3LoraLinear(nn.Module, O3LoraLayer):
    """O3 LoRA around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: O3LoraConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        O3LoraLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = O3LoraLayer.forward  # nn.Module comes first in the bases; use the tuner forward
