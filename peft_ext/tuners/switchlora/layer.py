"""SwitchLoRA layer: a LoRA whose A-rows and B-columns are swapped with frozen candidate vectors during training, the
base weight absorbing each swap so that the layer's function does not change.

Paper: *SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information* (https://arxiv.org/abs/2406.06564).
Official code: https://github.com/asfsdsf/SwitchLoRA (``switchlora/switch_lora.py``, ``switchlora/lora_utils.py``).
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import fsdp
from .._shared.base import ExtLayer
from .config import SwitchLoraConfig


def init_bounds(in_features: int, out_features: int, r: int, paper: bool = True) -> tuple[float, float]:
    """Uniform bounds (√3·std) of A and B (and of their candidates) for SwitchLoRA (official
    ``get_init_lora_bound``).

    ``paper=True``: ``std_A = ((√m·r)/n^{3/2})^{1/4}·√gain``, ``std_B = (r/√(mn))^{1/4}·√gain`` with ``m = out``,
    ``n = in``, ``gain = √(1/3)`` (torch's leaky-ReLU gain for slope √5). ``paper=False``: the official
    ``origin_lora`` init, ``std_A = gain/√n`` (kaiming-uniform) and ``std_B = 0``."""
    m, n = out_features, in_features
    gain = math.sqrt(1.0 / 3.0)
    if paper:
        std_a = ((math.sqrt(m) * r) / n**1.5) ** 0.25 * math.sqrt(gain)
        std_b = (r / math.sqrt(m * n)) ** 0.25 * math.sqrt(gain)
    else:
        std_a, std_b = gain / math.sqrt(n), 0.0
    return math.sqrt(3.0) * std_a, math.sqrt(3.0) * std_b


class SwitchLoraBank(nn.Module):
    """The two frozen candidate banks of one adapter on one layer: ``a`` (N×in, candidate rows of A) and ``b``
    (N×out, candidate columns of B). Slots currently used by A / B hold stale copies; a switched-out vector is
    written back into its own slot. Persistent buffers, saved with the adapter so that training can resume."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)


class SwitchLoraTrack(nn.Module):
    """Switching state of one adapter on one layer (persistent int64 buffers, saved with the adapter):

    * ``slot_a`` / ``slot_b`` (r,): bank slot each row of A / column of B came from,
    * ``frozen_a`` / ``frozen_b`` (r,): optimizer steps the row / column stays frozen (zero gradient),
    * ``cursor`` (2,): next position of A and of B to switch (the official code's ``candidate_A/B_index``),
    * ``switched`` (): vectors switched so far (A-rows + B-columns); > 0 means the base weight was rewritten.
    """

    def __init__(self, slot_a: torch.Tensor, slot_b: torch.Tensor, cursor_b: int):
        super().__init__()
        r = slot_a.numel()
        self.register_buffer("slot_a", slot_a)
        self.register_buffer("slot_b", slot_b)
        self.register_buffer("frozen_a", torch.zeros(r, dtype=torch.long))
        self.register_buffer("frozen_b", torch.zeros(r, dtype=torch.long))
        self.register_buffer("cursor", torch.tensor([0, cursor_b], dtype=torch.long))
        self.register_buffer("switched", torch.zeros((), dtype=torch.long))


def _layer_generator(seed: Optional[int], key: str) -> Optional[torch.Generator]:
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


class SwitchLoraLayer(ExtLayer):
    """SwitchLoRA tuner layer.

    Weights: ``switchlora_down[adapter]`` (A, r×in) and ``switchlora_up[adapter]`` (B, out×r); the branch is
    ``s·x Aᵀ Bᵀ`` with ``s = α/r``. ``switchlora_bank[adapter]`` holds the candidate banks, ``switchlora_track``
    the switching state. ``switch(adapter, k)`` swaps k rows of A and k columns of B (the callback
    ``peft_ext.callbacks.switchlora.SwitchLoraCallback`` calls it each optimizer step).

    Initialisation as in the official code: candidates uniform in ±bound (``init_bounds``); A starts as the last r
    A-candidates, B as the last r B-candidates rotated by r//2 (the B cursor starts r//2 ahead of the A cursor, so the
    two never switch the same position at once); with ``compensate_init`` (default, the official ``layer2lora``) the
    base weight becomes ``W − s·B·A`` right away, so the layer starts at the base function and its W counts as
    rewritten from step 0 (``base_weight_mutated``; ``save_pretrained`` stores it). Several SwitchLoRA adapters on one
    layer share W: each compensated adapter subtracts its own start ``s·B₀A₀``, switches of any of them rewrite it,
    and ``disable_adapter()`` / ``delete_adapter()`` leave it rewritten.

    The candidate banks stay float32 whatever the base dtype (PEFT's device move would cast them to a bfloat16 base's
    dtype and round every switched-out vector), so with float32 A and B (PEFT's default ``autocast_adapter_dtype``)
    a switch moves vectors between A / B and the banks without rounding."""

    adapter_layer_names = ("switchlora_down", "switchlora_up")
    other_param_names = (
        "r", "lora_alpha", "scaling", "switchlora_dropout", "switchlora_bank", "switchlora_track", "bank_device",
        "schedule", "init_compensated",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SwitchLoraConfig, **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        if self.quantization_backend is not None:
            raise ValueError(
                f"SwitchLoRA rewrites the base weight at every switch, so it cannot adapt the quantized layer "
                f"{type(self.get_base_layer()).__name__} ({self.quantization_backend.backend_name}); load the base "
                "model without quantization (SwitchLoraConfig targets full-precision nn.Linear layers only)."
            )
        self.r, self.lora_alpha, self.scaling, self.bank_device, self.schedule = {}, {}, {}, {}, {}
        self.init_compensated: dict[str, bool] = {}  # adapter -> its start s·B₀A₀ was subtracted from W
        self.switchlora_down = nn.ModuleDict({})
        self.switchlora_up = nn.ModuleDict({})
        self.switchlora_dropout = nn.ModuleDict({})
        self.switchlora_bank = nn.ModuleDict({})
        self.switchlora_track = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(self, adapter_name: str, config: SwitchLoraConfig, module_key: str = "", **kwargs) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``."""
        r, n, m = config.r, self.in_features, self.out_features
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.scaling[adapter_name] = float(config.lora_alpha) / r
        self.bank_device[adapter_name] = config.bank_device
        self.schedule[adapter_name] = {
            "switch_interval": float(config.switch_interval),
            "switch_descent_rate": float(config.switch_descent_rate),
            "switch_rate_base": float(config.switch_rate_base),
            "fixed_interval": bool(config.fixed_interval),
            "adam_warm_step": int(config.adam_warm_step),
            "reset_optimizer_state": bool(config.reset_optimizer_state),
        }
        num = config.num_candidates if config.num_candidates is not None else max(min(n, m), r)
        bound_a, bound_b = init_bounds(n, m, r, paper=not config.origin_lora_init)
        gen = _layer_generator(config.init_seed, f"{module_key}/{adapter_name}")
        bank_a = (torch.rand(num, n, generator=gen) * 2 - 1) * bound_a
        bank_b = (torch.rand(num, m, generator=gen) * 2 - 1) * bound_b
        slot_a = torch.arange(num - r, num)
        slot_b = num - r + (torch.arange(r) - r // 2) % r  # the official shift by r//2
        down = nn.Linear(n, r, bias=False)
        up = nn.Linear(r, m, bias=False)
        with torch.no_grad():
            down.weight.copy_(bank_a[slot_a])
            up.weight.copy_(bank_b[slot_b].T)
        self.switchlora_down[adapter_name] = down
        self.switchlora_up[adapter_name] = up
        dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.switchlora_dropout[adapter_name] = dropout
        self.switchlora_bank[adapter_name] = SwitchLoraBank(bank_a, bank_b)
        self.switchlora_track[adapter_name] = SwitchLoraTrack(slot_a, slot_b, r // 2)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.init_compensated[adapter_name] = False
        if config.compensate_init and config.init_weights and bound_b > 0:  # init_weights=False: a random start
            self._compensate_start(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def _compensate_start(self, adapter: str) -> None:
        """``W −= s·B·A`` (computed in float32) with A, B as stored after the move to the base device and dtype."""
        A, B = self.switchlora_down[adapter].weight, self.switchlora_up[adapter].weight
        W = self.get_base_layer().weight
        if W.device.type == "meta" or A.device.type == "meta":
            return  # loading onto empty weights: the saved W replaces it anyway
        W.sub_((B.float() @ A.float() * self.scaling[adapter]).to(W.dtype))
        self.init_compensated[adapter] = True

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # The banks are taken out of PEFT's move, which would cast them to the base dtype (bfloat16 rounds them).
        bank = self.switchlora_bank.pop(adapter_name) if adapter_name in self.switchlora_bank else None
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        if bank is not None:
            self.switchlora_bank[adapter_name] = bank.float()
            self.place_bank(adapter_name)

    def place_bank(self, adapter: str) -> None:
        """Keep the banks of ``adapter`` on their configured device (``bank_device``; None: beside the adapter)."""
        if adapter not in self.switchlora_bank:
            return
        target = self.bank_device.get(adapter)
        bank = self.switchlora_bank[adapter]
        target = torch.device(target) if target is not None else self.switchlora_down[adapter].weight.device
        if target.type == "meta" or bank.a.device.type == "meta":
            return
        if bank.a.device.type != target.type or (target.index is not None and bank.a.device.index != target.index):
            bank.to(target)

    # ---------------------------------------------------------------- forward / merge
    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        A = self.switchlora_down[adapter].weight
        B = self.switchlora_up[adapter].weight
        return F.linear(F.linear(self.switchlora_dropout[adapter](x), A), B) * self.scaling[adapter]

    def lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) with the adapter's branch ΔW = s·B·A (the base weight also carries the switch compensation)."""
        return self.switchlora_down[adapter].weight, self.switchlora_up[adapter].weight, self.scaling[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = s·B·A`` (the switch compensation already lives in the base weight)."""
        A = self.switchlora_down[adapter].weight
        B = self.switchlora_up[adapter].weight
        return ((B.float() @ A.float()) * self.scaling[adapter]).to(A.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # s·B·A alone reproduces the adapter only while the base weight is unchanged.
        return not self.base_weight_mutated()

    # ---------------------------------------------------------------- switching
    def base_weight_mutated(self) -> bool:
        """Whether this layer's base weight was rewritten: by the initial compensation of a SwitchLoRA adapter
        (``compensate_init``) or by a switch of one."""
        return any(self.init_compensated.values()) or any(
            int(track.switched) > 0 for track in self.switchlora_track.values()
        )

    def frozen_counts(self, adapter: str) -> tuple[int, int]:
        """Number of A-rows and of B-columns of ``adapter`` that are frozen right now."""
        track = self.switchlora_track[adapter]
        return int((track.frozen_a > 0).sum()), int((track.frozen_b > 0).sum())

    def available_switches(self, adapter: str) -> int:
        """The most vectors of each kind ``switch`` may take now (the official code's ``available_num``).

        The A cursor may not reach the A-rows frozen behind the B cursor (and vice versa), and no more than
        ``N − r`` candidates exist.
        """
        track = self.switchlora_track[adapter]
        r = self.r[adapter]
        free = self.switchlora_bank[adapter].a.shape[0] - r
        if free <= 0:
            return 0
        c_a, c_b = (int(c) for c in track.cursor.tolist())
        f_a, f_b = self.frozen_counts(adapter)
        return max(0, min((c_b - f_a - c_a) % r, (c_a - f_b - c_b) % r, free))

    @torch.no_grad()
    def switch(self, adapter: str, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Switch ``num`` rows of A and ``num`` columns of B of ``adapter`` at the cursors; return the positions
        switched ``(rows_of_A, columns_of_B)`` (long tensors on the adapter's device).

        For A-row i going from ``a_i`` to candidate ``c``: ``W += s·B[:, i](a_i − c)ᵀ``, bank slot of i ← ``a_i``,
        ``A[i] ← c``, and B-column i (the partner) is frozen for ``adam_warm_step`` steps. Then the same for B-columns
        j (``W += s·(b_j − c)·A[j]``, with A after its own switch), freezing A-row j. The layer's output
        ``xWᵀ + s·xAᵀBᵀ`` is unchanged up to float rounding. New candidates are taken after the previously selected
        slot (the official "continuous" selection).
        """
        A_param = self.switchlora_down[adapter].weight
        B_param = self.switchlora_up[adapter].weight
        dev = A_param.device
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        if num <= 0:
            return empty, empty
        if adapter in self.merged_adapters:
            raise RuntimeError(f"SwitchLoRA adapter {adapter!r} is merged; unmerge_adapter() before switching.")
        # FSDP2 shards A, B and W (DTensors): edit full copies of A and B (small; the parameters themselves when
        # unsharded) and this rank's rows of W, then write A and B back into the shards
        A, B = fsdp.gathered(A_param), fsdp.gathered(B_param)
        W, rows = fsdp.local_shard(self.get_base_layer().weight)
        self.place_bank(adapter)
        bank, track = self.switchlora_bank[adapter], self.switchlora_track[adapter]
        r, s = self.r[adapter], self.scaling[adapter]
        n_cand = bank.a.shape[0]
        warm = self.schedule[adapter]["adam_warm_step"]
        c_a, c_b = (int(c) for c in track.cursor.tolist())
        steps = torch.arange(num, device=track.slot_a.device)

        # rows of A
        pos_a = (c_a + steps) % r
        new_a = (track.slot_a[(c_a - 1) % r] + 1 + steps) % n_cand
        pa, bank_dev = pos_a.to(dev), bank.a.device
        old = A.index_select(0, pa)
        cand = bank.a.index_select(0, new_a.to(bank_dev)).to(dev, A.dtype)
        W.addmm_(B.index_select(1, pa)[rows].to(W.dtype), (old - cand).to(W.dtype), alpha=s)
        bank.a.index_copy_(0, track.slot_a[pos_a].to(bank_dev), old.to(bank_dev, bank.a.dtype))
        A.index_copy_(0, pa, cand)
        track.slot_a[pos_a] = new_a
        track.frozen_b[pos_a] = warm

        # columns of B
        pos_b = (c_b + steps) % r
        new_b = (track.slot_b[(c_b - 1) % r] + 1 + steps) % n_cand
        pb = pos_b.to(dev)
        old = B.index_select(1, pb)  # out×num
        cand = bank.b.index_select(0, new_b.to(bank_dev)).to(dev, B.dtype).T  # out×num
        W.addmm_((old - cand)[rows].to(W.dtype), A.index_select(0, pb).to(W.dtype), alpha=s)
        bank.b.index_copy_(0, track.slot_b[pos_b].to(bank_dev), old.T.to(bank_dev, bank.b.dtype))
        B.index_copy_(1, pb, cand)
        track.slot_b[pos_b] = new_b
        track.frozen_a[pos_b] = warm

        fsdp.write_back(A_param, A)
        fsdp.write_back(B_param, B)
        track.cursor[0] = (c_a + num) % r
        track.cursor[1] = (c_b + num) % r
        track.switched += 2 * num
        return pa, pb

    @torch.no_grad()
    def freeze_gradients(self, adapter: str) -> None:
        """Zero the gradients of the frozen rows of A and columns of B, then count one frozen step off."""
        track = self.switchlora_track[adapter]
        A = self.switchlora_down[adapter].weight
        B = self.switchlora_up[adapter].weight
        if A.grad is not None:  # FSDP2: this rank's rows of the gradient (all rows without FSDP)
            grad, rows = fsdp.local_shard(A.grad)
            grad.masked_fill_((track.frozen_a > 0).to(grad.device)[rows, None], 0)
        if B.grad is not None:
            grad, _ = fsdp.local_shard(B.grad)
            grad.masked_fill_((track.frozen_b > 0).to(grad.device)[None, :], 0)
        track.frozen_a.sub_(1).clamp_(min=0)
        track.frozen_b.sub_(1).clamp_(min=0)

    def __repr__(self) -> str:
        return "switchlora." + super().__repr__()


class SwitchLoraLinear(nn.Module, SwitchLoraLayer):
    """SwitchLoRA around a full-precision ``nn.Linear`` (quantized bases are refused: switching rewrites W)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SwitchLoraConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        SwitchLoraLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = SwitchLoraLayer.forward  # nn.Module comes first in the bases; use the tuner forward
