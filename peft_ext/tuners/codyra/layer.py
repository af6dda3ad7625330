"""CoDyRA layer: ``ΔW = B diag(g) A`` with a per-rank importance ``g`` that a threshold schedule sparsifies.

Paper: *Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with
Dynamic Rank-Selective LoRA* (CoDyRA, https://arxiv.org/abs/2412.01004). Official code:
https://github.com/Artificer-AI-Lab/CoDyRA (``loralib/codyra.py``).
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from .._shared.base import ExtLayer, bad_value
from .config import THRESHOLD_MODES, CodyraConfig

PAST_NAMES = ("codyra_past_up", "codyra_past_down", "codyra_past_ranks")


def threshold_gate(gate: torch.Tensor, tau: float, mode: str = "soft") -> torch.Tensor:
    """One CoDyRA thresholding step of the importance vector ``gate`` (a new tensor; the input is left alone).

    ``mode="soft"``: the paper's proximal step for ``τ·‖g‖₁``, ``sign(g)·max(|g| − τ, 0)`` (exact zeros below τ).
    ``mode="official"``: the official code's three sequential in-place lines (``g[g > τ] −= τ``, ``g[g < −τ] += τ``,
    ``g[|g| < τ] = 0``), which zero ``τ < |g| < 2τ`` as well and leave ``|g| = τ`` untouched."""
    if mode not in THRESHOLD_MODES:
        raise bad_value("threshold_gate", "mode", mode, f"one of {THRESHOLD_MODES}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise bad_value("threshold_gate", "tau", tau, "a number >= 0")
    zero = torch.zeros((), dtype=gate.dtype, device=gate.device)
    if mode == "soft":
        return torch.where(gate.abs() > tau, gate - tau * torch.sign(gate), zero)
    shrunk = torch.where(gate > tau, gate - tau, torch.where(gate < -tau, gate + tau, gate))
    return torch.where(shrunk.abs() < tau, zero, shrunk)


class CodyraGate(nn.Module):
    """Holds the per-rank importance vector ``g`` (``weight``, shape ``(r,)``) of one CoDyRA adapter, so that its
    parameter is named ``codyra_gate.<adapter>.weight``."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(r))

    def extra_repr(self) -> str:
        return f"r={self.weight.shape[0]}"


