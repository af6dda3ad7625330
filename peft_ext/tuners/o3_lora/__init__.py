"""O3 orthogonal LoRA: *Practical Unlearning for Large Language Models* (https://arxiv.org/abs/2407.10223); official
code https://github.com/GCYZSL/O3-LLM-UNLEARNING (ScienceQA_expriment/src/lora_layer_hacked_o.py,
src/modeling_llama_hacked_o.py). The unlearning recipe (OOD detector, gate post-processing) is separate."""

from .config import O3LoraConfig
from .layer import O3LoraLayer, O3LoraLinear
from .model import (
    O3LoraModel,
    block_key,
    normalize_ood_weight,
    o3_layers,
    orthogonality_loss,
    set_gate_scorer,
    snapshot_request,
    start_new_request,
)
from ...spec import MethodSpec

SPEC = MethodSpec(
    name="o3_lora",
    config_cls=O3LoraConfig,
    model_cls=O3LoraModel,
    paper_title="Practical Unlearning for Large Language Models",
    paper_url="https://arxiv.org/abs/2407.10223",
    code_url="https://github.com/GCYZSL/O3-LLM-UNLEARNING",
    example_kwargs={"r": 8, "lora_alpha": 16},
    summary="Continual-unlearning LoRA: orthogonality loss against earlier requests' A, per-input gate `ood_weight=`.",
    # Not ba_shape: the orthogonality term's gradient reaches A alone, not through ΔW = s·B·A, so LoRA-Pro's
    # equivalent-gradient step (which assumes every (A, B) gradient comes through ΔW) would distort it.
    ba_shape=False,
    overhead_target=1.15,
    bench_variants=(("one earlier request (orthogonality loss on)", {"snapshot_ranks": [8]}),),
)

__all__ = [
    "SPEC",
    "O3LoraConfig",
    "O3LoraLayer",
    "O3LoraLinear",
    "O3LoraModel",
    "block_key",
    "normalize_ood_weight",
    "o3_layers",
    "orthogonality_loss",
    "set_gate_scorer",
    "snapshot_request",
    "start_new_request",
]
