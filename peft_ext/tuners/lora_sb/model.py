"""LoRA-SB / LoRA-XS model: injects ``LoraSBLinear`` layers, each with a generator seed derived from the config's
``seed`` and its module name.

Paper: *Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning*
(LoRA-SB, https://arxiv.org/abs/2411.19557), official code https://github.com/RaghavSinghal10/lora-sb; LoRA-XS
https://arxiv.org/abs/2405.17604, official code https://github.com/MohammadrezaBanaei/LoRA-XS.
"""

from __future__ import annotations

import zlib

from torch import nn

from .._shared.base import ExtModel
from .layer import LoraSBLayer, LoraSBLinear


def layer_seed(seed: int, module_name: str) -> int:
    """The generator seed of one layer: a stable function of the config's ``seed`` and the module's name (< 2**31)."""
    return (seed * 1_000_003 + zlib.crc32(module_name.encode("utf-8"))) % 2**31


def lora_sb_layers(model: nn.Module) -> list[LoraSBLayer]:
    """All LoRA-SB layers inside ``model`` (a PeftModel, a LoraSBModel or any module holding them)."""
    return [m for m in model.modules() if isinstance(m, LoraSBLayer)]


class LoraSBModel(ExtModel):
    """LoRA-SB / LoRA-XS tuner model. With ``init='gradient'`` run ``peft_ext.init.lora_sb_init`` on the
    wrapped model before training."""

    prefix: str = "lora_sb_"
    tuner_layer_cls = LoraSBLayer
    layer_cls = LoraSBLinear

    def _layer_kwargs(self, config, adapter_name: str, current_key: str) -> dict:
        return {"layer_seed": layer_seed(config.seed, current_key)}