def _task_delta(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ΔW of one folded task from its stored factors (the same expression in-process and at load time)."""
    return (up.float() @ down.float()).to(dtype)


def _fold_past_hook(module: "CodyraLayer", incompatible_keys) -> None:
    """``load_state_dict`` post-hook: fold loaded past-task factors into the base weight (once)."""
    module.sync_past_tasks()


class CodyraLayer(ExtLayer):
    """CoDyRA tuner layer.

    Weights: ``codyra_down[adapter]`` (A, ``r × in``, kaiming-uniform), ``codyra_up[adapter]`` (B, ``out × r``, zeros)
    and ``codyra_gate[adapter]`` (g, ``(r,)``, N(0, 1) from a local generator). The branch is
    ``((drop(x) Aᵀ) ⊙ g) Bᵀ`` with no scale. Pruned ranks are the zeros of ``g``: tensors are never resized mid-task,
    a zero entry contributes exactly nothing and ``get_delta_weight`` drops it.

    Continual learning: ``increment_task`` folds ``B diag(g) A`` (active ranks) into the base weight, records the
    folded factors in the buffers ``codyra_past_up/down/ranks`` (saved with the adapter) and re-initialises A, B, g.
    Loading an adapter that carries past tasks onto the original base folds them into its weight (a
    ``load_state_dict`` post-hook), task by task with the same arithmetic, so a fresh process reproduces the model.
    Consequences, by design: after ``increment_task`` (or loading such an adapter) ``disable_adapter()`` shows the base
    *with* the past tasks, and ``save_as_lora`` exports the current task only; ``delete_adapter`` takes the adapter's
    folded tasks out of the base weight again. Several continual adapters on one base add up their histories
    (warned)."""

    adapter_layer_names = ("codyra_down", "codyra_up", "codyra_gate")
    other_param_names = (
        "r",
        "threshold_mode",
        "gate_init",
        "gate_seed",
        "task_index",
        "layer_key",
        "codyra_dropout",
    ) + PAST_NAMES

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: CodyraConfig, layer_key: str = "",
                 **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        self.r, self.threshold_mode, self.gate_init, self.gate_seed = {}, {}, {}, {}
        self.task_index, self.layer_key = {}, {}
        self.codyra_down = nn.ModuleDict({})
        self.codyra_up = nn.ModuleDict({})
        self.codyra_gate = nn.ModuleDict({})
        self.codyra_dropout = nn.ModuleDict({})
        self.codyra_past_up = BufferDict({}, persistent=True)
        self.codyra_past_down = BufferDict({}, persistent=True)
        self.codyra_past_ranks = BufferDict({}, persistent=True)
        self._folded_past: dict = {}  # adapter -> (ranks, up, down) currently folded into the base weight
        self.register_load_state_dict_post_hook(_fold_past_hook)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_key=layer_key)

    def update_layer(self, adapter_name: str, config: CodyraConfig, layer_key: str = "", **kwargs) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``."""
        r = config.r
        self.r[adapter_name] = r
        self.threshold_mode[adapter_name] = config.threshold_mode
        self.gate_init[adapter_name] = config.gate_init
        self.gate_seed[adapter_name] = config.gate_seed
        self.task_index[adapter_name] = config.task_index
        self.layer_key[adapter_name] = layer_key
        self.codyra_down[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.codyra_up[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.codyra_gate[adapter_name] = CodyraGate(r)
        self.codyra_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.reset_adapter(adapter_name, random_up=not config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def draw_gate(self, adapter: str) -> torch.Tensor:
        """A fresh importance vector: ones, or N(0, 1) from a generator seeded by (gate_seed, layer, task index)."""
        r = self.r[adapter]
        if self.gate_init[adapter] == "ones":
            return torch.ones(r)
        key = f"{self.gate_seed[adapter]}|{self.layer_key[adapter]}|{self.task_index[adapter]}"
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return torch.randn(r, generator=generator)

    def reset_adapter(self, adapter: str, random_up: bool = False) -> None:
        """Re-initialise A (kaiming-uniform, global RNG like PEFT's LoRA), B (zeros) and g (``draw_gate``) in place,
        keeping the Parameter objects (shapes never change)."""
        down = self.codyra_down[adapter].weight
        up = self.codyra_up[adapter].weight
        gate = self.codyra_gate[adapter].weight
        with torch.no_grad():
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            if random_up:  # init_weights=False: a random, non-zero ΔW (tests and debugging)
                nn.init.kaiming_uniform_(up, a=math.sqrt(5))
            else:
                up.zero_()
            gate.copy_(self.draw_gate(adapter).to(gate.device, gate.dtype))

    # --- forward and merge -------------------------------------------------------------------------------------

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        down = self.codyra_down[adapter].weight
        up = self.codyra_up[adapter].weight
        gate = self.codyra_gate[adapter].weight
        return F.linear(F.linear(self.codyra_dropout[adapter](x), down) * gate, up)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = B diag(g) A`` over the active ranks only (``g ≠ 0``); pruned ranks are dropped."""
        down = self.codyra_down[adapter].weight
        up = self.codyra_up[adapter].weight
        gate = self.codyra_gate[adapter].weight
        keep = gate != 0
        return ((up[:, keep].float() * gate[keep].float()) @ down[keep].float()).to(down.dtype)

    # --- rank selection ----------------------------------------------------------------------------------------

    def effective_rank(self, adapter: str) -> int:
        """Number of active ranks of ``adapter`` (non-zero entries of g)."""
        return int(torch.count_nonzero(self.codyra_gate[adapter].weight).item())

    def rank_mask(self, adapter: str) -> torch.Tensor:
        """Boolean mask of the active ranks of ``adapter``."""
        return self.codyra_gate[adapter].weight.detach() != 0

    def apply_threshold(self, adapter: str, tau: float, mode: Optional[str] = None) -> int:
        """Threshold g of ``adapter`` in place with ``tau`` (``mode`` defaults to the adapter's ``threshold_mode``);
        returns the effective rank afterwards. Refused while the adapter is merged (ΔW would change under it)."""
        if adapter in self.merged_adapters:
            raise RuntimeError(
                f"CoDyRA adapter {adapter!r} is merged; thresholding would change ΔW under the merged weight. "
                "Call unmerge_adapter() first."
            )
        gate = self.codyra_gate[adapter].weight
        with torch.no_grad():
            gate.copy_(threshold_gate(gate, tau, mode or self.threshold_mode[adapter]))
        return self.effective_rank(adapter)

    # --- continual learning --------------------------------------------------------------------------------------

    def check_can_fold(self, adapter: str) -> None:
        """Raise unless ``increment_task`` can fold ``adapter`` into this layer's base weight."""
        if self.quantization_backend is not None:
            raise ValueError(
                f"CoDyRA increment_task rewrites the base weight, which is not possible exactly on a "
                f"{self.quantization_backend.backend_name} quantized base layer "
                f"({type(self.get_base_layer()).__name__}); "
                "use an unquantized (fp32/bf16) base model for continual training."
            )
        if adapter in self.merged_adapters:
            raise RuntimeError(f"CoDyRA adapter {adapter!r} is merged; call unmerge_adapter() before increment_task.")

    def increment_task(self, adapter: str) -> int:
        """Close the current task: fold ``B diag(g) A`` over the active ranks into the base weight, append the folded
        factors to the past-task buffers, then re-initialise A, B, g (the next gate draw uses task index + 1).
        Returns the number of ranks folded. Right after it the layer computes what it computed before (B = 0)."""
        self.check_can_fold(adapter)
        down = self.codyra_down[adapter].weight
        up = self.codyra_up[adapter].weight
        gate = self.codyra_gate[adapter].weight
        with torch.no_grad():
            keep = gate != 0
            task_up = up[:, keep].detach().clone()
            task_down = (down[keep] * gate[keep].unsqueeze(1)).detach().clone()
            if task_up.shape[1]:
                weight = self.get_base_weight()
                self.set_base_weight(weight + _task_delta(task_up, task_down, weight.dtype))
            rank = torch.tensor([task_up.shape[1]], dtype=torch.long, device=down.device)
            if adapter in self.codyra_past_ranks:
                task_up = torch.cat([self.codyra_past_up[adapter], task_up], dim=1)
                task_down = torch.cat([self.codyra_past_down[adapter], task_down], dim=0)
                rank = torch.cat([self.codyra_past_ranks[adapter], rank])
            self.codyra_past_up[adapter] = task_up
            self.codyra_past_down[adapter] = task_down
            self.codyra_past_ranks[adapter] = rank
            self._folded_past[adapter] = (rank.clone(), task_up.clone(), task_down.clone())
        self.task_index[adapter] += 1
        self.reset_adapter(adapter)
        return int(keep.sum().item())

    def prepare_past(self, adapter: str, name: str, like: torch.Tensor) -> None:
        """Create (or resize) the past-task buffer ``name`` of ``adapter`` to receive ``like`` from a checkpoint."""
        if name not in PAST_NAMES:
            raise bad_value("prepare_past", "name", name, f"one of {PAST_NAMES}")
        holder = getattr(self, name)
        device = self.codyra_down[adapter].weight.device if adapter in self.codyra_down else like.device
        dtype = like.dtype if name == "codyra_past_ranks" else self.codyra_down[adapter].weight.dtype
        if adapter in holder and holder[adapter].shape == like.shape and holder[adapter].dtype == dtype:
            return
        holder[adapter] = torch.zeros(like.shape, dtype=dtype, device=device)

    def sync_past_tasks(self) -> None:
        """Make the base weight hold exactly the past tasks recorded in the buffers (after a checkpoint load):
        unfold what was folded before if it differs, then fold the recorded tasks one by one."""
        for adapter in list(self.codyra_past_ranks.keys()):
            ranks = self.codyra_past_ranks[adapter]
            up, down = self.codyra_past_up[adapter], self.codyra_past_down[adapter]
            if ranks.device.type == "meta" or up.device.type == "meta":
                continue
            folded = self._folded_past.get(adapter)
            if folded is not None and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(folded, (ranks, up, down))
            ):
                continue
            if int(ranks.sum().item()) != up.shape[1] or up.shape[1] != down.shape[0]:
                raise ValueError(
                    f"CoDyRA past-task buffers of adapter {adapter!r} are inconsistent: ranks sum to "
                    f"{int(ranks.sum().item())}, up has {up.shape[1]} columns, down has {down.shape[0]} rows."
                )
            if folded is None and up.shape[1] == 0:
                self._folded_past[adapter] = (ranks.clone(), up.clone(), down.clone())
                continue
            self.check_can_fold(adapter)
            others = [a for a, f in self._folded_past.items() if a != adapter and f[1].shape[1]]
            if others and up.shape[1]:
                warnings.warn(
                    f"CoDyRA adapter {adapter!r} carries past tasks and is folded into a base weight that already "
                    f"holds the past tasks of {others}; their histories add up. Load one continual CoDyRA adapter "
                    "per base model."
                )
            weight = self._unfold(folded, self.get_base_weight()) if folded is not None else self.get_base_weight()
            start = 0
            for size in ranks.tolist():
                if size:
                    weight = weight + _task_delta(up[:, start:start + size], down[start:start + size], weight.dtype)
                start += size
            self.set_base_weight(weight)
            self._folded_past[adapter] = (ranks.clone(), up.clone(), down.clone())

    @staticmethod
    def _unfold(folded, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` minus the tasks recorded in ``folded`` = (ranks, up, down), last task first."""
        ranks, up, down = folded
        ends = torch.cumsum(ranks, 0).tolist()
        for end, size in reversed(list(zip(ends, ranks.tolist()))):
            if size:
                weight = weight - _task_delta(up[:, end - size:end], down[end - size:end], weight.dtype)
        return weight

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name``; past tasks it folded into the base weight are taken out again (up to rounding)."""
        folded = self._folded_past.pop(adapter_name, None)
        if folded is not None and folded[1].shape[1]:
            self.set_base_weight(self._unfold(folded, self.get_base_weight()))
        super().delete_adapter(adapter_name)

    def __repr__(self) -> str:
        return "codyra." + super().__repr__()


class CodyraLinear(nn.Module, CodyraLayer):
    """CoDyRA around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: CodyraConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        CodyraLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = CodyraLayer.forward  # nn.Module comes first in the bases; use the tuner forward
