"""DyLoRA: *Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation*
(https://arxiv.org/abs/2210.07558); official code https://github.com/huawei-noah/Efficient-NLP (DyLoRA/)."""

from .config import DyLoraConfig
from .layer import DyLoraLayer, DyLoraLinear
from .model import DyLoraModel, dylora_layers, max_rank, set_rank

__all__ = ["DyLoraConfig", "DyLoraLayer", "DyLoraLinear", "DyLoraModel", "dylora_layers", "max_rank", "set_rank"]
