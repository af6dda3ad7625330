"""Prompt-aware LoRA layer: LoRA whose scale is predicted from the prompt (WavLLM's prompt-aware LoRA weight adapter).

Paper: *WavLLM: Towards Robust and Adaptive Speech Large Language Model* (https://arxiv.org/abs/2404.00656).
Official code: https://github.com/microsoft/SpeechT5 (``WavLLM/wavllm/models/llama.py``, ``Attention_LoRA``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.base import ExtLayer
from .config import PromptAwareLoraConfig


class PromptAwareLoraLayer(ExtLayer):
    """Prompt-aware LoRA tuner layer (WavLLM).

    Weights: ``prompt_aware_lora_down[adapter]`` (A, r×in, kaiming-uniform), ``prompt_aware_lora_up[adapter]``
    (B, out×r, zeros) and, with ``scale_mode='rank'``, ``prompt_aware_lora_head[adapter]`` (d → r). The model-level
    adapter (``PromptAwareLoraModel``) stores the pooled prompt vector ``p`` of the current call in
    ``prompt_vec[adapter]`` (``[batch, d]``, or ``[1, d]`` for one prompt shared by the whole call). Then, stage 2:

    * ``'rank'``: ``c = clamp(ReLU(head(p)), max=clamp) ∈ R^r``, ``Δ = ((drop(x)Aᵀ) ⊙ c)Bᵀ``;
    * ``'output'`` (official ``Attention_LoRA``): ``c = clamp(ReLU(p), max=clamp) ∈ R^d``, ``Δ = (drop(x)AᵀBᵀ) ⊙ c``;

    stage 1, or ``prompt_vec[adapter] is None`` (``no_prompt='fixed'`` without a prompt): ``Δ = (α/r)·drop(x)AᵀBᵀ``.
    During the model's prompt pass (``_prompt_pass``) the layer is the base layer, as the official
    ``is_prompt=True``."""

    adapter_layer_names = ("prompt_aware_lora_down", "prompt_aware_lora_up", "prompt_aware_lora_head")
    other_param_names = ("r", "lora_alpha", "scale_mode", "clamp", "stage", "prompt_aware_lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PromptAwareLoraConfig, **kwargs) -> None:
        self._init_base(base_layer)
        self.r, self.lora_alpha, self.scale_mode, self.clamp, self.stage = {}, {}, {}, {}, {}
        self.prompt_aware_lora_down = nn.ModuleDict({})
        self.prompt_aware_lora_up = nn.ModuleDict({})
        self.prompt_aware_lora_head = nn.ModuleDict({})
        self.prompt_aware_lora_dropout = nn.ModuleDict({})
        self.frozen_peft_weight_names = {}  # per instance: the stage decides which weights train
        self.prompt_vec: dict = {}  # adapter -> pooled prompt vector of the current call (set by the model)
        self._prompt_pass = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(
        self, adapter_name: str, config: PromptAwareLoraConfig, hidden_size: Optional[int] = None, **kwargs
    ) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``; ``hidden_size`` is the
        width d of the prompt representation (given by the model)."""
        r = config.r
        if hidden_size is None:
            raise ValueError("PromptAwareLoraLayer.update_layer needs hidden_size (the width of the prompt states).")
        if config.scale_mode == "output" and self.out_features != hidden_size:
            raise ValueError(
                f"{type(config).__name__}.scale_mode='output' scales the output channels by a width-{hidden_size} "
                f"vector, but a target layer has {self.out_features} outputs (e.g. grouped-query k/v projections); "
                "use scale_mode='rank' or restrict target_modules to layers of width d (q/o)."
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.scale_mode[adapter_name] = config.scale_mode
        self.clamp[adapter_name] = float(config.clamp)
        self.prompt_aware_lora_down[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.prompt_aware_lora_up[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.prompt_aware_lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        )
        nn.init.kaiming_uniform_(self.prompt_aware_lora_down[adapter_name].weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.prompt_aware_lora_up[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.prompt_aware_lora_up[adapter_name].weight, a=math.sqrt(5))
        if config.scale_mode == "rank":
            head = nn.Linear(hidden_size, r)
            if config.init_scale:  # c starts at min(α/r, clamp) for every prompt
                nn.init.zeros_(head.weight)
                nn.init.constant_(head.bias, min(config.lora_alpha / r, config.clamp))
            self.prompt_aware_lora_head[adapter_name] = head
        elif adapter_name in self.prompt_aware_lora_head:
            del self.prompt_aware_lora_head[adapter_name]
        self.set_stage(adapter_name, config.stage, config.freeze_lora_in_stage2, apply=False)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_stage(self, adapter: str, stage: int, freeze_lora: bool = False, apply: bool = True) -> None:
        """Switch ``adapter`` to WavLLM stage 1 (plain LoRA, scale head frozen) or 2 (prompt-aware scales; with
        ``freeze_lora`` only the scale head trains)."""
        self.stage[adapter] = stage
        frozen = ("prompt_aware_lora_head",) if stage == 1 else (
            ("prompt_aware_lora_down", "prompt_aware_lora_up") if freeze_lora else ()
        )
        if frozen:
            self.frozen_peft_weight_names[adapter] = frozen
        else:
            self.frozen_peft_weight_names.pop(adapter, None)
        if apply:
            self.set_adapter(self.active_adapters)

    def scales(self, adapter: str, batch: int) -> Optional[torch.Tensor]:
        """``c`` of this call (``[batch or 1, r]`` in rank mode, ``[batch or 1, out]`` in output mode), or None
        for the fixed LoRA scale α/r."""
        if self.stage[adapter] == 1:
            return None
        if adapter not in self.prompt_vec:
            raise RuntimeError(
                "prompt_aware_lora: no prompt scale was computed for this forward; call the model through its "
                "PeftModel (model(input_ids, prompt_mask=...)), which runs the prompt pass."
            )
        p = self.prompt_vec[adapter]
        if p is None:
            return None
        if p.shape[0] not in (1, batch):
            raise ValueError(
                f"prompt_aware_lora: the prompt pass gave {p.shape[0]} prompt vectors but this layer sees a batch of "
                f"{batch}; the prompt pass and the main pass must see the same batch."
            )
        if self.scale_mode[adapter] == "rank":
            head = self.prompt_aware_lora_head[adapter]
            p = head(p.to(head.weight.dtype))
        return torch.clamp(torch.relu(p), max=self.clamp[adapter])

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        A = self.prompt_aware_lora_down[adapter].weight
        B = self.prompt_aware_lora_up[adapter].weight
        h = F.linear(self.prompt_aware_lora_dropout[adapter](x), A)
        c = self.scales(adapter, x.shape[0]) if x.dim() > 1 else None
        if c is None:
            return F.linear(h, B) * (self.lora_alpha[adapter] / self.r[adapter])
        c = c.to(h.dtype).view(c.shape[0], *([1] * (x.dim() - 2)), c.shape[-1])
        if self.scale_mode[adapter] == "rank":
            return F.linear(h * c, B)
        return F.linear(h, B) * c

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._prompt_pass:  # the prompt pass runs the frozen model without LoRA (official is_prompt=True)
            return self.base_layer(x, *args, **kwargs)
        return ExtLayer.forward(self, x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge stage-1 adapters (plain LoRA); stage-2 adapters scale per prompt and cannot be merged."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for adapter in names:
            if self._has_adapter(adapter) and self.stage[adapter] == 2:
                raise ValueError(
                    "PromptAwareLoraLayer cannot be merged: in stage 2 the LoRA is scaled by c(prompt), so every "
                    "prompt has its own W + ΔW(c); merge only a stage-1 adapter."
                )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = (α/r)·B·A`` of a stage-1 adapter; stage 2 has no static ΔW (error)."""
        if self.stage[adapter] == 2:
            raise ValueError(
                "PromptAwareLoraLayer cannot be merged or converted in stage 2: ΔW depends on the prompt (c(prompt))."
            )
        A = self.prompt_aware_lora_down[adapter].weight
        B = self.prompt_aware_lora_up[adapter].weight
        return ((B.float() @ A.float()) * (self.lora_alpha[adapter] / self.r[adapter])).to(A.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return self.stage.get(adapter_name) == 1

    def __repr__(self) -> str:
        return "prompt_aware_lora." + super().__repr__()


class PromptAwareLoraLinear(nn.Module, PromptAwareLoraLayer):
    """Prompt-aware LoRA around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer); WavLLM"""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PromptAwareLoraConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        PromptAwareLoraLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = PromptAwareLoraLayer.forward
