"""LoRA-SB / LoRA-XS layer: ``y = W x + s·B R A x`` with frozen A, B and a trainable r×r R.

Paper: *Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning*
(LoRA-SB, https://arxiv.org/abs/2411.19557), official code https://github.com/RaghavSinghal10/lora-sb; architecture
from *LoRA-XS* (https://arxiv.org/abs/2405.17604), official code https://github.com/MohammadrezaBanaei/LoRA-XS.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners._buffer_dict import BufferDict

from .._shared.base import ExtLayer, bad_value
from .config import LoraSBConfig
from .svd import low_rank_svd, random_orthonormal

PENDING_WARNING = (
    "A LoRA-SB adapter (init='gradient') is training before peft_ext.init.lora_sb_init ran: it is still the zero-R "
    "placeholder with random frozen A and B. Call lora_sb_init(model, dataloader, lr=...) before training, or use "
    "init='svd' (LoRA-XS)."
)


def _round(t: torch.Tensor, factor_dtype: str) -> torch.Tensor:
    """Round a float32 factor through ``factor_dtype`` (the official code's bfloat16 cast), keeping float32."""
    return t.to(torch.bfloat16).float() if factor_dtype == "bfloat16" else t


class LoraSBLayer(ExtLayer):
    """LoRA-SB / LoRA-XS tuner layer.

    Trainable: ``lora_sb_R[adapter].weight`` (r×r). Frozen but saved with the adapter (they come from W or from data,
    so they cannot be regenerated): the persistent buffers ``lora_sb_A[adapter]`` (r×in) and ``lora_sb_B[adapter]``
    (out×r) and, with ``compensate=True``, the initial ``lora_sb_R0[adapter]``. Buffers never appear in
    ``parameters()``, so they never receive gradients or optimizer state."""

    adapter_layer_names = ("lora_sb_R",)
    other_param_names = (
        "lora_sb_A",
        "lora_sb_B",
        "lora_sb_R0",
        "lora_sb_dropout",
        "r",
        "scaling",
        "lora_sb_options",
        "lora_sb_pending",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraSBConfig, layer_seed: int = 0, **kwargs):
        self._init_base(base_layer, **kwargs)
        self.r, self.scaling, self.lora_sb_options, self.lora_sb_pending = {}, {}, {}, {}
        self.lora_sb_R = nn.ModuleDict({})
        self.lora_sb_A = BufferDict({}, persistent=True)
        self.lora_sb_B = BufferDict({}, persistent=True)
        self.lora_sb_R0 = BufferDict({}, persistent=True)
        self.lora_sb_dropout = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.register_load_state_dict_pre_hook(LoraSBLayer._loaded_factors_hook)
        self.update_layer(adapter_name, config, layer_seed=layer_seed)

    @staticmethod
    def _loaded_factors_hook(module, state_dict, prefix, *args) -> None:
        """Factors loaded from a saved adapter are final: clear the 'lora_sb_init has not run' flag."""
        for adapter in list(module.lora_sb_pending):
            if f"{prefix}lora_sb_A.{adapter}" in state_dict:
                module.lora_sb_pending[adapter] = False

    def update_layer(self, adapter_name: str, config: LoraSBConfig, layer_seed: int = 0, **kwargs) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``: the SVD of W for
        ``init='svd'``, the zero-R placeholder for ``init='gradient'``."""
        r = config.r
        if r > min(self.in_features, self.out_features):
            raise bad_value(
                config, "r", r,
                f"an integer <= min(in_features, out_features) = {min(self.in_features, self.out_features)} for "
                f"every target layer ({self.out_features}×{self.in_features} here)",
            )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.lora_sb_options[adapter_name] = {
            "svd_niter": config.svd_niter,
            "svd_oversample": config.svd_oversample,
            "factor_dtype": config.factor_dtype,
            "compensate": config.compensate,
            "seed": layer_seed,
        }
        self.lora_sb_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        gen = torch.Generator().manual_seed(layer_seed)
        if config.init == "svd":
            U, S, Vh = low_rank_svd(
                self.get_base_weight(), r, config.svd_niter, config.svd_oversample, generator=gen
            )
            B, A = U.cpu(), (S.unsqueeze(1) * Vh).cpu()  # B·A = W_r, the best rank-r approximation of W
            # init_weights=False: a random R from torch's global generator (as PEFT's random inits), so two adapters on
            # one layer differ; A and B are the SVD of W either way
            if config.init_weights:
                R = torch.randn((r, r), generator=gen) * config.r_init_std
            else:
                R = torch.randn(r, r) * 0.1
            self.lora_sb_pending[adapter_name] = False
        else:
            B = random_orthonormal(self.out_features, r, gen)
            A = random_orthonormal(self.in_features, r, gen).T.contiguous()
            R = torch.zeros(r, r) if config.init_weights else torch.randn(r, r) * 0.1
            self.lora_sb_pending[adapter_name] = config.init_weights
        self.lora_sb_R[adapter_name] = nn.Linear(r, r, bias=False)
        if adapter_name in self.lora_sb_R0:  # re-created without compensation
            del self.lora_sb_R0[adapter_name]
        self._write_factors(adapter_name, A, B, R, fresh=True)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._capture_R0(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _write_factors(self, adapter: str, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, fresh: bool) -> None:
        """Store float32 factors (rounded through ``factor_dtype``); R is written in place so an optimizer already
        holding it keeps working."""
        opts = self.lora_sb_options[adapter]
        A, B, R = (_round(t.float(), opts["factor_dtype"]) for t in (A, B, R))
        holder = self.lora_sb_R[adapter]
        if fresh:
            self.lora_sb_A[adapter] = A
            self.lora_sb_B[adapter] = B
            with torch.no_grad():
                holder.weight.copy_(R)
            return
        device, dtype = holder.weight.device, holder.weight.dtype
        old = self.lora_sb_A[adapter]
        self.lora_sb_A[adapter] = A.to(old.device)
        self.lora_sb_B[adapter] = B.to(old.device)
        with torch.no_grad():
            holder.weight.copy_(R.to(device, dtype))
        self._capture_R0(adapter)

    def _capture_R0(self, adapter: str) -> None:
        """With ``compensate=True``, remember R as it is stored now (after any cast to the base dtype), so
        ``R - R₀`` is exactly zero at the start, also after a later upcast of R."""
        if self.lora_sb_options[adapter]["compensate"]:
            R = self.lora_sb_R[adapter].weight
            if R.is_meta:  # low_cpu_mem_usage: R arrives with the adapter file, and so does its saved R₀
                self.lora_sb_R0[adapter] = torch.zeros(R.shape, device=self._factor_device(adapter))
                return
            self.lora_sb_R0[adapter] = R.detach().float().clone()

    def _factor_device(self, adapter: str) -> torch.device:
        """Where A, B (and R₀) live: beside R, or beside the base weight while R is still on the meta device
        (``low_cpu_mem_usage``), since buffers must hold real values for PEFT's device moves."""
        R = self.lora_sb_R[adapter].weight
        return self.get_base_layer().weight.device if R.is_meta else R.device

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move the adapter to the base layer's device; R takes the base dtype like every PEFT adapter weight, while
        the frozen factors A, B (and R₀) stay float32, so their precision is the config's ``factor_dtype`` and not
        the base model's (a bfloat16 base would otherwise round them)."""
        factors = [(d, d[adapter_name]) for d in (self.lora_sb_A, self.lora_sb_B, self.lora_sb_R0) if adapter_name in d]
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        target = self._factor_device(adapter_name) if adapter_name in self.lora_sb_R else device
        for d, t in factors:
            d[adapter_name] = t.to(target, torch.float32)

    def init_from_update(self, adapter: str, delta: torch.Tensor) -> None:
        """LoRA-SB initialisation from a full-weight update ``Δ`` (out×in): ``Δ_r = U S Vᵀ``, ``B = U``, ``A = Vᵀ``,
        ``R = diag(S)``, so ``B R A = [Δ]_r`` (the official code's choice; the adapter then adds ``s·[Δ]_r``, which
        is ``[Δ]_r`` in the paper's setting ``lora_alpha = r``)."""
        if adapter not in self.r:
            raise ValueError(f"init_from_update: this layer has no LoRA-SB adapter {adapter!r}.")
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(
                "init_from_update: the update must have the base weight's shape "
                f"{(self.out_features, self.in_features)}; got {tuple(delta.shape)}."
            )
        if adapter in self.merged_adapters:
            raise RuntimeError(f"Adapter {adapter!r} is merged; call unmerge_adapter() before re-initialising it.")
        opts = self.lora_sb_options[adapter]
        gen = torch.Generator().manual_seed(opts["seed"] + 1)
        device = self.lora_sb_A[adapter].device
        U, S, Vh = low_rank_svd(delta.to(device), self.r[adapter], opts["svd_niter"], opts["svd_oversample"], gen)
        self._write_factors(adapter, Vh, U, torch.diag(S), fresh=False)
        self.lora_sb_pending[adapter] = False

    def effective_R(self, adapter: str) -> torch.Tensor:
        """The r×r matrix the adapter applies: ``R`` (or ``R - R₀`` with ``compensate=True``)."""
        R = self.lora_sb_R[adapter].weight
        if adapter in self.lora_sb_R0:
            R = R - self.lora_sb_R0[adapter].to(R.dtype)  # R₀ was captured from R's stored values: exact zero at start
        return R

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and self.lora_sb_pending.get(adapter):
            warnings.warn(PENDING_WARNING)
        A = self.lora_sb_A[adapter].to(x.dtype)
        B = self.lora_sb_B[adapter].to(x.dtype)
        Rs = self.effective_R(adapter) * self.scaling[adapter]  # scale the r×r matrix, not the out-sized result
        return F.linear(F.linear(F.linear(self.lora_sb_dropout[adapter](x), A), Rs), B)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = s·B R A`` (``s·B (R - R₀) A`` with ``compensate=True``), computed in float32."""
        R = self.effective_R(adapter)
        A, B = self.lora_sb_A[adapter].float(), self.lora_sb_B[adapter].float()
        return (B @ R.float() @ A * self.scaling[adapter]).to(R.dtype)

    def __repr__(self) -> str:
        return "lora_sb." + super().__repr__()


class LoraSBLinear(nn.Module, LoraSBLayer):
    """LoRA-SB / LoRA-XS around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraSBConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        LoraSBLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = LoraSBLayer.forward  # nn.Module comes first in the bases; use the tuner forward
