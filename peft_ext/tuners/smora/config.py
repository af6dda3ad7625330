"""SMoRA configuration.

Paper: *Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning* (Zhao et al.,
2025), https://arxiv.org/abs/2501.15103. No public code: the choices the abstract does not fix are options with
documented defaults (marked UNCERTAIN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._shared.base import ExtConfig, bad_value

GATE_FNS = ("sigmoid", "softmax")


@dataclass
class SmoraConfig(ExtConfig):
    """Configuration of a SMoRA adapter: one LoRA of rank r whose ranks are experts; each token activates its top-k.

    ``y = x Wᵀ + (α/r) · B diag(g(x)) A drop(x)`` with ``g = TopK_k(σ(W_g x))`` over the r ranks (rank blocks of
    ``block_size``), ``W_g ∈ R^{r×in}`` trained by gradient, and a selection-only load-balancing bias ``b`` (added to
    the scores for the top-k choice) updated outside the gradient by ``peft_ext.callbacks.smora.SmoraBiasCallback``:
    ``b_i ← b_i + u·sign(mean load − load_i)`` after each optimizer step. Paper https://arxiv.org/abs/2501.15103; no
    public code.

    UNCERTAIN (paper text not available to us, no code): sigmoid vs softmax scores (``gate_fn``, default sigmoid),
    whether the gate includes ``b`` (``bias_in_gate``, default False: DeepSeek-V3 style selection-only bias), gate
    normalisation (``normalize_gates``, default False), the update rate ``u`` (``bias_update_rate``, default 1e-3 as
    DeepSeek-V3) and its frequency (once per optimizer step), router initialisation (``nn.Linear``'s kaiming-uniform),
    ``b = 0`` at start.
    """

    method_name: ClassVar[str] = "smora"

    r: int = field(
        default=8, metadata={"help": "Total LoRA rank = number of rank experts (paper setting UNCERTAIN, e.g. 64)."}
    )
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator α; the branch is scaled by α/r."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1); the router sees x."}
    )
    top_k: int = field(
        default=4,
        metadata={
            "help": "Rank experts (or blocks) each token activates, 1..r/block_size (paper UNCERTAIN, e.g. 8 of 64)."
        },
    )
    block_size: int = field(
        default=1,
        metadata={
            "help": "Ranks per expert; 1 is SMoRA (every rank an expert). r/E gives the paper's equivalent multi-LoRA "
            "MoE with E experts of rank r/E (block-level activation). Must divide r."
        },
    )
    gate_fn: str = field(
        default="sigmoid",
        metadata={
            "help": "Score function of the router logits: 'sigmoid' (σ(W_g x), default) or 'softmax' (UNCERTAIN)."
        },
    )
    normalize_gates: bool = field(
        default=False,
        metadata={"help": "Divide each token's selected gates by their sum (DeepSeek-V3 / Mixtral style; UNCERTAIN)."},
    )
    bias_in_gate: bool = field(
        default=False,
        metadata={
            "help": "False: the balancing bias b only changes which ranks are selected; the gate is the score "
            "(DeepSeek-V3). True: the gate is score + b (UNCERTAIN)."
        },
    )
    bias_update_rate: float = field(
        default=1e-3,
        metadata={
            "help": "u in b_i ← b_i + u·sign(mean load − load_i), applied by SmoraBiasCallback once per optimizer "
            "step; 0 freezes b (UNCERTAIN; DeepSeek-V3 uses 1e-3)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_positive_int("r")
        self.check_positive("lora_alpha")
        self.check_probability("lora_dropout")
        self.check_positive_int("block_size")
        if self.r % self.block_size:
            raise bad_value(self, "block_size", self.block_size, f"a divisor of r ({self.r})")
        self.check_positive_int("top_k")
        if self.top_k > self.num_blocks:
            raise bad_value(self, "top_k", self.top_k, f"at most r / block_size ({self.num_blocks})")
        if self.gate_fn not in GATE_FNS:
            raise bad_value(self, "gate_fn", self.gate_fn, f"one of {GATE_FNS}")
        self.check_bool("normalize_gates", "bias_in_gate")
        self.check_finite("bias_update_rate", strict=False)

    @property
    def num_blocks(self) -> int:
        """Number of experts: ``r / block_size`` (r for SMoRA)."""
        return self.r // self.block_size
