"""MoLA layer: a mixture of LoRA experts with a top-k softmax router, computed as two fused GEMMs.

Paper: *Higher Layers Need More LoRA Experts* (https://arxiv.org/abs/2402.08562). Official code:
https://github.com/GCYZSL/MoLA (``src/mola_lora_hacked.py`` ``Linear_MoE``).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.base import ExtLayer, bad_value, in_autograd_backward
from .._shared.routing import expert_load, topk_route
from .config import MolaConfig


class MolaLayer(ExtLayer):
    """MoLA tuner layer.

    Weights per adapter: ``mola_router`` (``Linear(in, E, bias=False)``, kaiming-uniform as ``nn.Linear``),
    ``mola_experts_down`` (the E experts' A stacked: ``[E·r, in]``, kaiming-uniform per row as in LoRA) and
    ``mola_experts_up`` (the experts' B side by side: ``[out, E·r]``, zeros). Expert e is rows ``e·r:(e+1)·r`` of A
    and columns ``e·r:(e+1)·r`` of B.

    Forward, with no loop over experts or tokens: ``h = drop(x) A_allᵀ`` (one GEMM for all experts), ``h`` times
    each token's routing weight of the expert owning each column (zero for unselected experts), ``y = (α/r)·h B_allᵀ``
    (one GEMM). This computes every expert for every token, E/k times the work of a gather-based sparse kernel, but
    as two dense GEMMs it is faster than the official per-expert loop at LoRA-sized E·r (see
    ``scripts/bench_mola_loop.py``). Difference from the official code: dropout draws one mask per token shared by
    its experts (official: one per token and expert); the distribution of each expert's input is the same.

    After each forward ``last_load[adapter]`` holds the fraction of routing slots each expert received (``[E]``,
    sums to k). Not mergeable: the update depends on the token through the router."""

    adapter_layer_names = ("mola_experts_down", "mola_experts_up", "mola_router")
    other_param_names = (
        "r", "lora_alpha", "num_experts", "top_k", "renormalize", "balance_loss_weight", "balance_loss_scope",
        "layer_index", "mola_dropout", "last_load", "balance_stats",
    )
    mergeable = False
    merge_refusal = (
        "MoLA routes every token to its own top-k LoRA experts, so its update is not one weight matrix; merging "
        "(merge_adapter, merge_and_unload, save_as_lora) is impossible. Keep the adapter unmerged."
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MolaConfig, **kwargs) -> None:
        self._init_base(base_layer)
        self.r, self.lora_alpha, self.num_experts, self.top_k = {}, {}, {}, {}
        self.renormalize, self.balance_loss_weight, self.balance_loss_scope, self.layer_index = {}, {}, {}, {}
        self.last_load: dict[str, torch.Tensor] = {}
        self.balance_stats: dict[str, tuple] = {}
        self.mola_experts_down = nn.ModuleDict({})
        self.mola_experts_up = nn.ModuleDict({})
        self.mola_router = nn.ModuleDict({})
        self.mola_dropout = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(
        self,
        adapter_name: str,
        config: MolaConfig,
        num_experts: Optional[int] = None,
        top_k: Optional[int] = None,
        layer_index: Optional[int] = None,
        **kwargs,
    ) -> None:
        """Create (or replace) adapter ``adapter_name`` with ``num_experts`` experts and ``top_k`` routing.

        ``num_experts`` / ``top_k`` are this layer's values (``MolaModel`` resolves per-layer patterns); when omitted,
        the config must hold plain ints.
        """
        if num_experts is None:
            num_experts = config.num_experts
        if top_k is None:
            top_k = config.top_k
        if not isinstance(num_experts, int) or not isinstance(top_k, int):
            raise bad_value(config, "num_experts", config.num_experts, "resolved per layer by MolaModel")
        if top_k > num_experts:
            raise bad_value(
                config, "top_k", config.top_k,
                f"at most num_experts in every layer; layer {layer_index} has {num_experts} experts and top_k {top_k}",
            )
        r = config.r
        renorm = config.resolve_renormalize(top_k)
        if renorm and top_k == 1 and num_experts > 1:
            warnings.warn(
                f"MoLA layer {layer_index}: top_k=1 with renormalize=True; the router gets no task-loss gradient.",
                stacklevel=2,
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.num_experts[adapter_name] = num_experts
        self.top_k[adapter_name] = top_k
        self.renormalize[adapter_name] = renorm
        self.balance_loss_weight[adapter_name] = float(config.balance_loss_weight)
        self.balance_loss_scope[adapter_name] = config.balance_loss_scope
        self.layer_index[adapter_name] = layer_index
        self.mola_router[adapter_name] = nn.Linear(self.in_features, num_experts, bias=False)
        self.mola_experts_down[adapter_name] = nn.Linear(self.in_features, num_experts * r, bias=False)
        self.mola_experts_up[adapter_name] = nn.Linear(num_experts * r, self.out_features, bias=False)
        self.mola_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        # kaiming-uniform(a=√5) draws from U(±1/√in) for every row: the same distribution as E separate LoRA A's
        nn.init.kaiming_uniform_(self.mola_router[adapter_name].weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mola_experts_down[adapter_name].weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.mola_experts_up[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.mola_experts_up[adapter_name].weight, a=math.sqrt(5))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def route(self, adapter: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weights, mask, probs)`` of the router for input ``x`` (each ``[..., E]``, fp32); see ``topk_route``."""
        logits = self.mola_router[adapter](x)
        return topk_route(logits, self.top_k[adapter], renormalize=self.renormalize[adapter])

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        weights, mask, probs = self.route(adapter, x)
        E, r = self.num_experts[adapter], self.r[adapter]
        h = F.linear(self.mola_dropout[adapter](x), self.mola_experts_down[adapter].weight)  # [..., E·r]
        h = (h.unflatten(-1, (E, r)) * weights.to(h.dtype).unsqueeze(-1)).flatten(-2)
        out = F.linear(h, self.mola_experts_up[adapter].weight) * (self.lora_alpha[adapter] / r)
        self.last_load[adapter] = expert_load(mask)
        self._record_balance(adapter, probs, mask)
        return out

    def _record_balance(self, adapter: str, probs: torch.Tensor, mask: torch.Tensor) -> None:
        weight = self.balance_loss_weight[adapter]
        if weight == 0 or not self.aux_recording():
            return
        probs = probs.reshape(-1, probs.shape[-1])
        mask = mask.detach().reshape(-1, mask.shape[-1])
        if self.balance_loss_scope[adapter] == "module":
            self.record_aux_loss(weight * balance_loss(probs, mask, self.top_k[adapter]))
            return
        # summed by MolaModel.aux_loss over the modules of one decoder layer; tagged with this forward's list. A
        # checkpointing recompute inside backward repeats the operations but keeps the forward's statistics.
        stats = (self.aux_losses, probs.sum(0), mask.sum(0), probs.shape[0])
        if not in_autograd_backward():
            self.balance_stats[adapter] = stats

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Refused: a routed mixture has no single ΔW (see ``merge_refusal``)."""
        raise ValueError(f"{type(self).__name__} cannot be merged: {self.merge_refusal}")

    def __repr__(self) -> str:
        return "mola." + super().__repr__()


def balance_loss(probs: torch.Tensor, mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """MoLA's load-balancing loss of one group of routing decisions, as the official ``load_balancing_loss_func``.

    ``E · Σ_e f_e · P̄_e`` with ``f_e`` the share of routing *slots* that picked expert e (``Σ_e f_e = 1``, i.e. the
    shared ``load_balance_loss`` divided by k) and ``P̄_e`` the mean router probability; minimum 1 for uniform
    routing. ``probs`` / ``mask`` are ``[N, E]``."""
    E = probs.shape[-1]
    f = mask.float().mean(0) / top_k
    return E * (f * probs.float().mean(0)).sum()


class MolaLinear(nn.Module, MolaLayer):
    """MoLA around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MolaConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        MolaLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = MolaLayer.forward  # nn.Module comes first in the bases; use the tuner forward

    def __getstate__(self):
        # The balance-loss terms of the last forward hold autograd graphs, which copy.deepcopy and pickle refuse;
        # they belong to that forward only, so a copy starts without them.
        state = dict(super().__getstate__())
        state["aux_losses"] = []
        state["balance_stats"] = {}
        return state
