"""SMoRA: *Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning*
(https://arxiv.org/abs/2501.15103); no public code."""

from .config import SmoraConfig
from .layer import SmoraLayer, SmoraLinear
from .model import SmoraModel, smora_layers, update_smora_bias
from ...spec import MethodSpec
from .callback import SmoraBiasCallback

SPEC = MethodSpec(
    name="smora",
    config_cls=SmoraConfig,
    model_cls=SmoraModel,
    paper_title="Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning",
    paper_url="https://arxiv.org/abs/2501.15103",
    code_url="",
    example_kwargs={"r": 8, "lora_alpha": 16, "top_k": 4},
    mergeable=False,
    lora_convertible=False,
    routed=True,
    sparse_routing=True,
    summary="Every LoRA rank is an expert: per-token top-k rank activation with a bias-based load balance.",
    train_callback=SmoraBiasCallback,
)

__all__ = ["SPEC", "SmoraBiasCallback", "SmoraConfig", "SmoraLayer", "SmoraLinear", "SmoraModel", "smora_layers",
           "update_smora_bias"]
