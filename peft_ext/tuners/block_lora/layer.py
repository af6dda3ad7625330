"""Block-LoRA layer: a rank-r LoRA whose down-projection blocks are one shared matrix, computed in fused form.

Paper: *One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning*
(https://arxiv.org/abs/2501.16720). Official code: no public code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.base import ExtLayer
from .config import BlockLoraConfig


def zero_sum_blocks(out_features: int, n_blocks: int, block_rank: int, bound: float) -> torch.Tensor:
    """Random blocks ``(out, n, r/n)`` whose sum over the block axis is exactly zero in float32, in any summation order.

    Used by ``BlockLoraConfig(init_B="zero_sum")``. Values are integers times a power of two (``J_i = n·I_i − Σ_j I_j``
    with ``I_i`` uniform integers), so every partial sum
    is exactly representable; entries are bounded by ``2·bound``. Draws from the global RNG like PEFT's inits."""
    levels = 1024
    ints = torch.randint(-levels, levels + 1, (out_features, n_blocks, block_rank))
    centred = n_blocks * ints - ints.sum(dim=1, keepdim=True)
    step = 2.0 ** math.floor(math.log2(bound / n_blocks)) / levels
    return centred.to(torch.float32) * step


class BlockLoraLayer(ExtLayer):
    """Block-LoRA tuner layer.

    Weights: ``block_lora_down[adapter]`` (the shared ``A_s``, ``r/n × in``, kaiming-uniform) and
    ``block_lora_up[adapter]`` (``B = [B_1 … B_n]``, ``out × r``; block ``i`` is columns ``i·r/n … (i+1)·r/n − 1``).
    The branch is ``s·(drop(x) A_sᵀ)(Σ_i B_i)ᵀ`` with ``s = α/r``: one rank-``r/n`` down-projection and a sum over the
    blocks, never a loop over them. ``ΔW = s·(Σ_i B_i)·A_s``."""

    adapter_layer_names = ("block_lora_down", "block_lora_up")
    other_param_names = ("r", "n_blocks", "lora_alpha", "scaling", "block_lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BlockLoraConfig, **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        self.r, self.n_blocks, self.lora_alpha, self.scaling = {}, {}, {}, {}
        self.block_lora_down = nn.ModuleDict({})
        self.block_lora_up = nn.ModuleDict({})
        self.block_lora_dropout = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BlockLoraConfig, **kwargs) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``."""
        r, n = config.r, config.n_blocks
        block_rank = r // n
        self.r[adapter_name] = r
        self.n_blocks[adapter_name] = n
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.scaling[adapter_name] = float(config.lora_alpha) / r
        self.block_lora_down[adapter_name] = nn.Linear(self.in_features, block_rank, bias=False)
        self.block_lora_up[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.block_lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        )
        nn.init.kaiming_uniform_(self.block_lora_down[adapter_name].weight, a=math.sqrt(5))
        up = self.block_lora_up[adapter_name].weight
        with torch.no_grad():
            if not config.init_weights:  # random, non-zero ΔW (tests and debugging)
                nn.init.kaiming_uniform_(up, a=math.sqrt(5))
            elif config.init_B == "zero_sum":
                blocks = zero_sum_blocks(self.out_features, n, block_rank, bound=1.0 / math.sqrt(r))
                up.copy_(blocks.reshape(self.out_features, r))
            else:
                nn.init.zeros_(up)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def blocks(self, adapter: str) -> torch.Tensor:
        """The up-projection blocks as a ``(n_blocks, out, r/n)`` view: ``blocks(adapter)[i]`` is ``B_i``."""
        n = self.n_blocks[adapter]
        up = self.block_lora_up[adapter].weight
        return up.view(self.out_features, n, up.shape[1] // n).permute(1, 0, 2)

    def summed_up(self, adapter: str) -> torch.Tensor:
        """``Σ_i B_i`` (``out × r/n``): the only up-projection the fused forward needs."""
        n = self.n_blocks[adapter]
        up = self.block_lora_up[adapter].weight
        return up.view(self.out_features, n, up.shape[1] // n).sum(dim=1)

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        down = self.block_lora_down[adapter].weight
        hidden = F.linear(self.block_lora_dropout[adapter](x), down)
        return F.linear(hidden, self.summed_up(adapter)) * self.scaling[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = (α/r)·(Σ_i B_i)·A_s``."""
        down = self.block_lora_down[adapter].weight
        return ((self.summed_up(adapter).float() @ down.float()) * self.scaling[adapter]).to(down.dtype)

    def __repr__(self) -> str:
        return "block_lora." + super().__repr__()


class BlockLoraLinear(nn.Module, BlockLoraLayer):
    """Block-LoRA around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BlockLoraConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        BlockLoraLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = BlockLoraLayer.forward  # nn.Module comes first in the bases; use the tuner forward
