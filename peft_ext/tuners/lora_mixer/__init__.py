"""LoRA-Mixer: *LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing*
(https://arxiv.org/abs/2507.00029); official code https://github.com/hustcselwb/LoRA-Mixer (README only)."""

from .config import LoraMixerConfig
from .experts import LoraExpert, read_lora_expert, read_lora_experts
from .layer import LoraMixerLayer, LoraMixerLinear
from .model import ATTENTION_TARGET_MODULES, LoraMixerModel, lora_mixer_layers
from ...spec import MethodSpec


SPEC = MethodSpec(
    name="lora_mixer",
    config_cls=LoraMixerConfig,
    model_cls=LoraMixerModel,
    paper_title="LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing",
    paper_url="https://arxiv.org/abs/2507.00029",
    code_url="https://github.com/hustcselwb/LoRA-Mixer",
    example_kwargs={"r": 4, "lora_alpha": 8, "num_experts": 3, "top_k": 2},
    # the default weights, stated: the conformance suite checks that both terms reach outputs.loss
    conformance_kwargs={"balance_loss_weight": 0.01, "entropy_loss_weight": 0.01},
    mergeable=False,
    quantizable=True,
    lora_convertible=False,
    identity_at_init=True,
    routed=True,
    sparse_routing=True,
    summary="Token-routed LoRA experts on the attention projections (hard–soft top-k, balance + entropy losses); "
    "experts can be frozen PEFT LoRA folders.",
    overhead_target=1.35,
    bench_variants=(("frozen experts, top-1", {"top_k": 1, "freeze_experts": True}),),
)

__all__ = [
    "ATTENTION_TARGET_MODULES",
    "SPEC",
    "LoraExpert",
    "LoraMixerConfig",
    "LoraMixerLayer",
    "LoraMixerLinear",
    "LoraMixerModel",
    "lora_mixer_layers",
    "read_lora_expert",
    "read_lora_experts",
]
