"""LoRA-SB: *Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank
Fine-Tuning* (https://arxiv.org/abs/2411.19557), official code https://github.com/RaghavSinghal10/lora-sb; on the
LoRA-XS architecture (https://arxiv.org/abs/2405.17604, code https://github.com/MohammadrezaBanaei/LoRA-XS).

The gradient initialisation is ``peft_ext.init.lora_sb.lora_sb_init``.
"""

from .config import LoraSBConfig
from .layer import LoraSBLayer, LoraSBLinear
from .model import LoraSBModel, layer_seed, lora_sb_layers
from .svd import low_rank_svd
from ...spec import MethodSpec

SPEC = MethodSpec(
    name="lora_sb",
    config_cls=LoraSBConfig,
    model_cls=LoraSBModel,
    paper_title="Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank "
    "Fine-Tuning",
    paper_url="https://arxiv.org/abs/2411.19557",
    code_url="https://github.com/RaghavSinghal10/lora-sb",
    # LoRA-XS init (SVD of W at creation) is the data-free path the suite can exercise everywhere (also on
    # dequantised bitsandbytes weights); its R ~ N(0, 1e-5²) is deliberately not exactly zero, hence
    # identity_at_init=False (R = 0 -> exact identity is tested in tests/test_lora_sb.py).
    example_kwargs={"r": 8, "init": "svd"},
    identity_at_init=False,
    rank_within_layer=True,  # A and B are the top-r singular vectors of W
    ba_shape=False,  # only the r×r R trains; A and B are frozen, so B·A optimizers (LoRA-Pro) do not apply
    summary="LoRA-XS architecture W + s·B R A (only the r×r R trains) with the LoRA-SB gradient-SVD init "
    "(`peft_ext.init.lora_sb_init`) or the LoRA-XS SVD-of-W init.",
    overhead_target=1.10,
)

__all__ = ["SPEC", "LoraSBConfig", "LoraSBLayer", "LoraSBLinear", "LoraSBModel", "layer_seed", "lora_sb_layers",
           "low_rank_svd"]
