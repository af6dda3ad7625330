"""LoRA-Mixer layer: routed LoRA experts on one linear projection, computed with two fused matmuls.

Paper: *LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing*
(https://arxiv.org/abs/2507.00029). Official code: https://github.com/hustcselwb/LoRA-Mixer (README only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.base import ExtLayer, bad_value
from .._shared.routing import check_route_input, expert_load, load_balance_loss, topk_route
from .config import LoraMixerConfig

EXPERT_LAYER_NAMES = ("lora_mixer_down", "lora_mixer_up")


class LoraMixerLayer(ExtLayer):
    """LoRA-Mixer tuner layer.

    Weights per adapter: ``lora_mixer_router`` (``Linear(in, E)``, no bias, kaiming-uniform), ``lora_mixer_down``
    (all experts' A stacked along the rank axis, ``[Σ r_e, in]``) and ``lora_mixer_up`` (all B side by side,
    ``[out, Σ r_e]``). Experts may have different ranks: the rank axis is cut into segments of ``r[adapter][e]``
    columns. The forward is one matmul into all experts' rank space, a per-column weight ``w_e·s_e`` (token weight of
    the expert that owns the column times its scale ``α_e/r_e``), and one matmul out - no loop over experts or tokens.

    The per-call input ``expert_ids`` (``model(..., expert_ids=ids)``: long, one entry per token or per sample, -1 for
    no expert) replaces the router by a one-hot route, e.g. to reproduce each source LoRA or to analyse experts.
    After each routed forward ``last_load[adapter]`` holds the fraction of tokens routed to each expert (``[E]``,
    sums to top_k) and ``last_probs[adapter]`` the mean router probability per expert."""

    adapter_layer_names = ("lora_mixer_router", "lora_mixer_down", "lora_mixer_up")
    other_param_names = (
        "r",
        "lora_alpha",
        "lora_mixer_dropout",
        "num_experts",
        "top_k",
        "temperature",
        "straight_through",
        "renormalize",
        "balance_loss_weight",
        "entropy_loss_weight",
        "freeze_experts",
        "last_load",
        "last_probs",
    )
    mergeable = False
    merge_refusal = (
        "LoRA-Mixer mixes its experts with per-token router weights, so the update depends on the input and there "
        "is no single weight delta to merge into the base layer (nor to export as a plain LoRA); keep the adapter "
        "unmerged."
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraMixerConfig, **kwargs) -> None:
        self._init_base(base_layer)
        for name in self.other_param_names:
            if name != "lora_mixer_dropout":
                setattr(self, name, {})
        self.lora_mixer_router = nn.ModuleDict({})
        self.lora_mixer_down = nn.ModuleDict({})
        self.lora_mixer_up = nn.ModuleDict({})
        self.lora_mixer_dropout = nn.ModuleDict({})
        self.frozen_peft_weight_names = {}  # per instance: PEFT re-freezes these after set_adapter
        self._columns: dict = {}  # adapter -> (device, expert index per rank column, scale per expert)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(
        self,
        adapter_name: str,
        config: LoraMixerConfig,
        ranks: Optional[list[int]] = None,
        alphas: Optional[list[float]] = None,
        experts: Optional[list] = None,
        **kwargs,
    ) -> None:
        """Create (or replace) the adapter ``adapter_name`` from ``config``.

        ``ranks`` / ``alphas`` (one per expert) override the config's for this module (rank_pattern, loaded folders);
        ``experts`` is a list of ``(A, B)`` per expert (from PEFT LoRA folders) copied into the stacked weights.
        """
        E = config.num_experts
        ranks = list(ranks if ranks is not None else config.r)
        alphas = [float(a) for a in (alphas if alphas is not None else config.lora_alpha)]
        if len(ranks) != E or len(alphas) != E:
            raise bad_value(config, "r", ranks, f"one rank and one alpha per expert ({E})")
        total = sum(ranks)
        self.r[adapter_name] = ranks
        self.lora_alpha[adapter_name] = alphas
        self.num_experts[adapter_name] = E
        self.top_k[adapter_name] = config.top_k
        self.temperature[adapter_name] = float(config.temperature)
        self.straight_through[adapter_name] = config.straight_through
        self.renormalize[adapter_name] = config.renormalize
        self.balance_loss_weight[adapter_name] = float(config.balance_loss_weight)
        self.entropy_loss_weight[adapter_name] = float(config.entropy_loss_weight)
        self.freeze_experts[adapter_name] = config.freeze_experts
        self.lora_mixer_router[adapter_name] = nn.Linear(self.in_features, E, bias=False)
        self.lora_mixer_down[adapter_name] = nn.Linear(self.in_features, total, bias=False)
        self.lora_mixer_up[adapter_name] = nn.Linear(total, self.out_features, bias=False)
        self.lora_mixer_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        )
        self._columns.pop(adapter_name, None)
        self.reset_parameters(adapter_name, config.init_weights, experts)
        frozen = dict(self.frozen_peft_weight_names)
        if config.freeze_experts:
            frozen[adapter_name] = EXPERT_LAYER_NAMES
        else:
            frozen.pop(adapter_name, None)
        self.frozen_peft_weight_names = frozen
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool = True, experts: Optional[list] = None) -> None:
        """Router kaiming-uniform(√5); experts A kaiming-uniform(√5) and B = 0 (``init_weights``; random B otherwise),
        or the given ``(A, B)`` per expert."""
        router = self.lora_mixer_router[adapter_name].weight
        down = self.lora_mixer_down[adapter_name].weight
        up = self.lora_mixer_up[adapter_name].weight
        nn.init.kaiming_uniform_(router, a=math.sqrt(5))
        if experts is not None:
            offset = 0
            for e, (A, B) in enumerate(experts):
                r = self.r[adapter_name][e]
                if tuple(A.shape) != (r, self.in_features) or tuple(B.shape) != (self.out_features, r):
                    raise ValueError(
                        f"Expert {e} does not fit this layer ({self.in_features} -> {self.out_features}): lora_A "
                        f"{tuple(A.shape)}, lora_B {tuple(B.shape)}; was that LoRA trained on another base model?"
                    )
                down[offset : offset + r].copy_(A)
                up[:, offset : offset + r].copy_(B)
                offset += r
            return
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # the bound depends on fan-in only: same as per expert
        if init_weights:
            nn.init.zeros_(up)
        else:
            nn.init.kaiming_uniform_(up, a=math.sqrt(5))

    def _column_weights(self, adapter: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert index of each rank column ``[Σ r_e]``, scale ``α_e/r_e`` of each expert ``[E]``), cached per
        device."""
        cached = self._columns.get(adapter)
        if cached is None or cached[0] != device:
            ranks, alphas = self.r[adapter], self.lora_alpha[adapter]
            owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)).to(device)
            scale = torch.tensor([a / r for a, r in zip(alphas, ranks)], dtype=torch.float32, device=device)
            cached = (device, owner, scale)
            self._columns[adapter] = cached
        return cached[1], cached[2]

    def route(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights ``[..., E]`` (fp32) for input ``x``; records load statistics and auxiliary
        losses."""
        E = self.num_experts[adapter]
        ids = self.call_inputs.get("expert_ids") if self.call_inputs else None
        if ids is not None:
            # dtype and shape only: LoraMixerModel checked the values once for the call (-1..E-1)
            ids = check_route_input("expert_ids", ids, x, kind="int", per_sample_ok=True)
            ids = ids.expand(x.shape[:-1])
            weights = F.one_hot(ids.clamp_min(0), E).float() * (ids >= 0).unsqueeze(-1)
            self.last_load[adapter] = expert_load(weights)
            self.last_probs[adapter] = self.last_load[adapter]
            return weights
        logits = self.lora_mixer_router[adapter](x)
        k = self.top_k[adapter]
        weights, mask, probs = topk_route(
            logits, k, renormalize=self.renormalize[adapter], temperature=self.temperature[adapter]
        )
        if self.straight_through[adapter] and k < E:
            # hard weights forward, d/dp backward; p - p.detach() is exactly 0, so the forward value is exact
            weights = weights.detach() + (probs - probs.detach())
        self.last_load[adapter] = expert_load(mask)
        self.last_probs[adapter] = probs.detach().reshape(-1, E).mean(dim=0)
        lam_bal, lam_ent = self.balance_loss_weight[adapter], self.entropy_loss_weight[adapter]
        if (lam_bal or lam_ent) and self.aux_recording():
            if lam_bal:
                self.record_aux_loss(lam_bal * load_balance_loss(probs, mask))
            if lam_ent:
                self.record_aux_loss(lam_ent * torch.special.entr(probs).sum(dim=-1).mean())
        return weights

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        weights = self.route(adapter, x)  # [..., E], router sees x before dropout
        owner, scale = self._column_weights(adapter, x.device)
        hidden = F.linear(self.lora_mixer_dropout[adapter](x), self.lora_mixer_down[adapter].weight)  # [..., Σ r_e]
        column = (weights * scale).index_select(-1, owner).to(hidden.dtype)  # w_e·s_e repeated over e's rank columns
        return F.linear(hidden * column, self.lora_mixer_up[adapter].weight)

    def expert_delta_weight(self, adapter: str, expert: int) -> torch.Tensor:
        """``ΔW_e = s_e·B_e·A_e`` of one expert (what a one-hot route to ``expert`` adds), ``[out, in]``."""
        ranks = self.r[adapter]
        if not 0 <= expert < len(ranks):
            raise bad_value("expert_delta_weight", "expert", expert, f"an index in 0..{len(ranks) - 1}")
        start, r = sum(ranks[:expert]), ranks[expert]
        A = self.lora_mixer_down[adapter].weight[start : start + r]
        B = self.lora_mixer_up[adapter].weight[:, start : start + r]
        return (B.float() @ A.float() * (self.lora_alpha[adapter][expert] / r)).to(A.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Refused: the update depends on each token's route (see ``expert_delta_weight`` for one expert's ΔW)."""
        raise ValueError(f"{type(self).__name__} cannot be merged: {self.merge_refusal}")

    def __repr__(self) -> str:
        return "lora_mixer." + super().__repr__()


class LoraMixerLinear(nn.Module, LoraMixerLayer):
    """LoRA-Mixer around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraMixerConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        LoraMixerLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = LoraMixerLayer.forward  # nn.Module comes first in the bases; use the tuner forward
