"""Shared fixtures: tiny random models (Llama with hidden 64 so bitsandbytes works on CPU, and an MLP), the registry's
methods as test parameters, and helpers that build configs and make adapters non-trivial."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import peft_ext  # noqa: E402,F401  (registers every method)
from peft_ext import list_methods  # noqa: E402

METHODS = list_methods()
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
MLP_TARGETS = ["lin0", "lin1"]


def method_params(predicate=lambda spec: True):
    """Registry specs as pytest params with readable ids; a new method is covered the moment it is registered."""
    return [pytest.param(spec, id=spec.name) for spec in METHODS if predicate(spec)]


def make_config(spec, target_modules, **overrides):
    """The spec's example config on ``target_modules``."""
    return spec.config_cls(**{**spec.example_kwargs, "target_modules": list(target_modules), **overrides})


def conformance_config(spec, target_modules, **overrides):
    """The example config with the spec's ``conformance_kwargs`` on top (auxiliary losses on, routed branches)."""
    return make_config(spec, target_modules, **{**spec.conformance_kwargs, **overrides})


def call_kwargs(spec, token_shape):
    """The spec's per-call inputs (route ids, masks) for a call whose layers see ``token_shape``; {} when none."""
    return spec.example_call(tuple(token_shape)) if spec.example_call is not None else {}


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def tiny_llama(seed: int = 0):
    """A tiny random LlamaForCausalLM in eval mode; the same seed gives the same weights in any process."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


class MLP(nn.Module):
    """A tiny MLP with 64-wide linear layers (bitsandbytes-compatible)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(64, 64)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


def tiny_mlp(seed: int = 0):
    torch.manual_seed(seed)
    return MLP().eval()


def randomize_adapter(model, seed: int = 1, std: float = 0.1):
    """Give every trainable adapter parameter random values so that merges and reloads test something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error used for the fp32 ≤ 1e-5 merge promise."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def llama_inputs():
    torch.manual_seed(123)
    return torch.randint(0, 128, (2, 12))


@pytest.fixture
def mlp_inputs():
    torch.manual_seed(123)
    return torch.randn(5, 64)
