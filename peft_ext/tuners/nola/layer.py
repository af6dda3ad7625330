"""NOLA layer: LoRA factors rebuilt from seeded random bases and trainable mixing coefficients.

Paper: *NOLA: Networks as Linear Combination of Low Rank Random Basis* (https://arxiv.org/abs/2310.02556).
Official code: https://github.com/UCDvision/NOLA (``gpt/src/model_nola.py``: ``GenerateParams``, ``NOLALinear``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners._buffer_dict import BufferDict

from .._shared.base import ExtLayer
from .config import NolaConfig

# Random streams of one layer seed: A0, the bases of A, the bases of B.
STREAM_A0, STREAM_A, STREAM_B = 0, 1, 2


def _generator(seed: int, stream: int, chunk: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed * 2**20 + stream * 2**16 + chunk)


def basis_chunk(seed: int, stream: int, chunk: int, n: int, num_basis: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Bases ``chunk·basis_chunk … +n`` of one stream: ``U(-1, 1)/√num_basis``, shape ``(n, *shape)``, CPU float32.

    Generated from a local generator seeded with (layer seed, stream, chunk index), so any chunk can be regenerated
    alone, bit-identically, on any machine."""
    u = torch.rand((n, *shape), generator=_generator(seed, stream, chunk), dtype=torch.float32)
    return (u * 2 - 1) / math.sqrt(num_basis)


def all_bases(seed: int, stream: int, num_basis: int, shape: tuple[int, ...], chunk: int) -> torch.Tensor:
    """All ``num_basis`` bases of a stream, shape ``(num_basis, *shape)``, CPU float32."""
    parts = [
        basis_chunk(seed, stream, j, min(chunk, num_basis - start), num_basis, shape)
        for j, start in enumerate(range(0, num_basis, chunk))
    ]
    return torch.cat(parts)


def a0_matrix(seed: int, r: int, in_features: int) -> torch.Tensor:
    """The frozen part A0 of A: kaiming-uniform (a=√5), i.e. ``U(-1/√in, 1/√in)``, shape ``(r, in)``, CPU float32."""
    u = torch.rand((r, in_features), generator=_generator(seed, STREAM_A0, 0), dtype=torch.float32)
    return (u * 2 - 1) / math.sqrt(in_features)


class _RegeneratedCombination(torch.autograd.Function):
    """``Σᵢ cᵢ Rᵢ`` with the bases regenerated chunk by chunk in forward and again in backward, never stored.

    The coefficient gradient is ``∂L/∂cᵢ = ⟨∂L/∂(Σ c R), Rᵢ⟩``.
    """

    @staticmethod
    def forward(coef, seed, stream, shape, chunk):
        k = coef.shape[0]
        out = torch.zeros(shape, device=coef.device, dtype=coef.dtype)
        for j, start in enumerate(range(0, k, chunk)):
            n = min(chunk, k - start)
            basis = basis_chunk(seed, stream, j, n, k, shape).to(coef.device, coef.dtype)
            out += torch.tensordot(coef[start : start + n], basis, dims=1)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        coef, seed, stream, shape, chunk = inputs
        ctx.meta = (seed, stream, shape, chunk, coef.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        seed, stream, shape, chunk, k = ctx.meta
        grads = []
        for j, start in enumerate(range(0, k, chunk)):
            n = min(chunk, k - start)
            basis = basis_chunk(seed, stream, j, n, k, shape).to(grad_out.device, grad_out.dtype)
            grads.append(torch.tensordot(basis, grad_out, dims=len(shape)))
        return torch.cat(grads), None, None, None, None


class _Coefficients(nn.Module):
    """A trainable coefficient vector stored as ``.weight`` so state-dict keys read ``…nola_coef_A.<adapter>.weight``
    (TRL copies ``.default.`` parameters into its reference adapter)."""

    def __init__(self, num: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num))


