"""DyLoRA: *Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation*
(https://arxiv.org/abs/2210.07558); official code https://github.com/huawei-noah/Efficient-NLP (DyLoRA/)."""

from .config import DyLoraConfig
from .layer import DyLoraLayer, DyLoraLinear
from .model import DyLoraModel, dylora_layers, max_rank, set_rank
from ...spec import MethodSpec
from .callback import DyLoraRankSampler


SPEC = MethodSpec(
    name="dylora",
    config_cls=DyLoraConfig,
    model_cls=DyLoraModel,
    paper_title="DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank "
    "Adaptation",
    paper_url="https://arxiv.org/abs/2210.07558",
    code_url="https://github.com/huawei-noah/Efficient-NLP",
    example_kwargs={"r": 8, "lora_alpha": 16},
    summary="One LoRA usable at every rank 1..r (nested-rank training, `set_rank(b)`).",
    train_callback=DyLoraRankSampler,
    ba_shape=True,
    overhead_target=1.10,
)

__all__ = ["SPEC", "DyLoraConfig", "DyLoraLayer", "DyLoraLinear", "DyLoraModel", "DyLoraRankSampler", "dylora_layers",
           "max_rank", "set_rank"]
