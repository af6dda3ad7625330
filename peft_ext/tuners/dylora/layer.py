"""DyLoRA layer: a LoRA whose rank can be truncated to any b in 1..r at run time.

Paper: *DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation*
(https://arxiv.org/abs/2210.07558). Official code: https://github.com/huawei-noah/Efficient-NLP (DyLoRA/loralib).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.base import ExtLayer, bad_value
from .config import DyLoraConfig


class DyLoraLayer(ExtLayer):
    """DyLoRA tuner layer.

    Weights: ``dylora_down[adapter]`` (A, r×in, kaiming-uniform) and ``dylora_up[adapter]`` (B, out×r, zeros).
    ``rank[adapter]`` is the evaluation / merge rank; ``train_rank[adapter]``, set each optimizer step by
    ``DyLoraRankSampler``, overrides it while the module is in training mode."""

    adapter_layer_names = ("dylora_down", "dylora_up")
    other_param_names = ("r", "lora_alpha", "dylora_dropout", "rank", "train_rank", "frozen_lower")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DyLoraConfig, **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        self.r, self.lora_alpha, self.rank, self.train_rank, self.frozen_lower = {}, {}, {}, {}, {}
        self.dylora_down = nn.ModuleDict({})
        self.dylora_up = nn.ModuleDict({})
        self.dylora_dropout = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: DyLoraConfig, **kwargs) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``."""
        r = config.r
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.rank[adapter_name] = config.eval_rank or r
        self.train_rank[adapter_name] = None
        self.frozen_lower[adapter_name] = config.frozen_lower
        self.dylora_down[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.dylora_up[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.dylora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        nn.init.kaiming_uniform_(self.dylora_down[adapter_name].weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.dylora_up[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.dylora_up[adapter_name].weight, a=math.sqrt(5))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def current_rank(self, adapter: str) -> int:
        """The rank b the adapter computes with right now (the sampled rank in training, else the set rank)."""
        if self.training and self.train_rank.get(adapter) is not None:
            return self.train_rank[adapter]
        return self.rank[adapter]

    def set_rank(self, adapter: str, rank: int, training_only: bool = False) -> None:
        """Set the rank of ``adapter`` to ``rank`` in 1..r; ``training_only`` sets the sampled training rank."""
        r = self.r[adapter]
        if rank is None and training_only:  # clears the sampled training rank
            self.train_rank[adapter] = None
            return
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r:
            raise bad_value("set_rank", "rank", rank, f"an integer in 1..r (1..{r})")
        if training_only:
            self.train_rank[adapter] = rank
            return
        if adapter in self.merged_adapters and rank != self.rank[adapter]:
            raise RuntimeError(
                f"Adapter {adapter!r} is merged at rank {self.rank[adapter]}; call unmerge_adapter() before set_rank, "
                "then merge again."
            )
        self.rank[adapter] = rank

    def _factors(self, adapter: str, b: int, split_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        A = self.dylora_down[adapter].weight
        B = self.dylora_up[adapter].weight
        if split_grad and b > 1:  # frozen mode: only the b-th component receives gradient
            A_b = torch.cat([A[: b - 1].detach(), A[b - 1 : b]], dim=0)
            B_b = torch.cat([B[:, : b - 1].detach(), B[:, b - 1 : b]], dim=1)
            return A_b, B_b
        return A[:b], B[:, :b]

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        b = self.current_rank(adapter)
        split = self.training and self.frozen_lower[adapter] and self.train_rank.get(adapter) is not None
        A_b, B_b = self._factors(adapter, b, split)
        # (α/r)·√(r/b)·√(r/b) = α/b
        return F.linear(F.linear(self.dylora_dropout[adapter](x), A_b), B_b) * (self.lora_alpha[adapter] / b)

    def lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with ΔW = s·B·A at the full rank r, for B·A optimizers such as LoRA-Pro.

        Only defined at rank r: under a sampled rank b < r the update is (α/b)·B[:, :b]·A[:b], which LoRA-Pro's
        equivalent gradient does not model, so this raises instead of silently mixing the two.
        """
        b = self.current_rank(adapter)
        if b != self.r[adapter]:
            raise ValueError(
                f"lora_factors: adapter {adapter!r} computes at rank {b}, not its full rank {self.r[adapter]}; "
                "B·A optimizers (LoRA-Pro) need the full rank, so do not combine them with DyLoraRankSampler."
            )
        return self.dylora_down[adapter].weight, self.dylora_up[adapter].weight, self.lora_alpha[adapter] / b

    def get_delta_weight(self, adapter: str, rank: Optional[int] = None) -> torch.Tensor:
        """``ΔW = (α/b)·B[:, :b]·A[:b]`` at ``rank`` (default: the set evaluation rank)."""
        b = self.rank[adapter] if rank is None else rank
        A = self.dylora_down[adapter].weight[:b]
        B = self.dylora_up[adapter].weight[:, :b]
        return ((B.float() @ A.float()) * (self.lora_alpha[adapter] / b)).to(A.dtype)

    def __repr__(self) -> str:
        return "dylora." + super().__repr__()


class DyLoraLinear(nn.Module, DyLoraLayer):
    """DyLoRA around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DyLoraConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        DyLoraLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = DyLoraLayer.forward  # nn.Module comes first in the bases; use the tuner forward
