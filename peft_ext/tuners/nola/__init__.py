"""NOLA: *Compressing LoRA using Linear Combination of Random Basis* (https://arxiv.org/abs/2310.02556);
official code https://github.com/UCDvision/NOLA."""

from .config import NolaConfig
from .layer import NolaLayer, NolaLinear, a0_matrix, all_bases, basis_chunk
from .model import NolaModel, layer_seed

__all__ = ["NolaConfig", "NolaLayer", "NolaLinear", "NolaModel", "a0_matrix", "all_bases", "basis_chunk", "layer_seed"]
