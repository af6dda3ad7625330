"""NOLA: *Compressing LoRA using Linear Combination of Random Basis* (https://arxiv.org/abs/2310.02556);
official code https://github.com/UCDvision/NOLA."""

from .config import NolaConfig
from .layer import NolaLayer, NolaLinear, a0_matrix, all_bases, basis_chunk
from .model import NolaModel, layer_seed
from ...spec import MethodSpec

SPEC = MethodSpec(
    name="nola",
    config_cls=NolaConfig,
    model_cls=NolaModel,
    paper_title="NOLA: Networks as Linear Combination of Low Rank Random Basis",
    paper_url="https://arxiv.org/abs/2310.02556",
    code_url="https://github.com/UCDvision/NOLA",
    example_kwargs={"r": 8, "lora_alpha": 8, "num_basis_A": 64, "num_basis_B": 64, "cache_bases": True},
    summary="A and B are linear combinations of seeded random bases; only the coefficients train.",
    overhead_target=1.30,
    bench_variants=(("cache_bases=False (paper)", {"cache_bases": False}, None),),
)

__all__ = ["SPEC", "NolaConfig", "NolaLayer", "NolaLinear", "NolaModel", "a0_matrix", "all_bases", "basis_chunk",
           "layer_seed"]
