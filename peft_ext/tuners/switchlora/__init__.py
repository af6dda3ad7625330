"""SwitchLoRA: *SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information*
(https://arxiv.org/abs/2406.06564); official code https://github.com/asfsdsf/SwitchLoRA (``switchlora/``).

The switching schedule runs in ``peft_ext.callbacks.switchlora.SwitchLoraCallback``; the official per-vector-step
AdamW is ``peft_ext.optim.switchlora.SwitchLoraAdamW``.
"""

from .config import SwitchLoraConfig
from .layer import SwitchLoraBank, SwitchLoraLayer, SwitchLoraLinear, SwitchLoraTrack, init_bounds
from .model import SwitchLoraModel, switchlora_layers
from ...spec import MethodSpec
from .callback import SwitchLoraCallback


SPEC = MethodSpec(
    name="switchlora",
    config_cls=SwitchLoraConfig,
    model_cls=SwitchLoraModel,
    paper_title="SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information",
    paper_url="https://arxiv.org/abs/2406.06564",
    code_url="https://github.com/asfsdsf/SwitchLoRA",
    # The conformance suite runs compensate_init=False: the default (compensated, as the official layer2lora) starts
    # at the base function only up to float rounding (W − s·BA + s·BA) and rewrites W, so disable_adapter() is not
    # the original base — the suite's bit-exact identity and disable checks cannot express that; tests/
    # test_switchlora.py checks the default with explicit tolerances. For the example config B starts non-zero and
    # W is untouched, hence identity_at_init=False.
    example_kwargs={"r": 8, "lora_alpha": 1.0, "compensate_init": False},
    # Switching rewrites W: bitsandbytes bases are refused, and once switched the adapter is s·B·A plus a full-rank
    # change of W that a rank-r LoRA export cannot carry (save_as_lora refuses then), hence not lora_convertible.
    mergeable=True,
    quantizable=False,
    lora_convertible=False,
    identity_at_init=False,
    ba_shape=False,  # B·A optimizers (LoRA-Pro) keep their own state, which the switch reset does not handle
    summary="LoRA whose A-rows / B-columns are switched with frozen candidates during pre-training, W absorbing "
    "each switch (`SwitchLoraCallback`, `SwitchLoraAdamW`).",
    train_callback=SwitchLoraCallback,
    overhead_target=1.20,
)

__all__ = ["SPEC", "SwitchLoraBank", "SwitchLoraCallback", "SwitchLoraConfig", "SwitchLoraLayer", "SwitchLoraLinear",
           "SwitchLoraModel", "SwitchLoraTrack", "init_bounds", "switchlora_layers"]
