"""MoLA: *Higher Layers Need More LoRA Experts* (https://arxiv.org/abs/2402.08562); official code
https://github.com/GCYZSL/MoLA. Presets in ``configs/``: MoLA-▽ (``mola_inverted_triangle.yaml``) / uniform / △
(``mola_triangle.yaml``), LLaVA-MoLE, and ``uni_moe_dense.yaml`` (a Uni-MoE analogue for dense bases)."""

from .config import MolaConfig
from .layer import MolaLayer, MolaLinear, balance_loss
from .model import MolaModel, count_layers, experts_per_layer, layer_index_of, mola_layers
from ...spec import MethodSpec

SPEC = MethodSpec(
    name="mola",
    config_cls=MolaConfig,
    model_cls=MolaModel,
    paper_title="Higher Layers Need More LoRA Experts",
    paper_url="https://arxiv.org/abs/2402.08562",
    code_url="https://github.com/GCYZSL/MoLA",
    example_kwargs={"r": 8, "lora_alpha": 16, "num_experts": 8, "top_k": 2},
    conformance_kwargs={"balance_loss_weight": 0.01},  # the official obalance=True weight is 0.001
    mergeable=False,
    lora_convertible=False,
    routed=True,
    sparse_routing=True,
    summary="Mixture of LoRA experts per module with top-k routing; experts per layer by depth (MoLA-▽: 2/4/6/8).",
    overhead_target=1.35,
    bench_variants=(("balance loss on (official obalance weight 0.001)", {"balance_loss_weight": 0.001}),),
)

__all__ = [
    "SPEC", "MolaConfig", "MolaLayer", "MolaLinear", "MolaModel", "balance_loss", "count_layers",
    "experts_per_layer", "layer_index_of", "mola_layers",
]
