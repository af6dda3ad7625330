"""NOLA model: injects ``NolaLinear`` layers, each with its own seed derived from the base seed and its name.

Paper: *NOLA: Networks as Linear Combination of Low Rank Random Basis* (https://arxiv.org/abs/2310.02556).
Official code: https://github.com/UCDvision/NOLA.
"""

from __future__ import annotations

import zlib

from .._shared.base import ExtModel
from .layer import NolaLayer, NolaLinear


def layer_seed(basis_seed: int, module_name: str) -> int:
    """The seed of one layer: a stable function of the config's ``basis_seed`` and the module's name (< 2**31)."""
    return (basis_seed * 1_000_003 + zlib.crc32(module_name.encode("utf-8"))) % 2**31


class NolaModel(ExtModel):
    """NOLA tuner model."""

    prefix: str = "nola_"
    tuner_layer_cls = NolaLayer
    layer_cls = NolaLinear

    def _layer_kwargs(self, config, adapter_name: str, current_key: str) -> dict:
        return {"layer_seed": layer_seed(config.basis_seed, current_key)}
