"""Gated LoRA layer: LoRA branches switched on per token by per-call route inputs, fused into two GEMMs.

Papers: MTP gated LoRA https://arxiv.org/abs/2507.11851 (no official code; unofficial
https://github.com/siihwanpark/MTP-GLoRA), TARA https://arxiv.org/abs/2508.08812 (https://github.com/YuqiPeng77/TARA,
``TARALinearLayer``), Arcana MM-LoRA https://arxiv.org/abs/2410.13733 (no public code), RegionBLIP
https://arxiv.org/abs/2308.02299 (https://github.com/mightyzau/RegionBLIP, ``lora_modals.Linear``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.base import ExtLayer
from .._shared.routing import check_route_input
from .config import GatedLoraConfig

ROUTE_ARGS = ("route_ids", "modality", "gate")


class GatedLoraLayer(ExtLayer):
    """Gated LoRA tuner layer (MTP gated LoRA, TARA, MM-LoRA, RegionBLIP).

    Weights per adapter: ``gated_lora_down[adapter]`` stacks every branch's A (``[Σ r_b, in]``, kaiming-uniform) and
    ``gated_lora_up[adapter]`` every branch's B (``[out, Σ r_b]``, zeros), branch after branch in ``branches`` order.
    A routed forward is one GEMM into the stacked rank space, a per-token column select (``torch.where``: tokens keep
    only their branch's columns, scaled by ``α / r_b``) and one GEMM out; tokens routed to no branch take the base
    output through ``torch.where``, so they are bit-identical to the base model even when the branch is not finite.

    Route inputs follow this layer's token axis (``x.shape[:-1]``): a cross-attention ``to_k`` / ``to_v`` sees the
    text tokens, not the image tokens, so only such layers should be gated when those axes differ
    (``gated_modules``); a wrong shape raises an error naming the argument and the expected shape."""

    adapter_layer_names = ("gated_lora_down", "gated_lora_up")
    other_param_names = (
        "branches", "ranks", "lora_alpha", "mode", "default_idx", "gated", "align", "gated_lora_dropout",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GatedLoraConfig, **kwargs) -> None:
        self._init_base(base_layer)
        self.branches, self.ranks, self.lora_alpha, self.mode = {}, {}, {}, {}
        self.default_idx, self.gated, self.align = {}, {}, {}
        self.gated_lora_down = nn.ModuleDict({})
        self.gated_lora_up = nn.ModuleDict({})
        self.gated_lora_dropout = nn.ModuleDict({})
        self._columns: dict = {}  # (adapter, device, dtype) -> (branch id per column, scale per column)
        self._export_branch: dict = {}  # adapter -> branch name while save_branch_as_lora exports one branch
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(
        self, adapter_name: str, config: GatedLoraConfig, gated: bool = True, align: bool = False, **kwargs
    ) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``."""
        ranks = config.branch_ranks()
        total = sum(ranks)
        self.branches[adapter_name] = list(config.branches)
        self.ranks[adapter_name] = ranks
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.mode[adapter_name] = config.mode
        self.default_idx[adapter_name] = (
            config.branches.index(config.default_route) if config.default_route is not None else None
        )
        self.gated[adapter_name] = bool(gated) and config.mode == "route"
        self.align[adapter_name] = float(config.alignment_loss_weight) if (align and self.gated[adapter_name]) else 0.0
        self.gated_lora_down[adapter_name] = nn.Linear(self.in_features, total, bias=False)
        self.gated_lora_up[adapter_name] = nn.Linear(total, self.out_features, bias=False)
        self.gated_lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        )
        # kaiming-uniform over [Σr, in] has the same bound (fan_in = in) as per-branch initialisation
        nn.init.kaiming_uniform_(self.gated_lora_down[adapter_name].weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.gated_lora_up[adapter_name].weight)
        else:
            nn.init.kaiming_uniform_(self.gated_lora_up[adapter_name].weight, a=math.sqrt(5))
        self._columns = {k: v for k, v in self._columns.items() if k[0] != adapter_name}
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ------------------------------------------------------------------ helpers
    def _slice(self, adapter: str, b: int) -> slice:
        start = sum(self.ranks[adapter][:b])
        return slice(start, start + self.ranks[adapter][b])

    def _scale(self, adapter: str, b: int) -> float:
        return self.lora_alpha[adapter] / self.ranks[adapter][b]

    def _column_info(self, adapter: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (adapter, device, dtype)
        if key not in self._columns:
            ranks = self.ranks[adapter]
            branch = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
            scale = torch.tensor([self._scale(adapter, b) for b in range(len(ranks)) for _ in range(ranks[b])])
            self._columns[key] = (branch.to(device), scale.to(device=device, dtype=dtype))
        return self._columns[key]

    def _branch_index(self, adapter: str, name: str) -> int:
        branches = self.branches[adapter]
        if name not in branches:
            raise ValueError(
                f"route_ids names branch {name!r}, which adapter {adapter!r} does not have; branches: {branches}.")
        return branches.index(name)

    def _resolve_route(self, adapter: str, x: torch.Tensor):
        """What this forward applies for ``adapter``: ``("none",)``, ``("all", branch or None=every branch)`` or
        ``("tokens", route)`` with ``route`` broadcastable to ``x.shape[:-1]`` (−1 = base only)."""
        if not self.gated[adapter]:
            return ("all", None)
        inputs = self.call_inputs or {}
        given = [name for name in ROUTE_ARGS if inputs.get(name) is not None]
        if len(given) > 1:
            raise ValueError(f"Pass only one of route_ids=, modality=, gate= per call; got {given}.")
        nb = len(self.branches[adapter])
        default = self.default_idx[adapter]
        if not given:
            return ("none",) if default is None else ("all", default)
        name = given[0]
        value = inputs[name]
        if name == "route_ids":
            if isinstance(value, str):
                return ("all", self._branch_index(adapter, value))
            # dtype and shape only: GatedLoraModel checked the values once for the call (-1..branches-1)
            route = check_route_input("route_ids", value, x, kind="int", per_sample_ok=True)
            return ("tokens", route.long())
        if name == "modality":
            if nb != 2:
                raise ValueError(
                    f"modality= needs exactly two branches (True -> branches[0], False -> branches[1]); adapter "
                    f"{adapter!r} has {self.branches[adapter]}. Use route_ids= instead."
                )
            mask = check_route_input("modality", value, x, kind="bool", per_sample_ok=True)
            return ("tokens", (~mask).long())  # True -> 0 (e.g. vision), False -> 1 (e.g. language)
        if default is None and nb != 1:
            raise ValueError(
                f"gate= switches on the default_route branch, but adapter {adapter!r} has several branches "
                f"{self.branches[adapter]} and no default_route; set default_route or use route_ids=."
            )
        mask = check_route_input("gate", value, x, kind="bool", per_sample_ok=True)
        b = 0 if default is None else default
        return ("tokens", torch.where(mask, b, -1).long())

    # ------------------------------------------------------------------ forward
    def _delta_all(self, adapter: str, x: torch.Tensor, branch: Optional[int]) -> torch.Tensor:
        A = self.gated_lora_down[adapter].weight
        B = self.gated_lora_up[adapter].weight
        xd = self.gated_lora_dropout[adapter](x)
        if len(self.ranks[adapter]) == 1 or branch is not None:
            b = 0 if branch is None else branch
            cols = self._slice(adapter, b)
            if len(self.ranks[adapter]) > 1:
                A, B = A[cols], B[:, cols]
            return F.linear(F.linear(xd, A), B) * self._scale(adapter, b)
        _, scale = self._column_info(adapter, x.device, A.dtype)
        return F.linear(F.linear(xd, A) * scale, B)

    def _delta_routed(self, adapter: str, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        A = self.gated_lora_down[adapter].weight
        B = self.gated_lora_up[adapter].weight
        h = F.linear(self.gated_lora_dropout[adapter](x), A)
        if len(self.ranks[adapter]) == 1:
            h = h * self._scale(adapter, 0)  # rows routed to -1 are discarded by the caller's torch.where
        else:
            branch, scale = self._column_info(adapter, x.device, A.dtype)
            keep = route.unsqueeze(-1) == branch  # [..., Σr]: a token keeps its own branch's columns only
            h = torch.where(keep, h * scale, torch.zeros((), dtype=h.dtype, device=h.device))
        return F.linear(h, B)

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive output for ``x`` without the per-token select (used by merge checks and by
        callers outside a routed forward): the ``default_route`` branch, or every branch for ungated / sum layers."""
        route = self._resolve_route(adapter, x)
        if route[0] == "none":
            return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        if route[0] == "all":
            return self._delta_all(adapter, x, route[1])
        delta = self._delta_routed(adapter, x, route[1])
        zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
        return torch.where((route[1] >= 0).unsqueeze(-1), delta, zero)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged and not self.disable_adapters:
            given = [n for n in ROUTE_ARGS if (self.call_inputs or {}).get(n) is not None]
            if given and any(self.gated.get(a, False) for a in self.merged_adapters):
                raise ValueError(
                    f"The gated LoRA adapter is merged into the base weights and applies to every token; per-call "
                    f"{given} cannot be honoured. Call unmerge_adapter() first."
                )
        return ExtLayer.forward(self, x, *args, **kwargs)

    def add_adapter_output(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus the adapter's branch on the tokens this call routes to it (every token when ungated)."""
        route = self._resolve_route(adapter, x)
        if route[0] == "none":
            return result
        x_in = self._cast_input_dtype(x, self.adapter_dtype(adapter))
        if route[0] == "all":
            return result + self._delta_all(adapter, x_in, route[1]).to(result.dtype)
        routed = route[1]
        active = (routed >= 0).unsqueeze(-1)
        delta = self._delta_routed(adapter, x_in, routed).to(result.dtype)
        out = torch.where(active, result + delta, result)  # select rows: never 0·Δ, so base rows stay exact
        if self.align[adapter] and (self.call_inputs or {}).get("align_mask") is not None and self.aux_recording():
            self._record_alignment(adapter, x, result, out, routed)
        return out

    def _record_alignment(self, adapter, x, base, out, route) -> None:
        """TARA's token alignment loss on this layer: ``mean |(base+Δ)[routed tokens] − base[align_mask tokens]|``,
        the i-th routed token paired with the i-th class-word token (row-major order), as in TARA's training script.

        Computed without reading tensor values (no boolean indexing): both token sets are sorted to the front in
        order and the first ``n`` pairs are averaged. ``GatedLoraModel`` checked once per call that the two counts
        are equal and non-zero."""
        mask = check_route_input("align_mask", self.call_inputs["align_mask"], x, kind="bool")
        token_shape = out.shape[:-1]
        rare = (route >= 0).expand(token_shape).reshape(-1)
        cls = mask.expand(token_shape).reshape(-1)
        rare_first = torch.sort((~rare).to(torch.int32), stable=True).indices  # routed tokens first, in order
        cls_first = torch.sort((~cls).to(torch.int32), stable=True).indices
        width = out.shape[-1]
        diff = (out.reshape(-1, width)[rare_first] - base.reshape(-1, width)[cls_first]).abs().float()
        count = cls.sum()
        paired = (torch.arange(diff.shape[0], device=diff.device) < count).unsqueeze(-1)
        term = torch.where(paired, diff, torch.zeros((), dtype=diff.dtype, device=diff.device)).sum()
        self.record_aux_loss(self.align[adapter] * term / (count * width).clamp_min(1))

    # ------------------------------------------------------------------ merging and export
    def merge_refusal_for(self, adapter: str) -> Optional[str]:
        """Why ``adapter`` cannot be merged on this layer, or None when it can."""
        if adapter in self._export_branch or not self.gated.get(adapter, False):
            return None
        if self.default_idx[adapter] is None:
            return (
                f"adapter {adapter!r} is gated per token and has no default_route, so its effect exists only under "
                "per-call route inputs and there is no single weight to merge (set default_route to merge that "
                "branch, or export a branch with save_branch_as_lora)."
            )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge each adapter's no-route-input behaviour (the ``default_route`` branch on gated layers, every branch
        on ungated / ``mode='sum'`` layers); raise a ValueError where routing makes merging impossible."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for adapter in names:
            if self._has_adapter(adapter):
                refusal = self.merge_refusal_for(adapter)
                if refusal:
                    raise ValueError(f"GatedLoraLayer cannot be merged: {refusal}")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def branch_delta_weight(self, adapter: str, branch: str) -> torch.Tensor:
        """``ΔW_b = (α / r_b)·B_b·A_b`` of one branch (out × in), the gate dropped."""
        b = self._branch_index(adapter, branch)
        cols = self._slice(adapter, b)
        A = self.gated_lora_down[adapter].weight[cols]
        B = self.gated_lora_up[adapter].weight[:, cols]
        return ((B.float() @ A.float()) * self._scale(adapter, b)).to(A.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of what the adapter applies without route inputs: the exported branch during ``save_branch_as_lora``,
        else the ``default_route`` branch on gated layers and the sum of all branches on ungated / sum layers."""
        if adapter in self._export_branch:
            return self.branch_delta_weight(adapter, self._export_branch[adapter])
        refusal = self.merge_refusal_for(adapter)
        if refusal:
            raise ValueError(f"GatedLoraLayer cannot be merged: {refusal}")
        if self.gated[adapter]:
            return self.branch_delta_weight(adapter, self.branches[adapter][self.default_idx[adapter]])
        A = self.gated_lora_down[adapter].weight.float()
        B = self.gated_lora_up[adapter].weight.float()
        _, scale = self._column_info(adapter, A.device, torch.float32)
        return ((B * scale) @ A).to(self.gated_lora_down[adapter].weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return self.merge_refusal_for(adapter_name) is None

    def __repr__(self) -> str:
        return "gated_lora." + super().__repr__()


class GatedLoraLinear(nn.Module, GatedLoraLayer):
    """Gated LoRA around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer); see
    ``GatedLoraLayer``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GatedLoraConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        GatedLoraLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = GatedLoraLayer.forward
