"""SwitchLoRA configuration.

Paper: *SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information* (Zhou et al., 2024,
https://arxiv.org/abs/2406.06564). Official code: https://github.com/asfsdsf/SwitchLoRA (``switchlora/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from .._shared.base import ExtConfig, bad_value


@dataclass
class SwitchLoraConfig(ExtConfig):
    """Configuration of a SwitchLoRA adapter: a LoRA ``y = xWᵀ + (α/r)·x Aᵀ Bᵀ`` whose rows of A and columns of B are
    swapped, a few at a time, with vectors from frozen candidate banks during training, the frozen weight W absorbing
    each swap so that the layer's function is unchanged (https://arxiv.org/abs/2406.06564, official code
    https://github.com/asfsdsf/SwitchLoRA).

    The switching itself is done by ``peft_ext.callbacks.switchlora.SwitchLoraCallback`` (one call per optimizer step,
    before ``optimizer.step()``); the fields below that describe the schedule are read by it. The schedule: at
    optimizer step ``t`` of ``T``, ``interval = switch_interval / switch_rate_base^((t+1)/T_d)`` with
    ``T_d = switch_descent_rate·T``, and ``r / interval`` vectors of A and as many of B are switched (stochastic
    rounding). The partner of a switched vector (the column of B for a row of A, and vice versa) has its Adam moments
    and step count reset and its gradient zeroed for ``adam_warm_step`` steps.

    Initial compensation (``compensate_init``): the paper's init has a non-zero B, and the paper does not say what
    happens to W; the official code (``layer2lora`` in ``switchlora/lora_utils.py``) subtracts ``s·B·A`` from W once
    A and B are set, so training starts exactly at the base model's function (up to float rounding). That is the
    default here; ``compensate_init=False`` keeps W and starts at ``W + s·B·A``.

    Things to know: switching (and the initial compensation) rewrites the base weight W of every targeted layer, so
    (1) a bitsandbytes-quantized base is refused, (2) ``disable_adapter()`` runs the *rewritten* W (with compensation,
    ``W − s·B₀A₀`` from the start), not the original base, (3) once a layer's W is rewritten (from creation with
    compensation, else from its first switch), ``save_pretrained`` stores it with the adapter and ``from_pretrained``
    on the original base puts it back, reproducing the model, (4) merge / unmerge add / subtract ``s·B·A`` to / from
    the rewritten W, so ``merge_and_unload()`` gives the trained model's function, and (5) the candidate banks
    (``num_candidates·(in+out)`` values per layer, kept in float32 whatever the base dtype) are saved too, so training
    can resume.
    """

    method_name: ClassVar[str] = "switchlora"

    r: int = field(default=128, metadata={"help": "LoRA rank r (the paper: 128, 256 for the 350M model)."})
    lora_alpha: float = field(
        default=1.0, metadata={"help": "Scale numerator α; the branch is scaled by s = α/r (the paper: α = 1)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the paper's initialisation, A and B (and their candidates) uniform in ±√3·std with "
            "std_A = ((√m·r)/n^{3/2})^{1/4}·√gain, std_B = (r/√(mn))^{1/4}·√gain, gain = √(1/3), m = out, n = in; "
            "B is non-zero (see compensate_init for how the start still equals the base). False: a random non-zero "
            "adapter for tests and debugging, as for every peft-ext method (PEFT's generic tests rely on it): the "
            "paper's initialisation never compensated, so the model starts at W + s·B·A."
        },
    )
    origin_lora_init: bool = field(
        default=False,
        metadata={
            "help": "True: the official code's 'origin_lora' init instead of the paper's, A (and A-candidates) "
            "kaiming-uniform and B (and B-candidates) zero, which starts as the identity without touching W."
        },
    )
    compensate_init: bool = field(
        default=True,
        metadata={
            "help": "True (the official code's layer2lora; the paper is silent): at creation subtract s·B·A from the "
            "base weight W, so the model starts exactly at the base function (up to float rounding); W is then "
            "rewritten from step 0 and saved with the adapter, and disable_adapter() gives W − s·B·A, not the "
            "original W. False: W is left alone and the model starts at W + s·B·A. No effect with "
            "init_weights=False (never compensated) or origin_lora_init=True (B = 0)."
        },
    )
    num_candidates: Optional[int] = field(
        default=None,
        metadata={
            "help": "Candidate vectors per bank (one bank of A-rows, one of B-columns per layer); None means "
            "min(in_features, out_features) as in the paper. A layer needs more than r candidates to switch (with "
            "fewer, or when r >= min(in, out) and this is None, it trains as a plain LoRA)."
        },
    )
    bank_device: Optional[str] = field(
        default="cpu",
        metadata={
            "help": "Where the candidate banks live: 'cpu' (the official code's offloading; only the few switched "
            "vectors travel each step) or None (beside the adapter, moving with the model)."
        },
    )
    switch_interval: float = field(
        default=40.0,
        metadata={
            "help": "Base switching interval (steps per full replacement of the r vectors) at the start of "
            "training; the paper's 40. Must be >= 2·adam_warm_step."
        },
    )
    switch_descent_rate: float = field(
        default=0.1,
        metadata={
            "help": "T_d = switch_descent_rate·T (T = total optimizer steps): the step at which the switching "
            "frequency has fallen to switch_rate_base times its start value; the paper's 0.1."
        },
    )
    switch_rate_base: float = field(
        default=0.3,
        metadata={"help": "Frequency factor reached at T_d (exponential decay base), in (0, 1]; the paper's 0.3."},
    )
    fixed_interval: bool = field(
        default=False,
        metadata={"help": "True: always switch_interval (the official --fix_switch_lora_interval); False: decay."},
    )
    adam_warm_step: int = field(
        default=5,
        metadata={
            "help": "Optimizer steps during which the partner of a switched vector is frozen (zero gradient) after "
            "its Adam state was reset; the paper's 5. 0 resets the state without freezing."
        },
    )
    reset_optimizer_state: bool = field(
        default=True,
        metadata={
            "help": "Reset the partner's Adam moments and step count at each switch (the paper). False keeps them "
            "(the official --remain_switch_state)."
        },
    )
    init_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": "Seed of the initialisation (A, B and banks) from a local generator, different per layer (mixed "
            "with the module name); None draws from torch's global RNG like PEFT's LoRA."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_bool("compensate_init", "origin_lora_init", "fixed_interval", "reset_optimizer_state")
        self.check_positive_int("r")
        self.check_finite("lora_alpha")
        self.check_probability("lora_dropout")
        if self.num_candidates is not None:
            self.check_positive_int("num_candidates")
            if self.num_candidates < self.r:
                raise bad_value(self, "num_candidates", self.num_candidates, f"None or an integer >= r ({self.r})")
        if self.bank_device is not None:
            try:
                torch.device(self.bank_device)
            except (TypeError, RuntimeError, ValueError):
                raise bad_value(self, "bank_device", self.bank_device, "'cpu', another torch device string, or None")
        if isinstance(self.adam_warm_step, bool) or not isinstance(self.adam_warm_step, int) or self.adam_warm_step < 0:
            raise bad_value(self, "adam_warm_step", self.adam_warm_step, "an integer >= 0")
        self.check_finite("switch_interval")
        if self.switch_interval < 2 * self.adam_warm_step:
            raise bad_value(
                self, "switch_interval", self.switch_interval,
                f">= 2·adam_warm_step = {2 * self.adam_warm_step} (a partner must thaw before its vector switches)",
            )
        self.check_finite("switch_descent_rate")
        rate = self.switch_rate_base
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise bad_value(self, "switch_rate_base", rate, "a number in (0, 1]")
        if self.init_seed is not None and (isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int)):
            raise bad_value(self, "init_seed", self.init_seed, "None or an integer")
