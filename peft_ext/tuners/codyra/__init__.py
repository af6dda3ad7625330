"""CoDyRA: *Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with
Dynamic Rank-Selective LoRA* (https://arxiv.org/abs/2412.01004); official code
https://github.com/Artificer-AI-Lab/CoDyRA."""

from .config import CodyraConfig
from .layer import CodyraGate, CodyraLayer, CodyraLinear, threshold_gate
from .model import (CodyraModel, apply_threshold, codyra_layers, effective_rank, increment_task,
                    official_threshold_at, threshold_at)
from ...spec import MethodSpec
from .callback import CodyraThresholdCallback


SPEC = MethodSpec(
    name="codyra",
    config_cls=CodyraConfig,
    model_cls=CodyraModel,
    paper_title="Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models "
    "with Dynamic Rank-Selective LoRA",
    paper_url="https://arxiv.org/abs/2412.01004",
    code_url="https://github.com/Artificer-AI-Lab/CoDyRA",
    example_kwargs={"r": 8},
    summary="ΔW = B·diag(g)·A with a sparsifying threshold schedule on the rank importances g; "
    "`increment_task()` folds a task into W for continual learning.",
    train_callback=CodyraThresholdCallback,
    overhead_target=1.10,
)

__all__ = [
    "SPEC",
    "CodyraConfig",
    "CodyraGate",
    "CodyraLayer",
    "CodyraLinear",
    "CodyraModel",
    "CodyraThresholdCallback",
    "apply_threshold",
    "codyra_layers",
    "effective_rank",
    "increment_task",
    "official_threshold_at",
    "threshold_at",
    "threshold_gate",
]
