"""Block-LoRA: *One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning*
(https://arxiv.org/abs/2501.16720); no public code."""

from .config import BlockLoraConfig
from .layer import BlockLoraLayer, BlockLoraLinear, zero_sum_blocks
from .model import BlockLoraModel, block_lora_layers
from ...spec import MethodSpec


SPEC = MethodSpec(
    name="block_lora",
    config_cls=BlockLoraConfig,
    model_cls=BlockLoraModel,
    paper_title="One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning",
    paper_url="https://arxiv.org/abs/2501.16720",
    code_url="",
    example_kwargs={"r": 8, "n_blocks": 2, "lora_alpha": 16},
    summary="Rank-r LoRA split into n up-projection blocks sharing one down-projection: ΔW = s·(ΣB_i)·A_s, fused.",
    overhead_target=1.10,
)

__all__ = [
    "SPEC",
    "BlockLoraConfig",
    "BlockLoraLayer",
    "BlockLoraLinear",
    "BlockLoraModel",
    "block_lora_layers",
    "zero_sum_blocks",
]