class NolaLayer(ExtLayer):
    """NOLA tuner layer.

    Trainable: ``nola_coef_A[adapter].weight`` (k_A) and ``nola_coef_B[adapter].weight`` (k_B). Saved but not
    trainable: ``nola_seed[adapter]``, the layer seed from which A0 and every basis regenerate."""

    adapter_layer_names = ("nola_coef_A", "nola_coef_B")
    other_param_names = ("r", "lora_alpha", "nola_seed", "nola_dropout", "cache_bases", "basis_chunk")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NolaConfig, layer_seed: int = 0, **kwargs):
        self._init_base(base_layer, **kwargs)
        self.r, self.lora_alpha, self.cache_bases, self.basis_chunk = {}, {}, {}, {}
        self.nola_coef_A = nn.ModuleDict({})
        self.nola_coef_B = nn.ModuleDict({})
        self.nola_dropout = nn.ModuleDict({})
        self.nola_seed = BufferDict({}, persistent=True)
        self._nola_cache: dict = {}
        self._seed_cache: dict = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_seed=layer_seed)

    def update_layer(self, adapter_name: str, config: NolaConfig, layer_seed: int = 0, **kwargs) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer from ``config``."""
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.cache_bases[adapter_name] = config.cache_bases
        self.basis_chunk[adapter_name] = config.basis_chunk
        self.nola_coef_A[adapter_name] = _Coefficients(config.num_basis_A)
        self.nola_coef_B[adapter_name] = _Coefficients(config.num_basis_B)
        self.nola_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.nola_seed[adapter_name] = torch.tensor([layer_seed], dtype=torch.int64)
        self._nola_cache.pop(adapter_name, None)
        if not config.init_weights:
            # A random adapter of LoRA's init_lora_weights=False size: a basis sum Σ c R with R ~ U(-1, 1)/√k and
            # c ~ N(0, σ²) has entries of std σ/√3, so σ = 1/√in gives A the scale of its kaiming-uniform A0 and
            # σ = 1/√r gives B that of a kaiming-uniform out×r matrix. Drawn from torch's global generator (as PEFT's
            # own random inits), so two adapters on one layer differ; the bases stay those of the layer seed.
            self.nola_coef_A[adapter_name].weight.data.normal_(0.0, 1.0 / math.sqrt(self.in_features))
            self.nola_coef_B[adapter_name].weight.data.normal_(0.0, 1.0 / math.sqrt(config.r))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _seed(self, adapter: str) -> int:
        """The stored layer seed as a Python int, read from the buffer only when the buffer changed (a device move
        replaces it, ``load_state_dict`` bumps its version), so a forward on a GPU does not sync on ``.item()``."""
        buf = self.nola_seed[adapter]
        key = (id(buf), buf._version)
        cached = self._seed_cache.get(adapter)
        if cached is None or cached[0] != key:
            cached = (key, int(buf.item()))
            self._seed_cache[adapter] = cached
        return cached[1]

    def _cached(self, adapter: str, device: torch.device, dtype: torch.dtype, with_bases: bool):
        """A0 (always) and, when caching, both basis stacks, for the stored seed on ``device``/``dtype``."""
        key = (self._seed(adapter), device, dtype, with_bases)
        entry = self._nola_cache.get(adapter)
        if entry is None or entry[0] != key:
            seed, r, chunk = key[0], self.r[adapter], self.basis_chunk[adapter]
            a0 = a0_matrix(seed, r, self.in_features).to(device, dtype)
            bases_a = bases_b = None
            if with_bases:
                k_a = self.nola_coef_A[adapter].weight.shape[0]
                k_b = self.nola_coef_B[adapter].weight.shape[0]
                bases_a = all_bases(seed, STREAM_A, k_a, (r, self.in_features), chunk).to(device, dtype)
                bases_b = all_bases(seed, STREAM_B, k_b, (self.out_features, r), chunk).to(device, dtype)
            entry = (key, a0, bases_a, bases_b)
            self._nola_cache[adapter] = entry
        return entry[1:]

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstructed LoRA factors ``A`` (r×in) and ``B`` (out×r), differentiable in the coefficients."""
        coef_a = self.nola_coef_A[adapter].weight
        coef_b = self.nola_coef_B[adapter].weight
        cache = self.cache_bases[adapter]
        a0, bases_a, bases_b = self._cached(adapter, coef_a.device, coef_a.dtype, with_bases=cache)
        if cache:
            return a0 + torch.tensordot(coef_a, bases_a, dims=1), torch.tensordot(coef_b, bases_b, dims=1)
        seed, r, chunk = self._seed(adapter), self.r[adapter], self.basis_chunk[adapter]
        a = a0 + _RegeneratedCombination.apply(coef_a, seed, STREAM_A, (r, self.in_features), chunk)
        b = _RegeneratedCombination.apply(coef_b, seed, STREAM_B, (self.out_features, r), chunk)
        return a, b

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors(adapter)
        scale = self.lora_alpha[adapter] / self.r[adapter]
        return F.linear(F.linear(self.nola_dropout[adapter](x), a), b) * scale

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = (lora_alpha/r)·B·A`` from the current coefficients."""
        with torch.no_grad():
            a, b = self.factors(adapter)
            return (b.float() @ a.float() * (self.lora_alpha[adapter] / self.r[adapter])).to(a.dtype)

    def __repr__(self) -> str:
        return "nola." + super().__repr__()


class NolaLinear(nn.Module, NolaLayer):
    """NOLA around a linear layer (``nn.Linear`` or a bitsandbytes 8-bit / 4-bit linear layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NolaConfig, **kwargs) -> None:
        nn.Module.__init__(self)
        NolaLayer.__init__(self, base_layer, adapter_name, config, **kwargs)

    forward = NolaLayer.forward  # nn.Module comes first in the bases; use the tuner forward
