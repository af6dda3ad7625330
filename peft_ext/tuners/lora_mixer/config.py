"""LoRA-Mixer configuration.

Paper: *LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing* (Li et al., ICLR 2026,
https://arxiv.org/abs/2507.00029). Official code: https://github.com/hustcselwb/LoRA-Mixer (README only, no code
released when this was written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .._shared.base import ExtConfig, bad_value

DEFAULT_NUM_EXPERTS = 4


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class LoraMixerConfig(ExtConfig):
    """Configuration of a LoRA-Mixer adapter: ``num_experts`` LoRA experts per adapted projection, mixed per token by
    a router (paper https://arxiv.org/abs/2507.00029; official code https://github.com/hustcselwb/LoRA-Mixer, README
    only, so this follows the paper).

    ``p = softmax(W_r x / τ)``; the top-k mask ``m`` selects experts; ``w_e = m_e p_e / Σ_j m_j p_j`` (renormalised);
    ``y = x Wᵀ + Σ_e w_e · s_e · B_e A_e drop(x)`` with the per-expert scale ``s_e = α_e / r_e``. With
    ``straight_through`` (the paper's "hard–soft" routing, our reading) the forward uses the hard top-k weights and
    the backward the soft probabilities ``p``, so the router learns from every expert's output, even at top-1.

    Auxiliary losses (added to ``outputs.loss`` when labels are given; summed over the mixer layers):
    ``balance_loss_weight · E · Σ_e f_e P̄_e`` (global load balance) and ``entropy_loss_weight · mean_t H(p_t)``
    (input-aware specialisation). Our reading of the paper's Specialisation Balance / Routing Specialisation Loss
    (UNCERTAIN, no formula public): minimising the mean per-token entropy makes each token's routing decisive while the
    balance term keeps the load spread over all experts globally.

    Experts come fresh (A kaiming, B = 0: the base output is unchanged) or from PEFT LoRA adapter folders
    (``expert_adapters``), which may differ in rank and α; their weights are saved with the mixer, so the saved adapter
    loads without the folders.
    """

    method_name: ClassVar[str] = "lora_mixer"

    r: Union[int, list[int]] = field(
        default=8,
        metadata={
            "help": "Rank of each expert: one integer for all, or one per expert (length num_experts). With "
            "expert_adapters it is read from the folders and written back here."
        },
    )
    lora_alpha: Union[float, list[float]] = field(
        default=16,
        metadata={
            "help": "Scale numerator α of each expert (one number or one per expert); expert e is scaled by "
            "α_e / r_e. With expert_adapters it is read from the folders (rsLoRA adapters: α·√r, so that α/r equals "
            "their α/√r) and written back here."
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input, in [0, 1)."})
    num_experts: Optional[int] = field(
        default=None,
        metadata={
            "help": f"Number of LoRA experts E per adapted layer; None means len(expert_adapters), or "
            f"{DEFAULT_NUM_EXPERTS} fresh experts when no folders are given."
        },
    )
    top_k: Optional[int] = field(
        default=None,
        metadata={
            "help": "Experts each token uses (1..num_experts). top_k = num_experts is the dense softmax mixture. "
            "The paper's k is not stated (UNCERTAIN); None means 2 (1 with a single expert)."
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Router softmax temperature τ > 0: p = softmax(logits / τ)."}
    )
    straight_through: bool = field(
        default=True,
        metadata={
            "help": "Hard–soft routing: the forward uses the hard top-k weights, the backward the gradient of the soft "
            "probabilities p (straight-through). False: plain top-k, the router only learns through the selected "
            "experts' renormalised weights (no task gradient at top-1)."
        },
    )
    renormalize: bool = field(
        default=True,
        metadata={
            "help": "Renormalise the selected probabilities to sum to 1 (top-1 then uses each expert at unit scale, "
            "as a plain LoRA). False: use the raw probabilities of the selected experts."
        },
    )
    balance_loss_weight: float = field(
        default=0.01,
        metadata={
            "help": "λ_bal >= 0 of the load-balancing loss E·Σ_e f_e·P̄_e per layer (f_e: fraction of tokens routed to "
            "e, P̄_e: mean router probability); 0 disables. Default 0.01 (Switch Transformer's value; UNCERTAIN)."
        },
    )
    entropy_loss_weight: float = field(
        default=0.01,
        metadata={
            "help": "λ_ent of the specialisation term mean_tokens H(p) per layer (H: entropy of a token's routing "
            "distribution); > 0 sharpens each token's routing, < 0 smooths it, 0 disables. Default 0.01 (UNCERTAIN)."
        },
    )
    expert_adapters: list[str] = field(
        default_factory=list,
        metadata={
            "help": "PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors) loaded as the "
            "experts, in order, when the adapter is created. Their target modules must cover this config's targets; "
            "ranks and α may differ. The weights are saved with the mixer: loading a saved mixer never reads these "
            "folders."
        },
    )
    freeze_experts: Optional[bool] = field(
        default=None,
        metadata={
            "help": "True: the experts are frozen (requires_grad False, grad None) and only the router trains - the "
            "paper's plug-and-play regime over pre-trained LoRAs. None means True with expert_adapters, else False "
            "(joint training of experts and router)."
        },
    )
    rank_pattern: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module expert ranks overriding r: {module name or suffix: [r_1, ..., r_E]} (matched as PEFT's "
            "LoRA rank_pattern). Filled automatically for modules where loaded LoRA folders use other ranks."
        },
    )
    alpha_pattern: dict[str, list[float]] = field(
        default_factory=dict,
        metadata={"help": "Per-module expert α overriding lora_alpha, like rank_pattern."},
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.expert_adapters, tuple):
            self.expert_adapters = list(self.expert_adapters)
        if not isinstance(self.expert_adapters, list) or not all(
            isinstance(p, str) and p for p in self.expert_adapters
        ):
            raise bad_value(self, "expert_adapters", self.expert_adapters, "a list of PEFT LoRA adapter folder paths")
        n_folders = len(self.expert_adapters)
        if self.num_experts is None:
            self.num_experts = n_folders or DEFAULT_NUM_EXPERTS
        self.check_positive_int("num_experts")
        if n_folders and self.num_experts != n_folders:
            raise bad_value(
                self, "num_experts", self.num_experts, f"len(expert_adapters) = {n_folders} (one expert per folder)"
            )
        E = self.num_experts
        if self.top_k is None:
            self.top_k = min(2, E)
        if not _is_int(self.top_k) or not 1 <= self.top_k <= E:
            raise bad_value(self, "top_k", self.top_k, f"an integer in 1..num_experts (1..{E})")
        self.check_finite("temperature")
        self.check_probability("lora_dropout")
        self.r = self._per_expert("r", self.r, integer=True)
        self.lora_alpha = self._per_expert("lora_alpha", self.lora_alpha, integer=False)
        self.check_bool("straight_through", "renormalize")
        if not _is_number(self.balance_loss_weight) or self.balance_loss_weight < 0:
            raise bad_value(self, "balance_loss_weight", self.balance_loss_weight, "a number >= 0 (0 disables)")
        if not _is_number(self.entropy_loss_weight):
            raise bad_value(self, "entropy_loss_weight", self.entropy_loss_weight, "a finite number (0 disables)")
        if self.freeze_experts is None:
            self.freeze_experts = bool(n_folders)
        if not isinstance(self.freeze_experts, bool):
            raise bad_value(self, "freeze_experts", self.freeze_experts, "True, False or None")
        for name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise bad_value(self, name, pattern, "a dict {module name: one value per expert}")
            checked = {k: self._per_expert(f"{name}[{k!r}]", v, integer, scalar_ok=False) for k, v in pattern.items()}
            setattr(self, name, checked)

    def _per_expert(self, name: str, value: Any, integer: bool, scalar_ok: bool = True) -> list:
        """``value`` as a list of one entry per expert (ints >= 1 or numbers > 0); a ValueError naming ``name``."""
        E = self.num_experts
        kind = "an integer >= 1" if integer else "a number > 0"
        ok = (lambda v: _is_int(v) and v >= 1) if integer else (lambda v: _is_number(v) and v > 0)
        if scalar_ok and not isinstance(value, (list, tuple)):
            if not ok(value):
                raise bad_value(self, name, value, f"{kind}, or a list of num_experts ({E}) such values")
            return [value] * E
        if not isinstance(value, (list, tuple)) or len(value) != E or not all(ok(v) for v in value):
            allowed = f"a list of num_experts ({E}) values, each {kind}"
            raise bad_value(self, name, value, (f"{kind} or " if scalar_ok else "") + allowed)
        return [int(v) if integer else float(v) if not _is_int(v) else v for v in value]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load a saved mixer config. It is marked as coming from a checkpoint, so creating the adapter from it does
        not read ``expert_adapters``: the expert weights come from the checkpoint (the folders need not exist)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._experts_from_checkpoint = True
        return config
