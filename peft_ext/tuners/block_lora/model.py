"""Block-LoRA model: injects ``BlockLoraLinear`` layers.

Paper: *One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning*
(https://arxiv.org/abs/2501.16720). Official code: no public code.
"""

from __future__ import annotations

from torch import nn

from .._shared.base import ExtModel
from .layer import BlockLoraLayer, BlockLoraLinear


def block_lora_layers(model: nn.Module) -> list[BlockLoraLayer]:
    """All Block-LoRA layers inside ``model`` (a PeftModel, a BlockLoraModel or any module holding them)."""
    return [m for m in model.modules() if isinstance(m, BlockLoraLayer)]


class BlockLoraModel(ExtModel):
    """Block-LoRA tuner model.

    Mergeable (``ΔW = (α/r)·(Σ_i B_i)·A_s``), works on bitsandbytes bases and exports to plain LoRA of rank r/n."""

    prefix: str = "block_lora_"
    tuner_layer_cls = BlockLoraLayer
    layer_cls = BlockLoraLinear
