"""NOLA configuration.

Paper: *NOLA: Networks as Linear Combination of Low Rank Random Basis* (Koohpayegani et al., ICLR 2024,
https://arxiv.org/abs/2310.02556). Official code: https://github.com/UCDvision/NOLA (``gpt/src/model_nola.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._shared.base import ExtConfig, bad_value


@dataclass
class NolaConfig(ExtConfig):
    """Configuration of a NOLA adapter: ``A = A0 + Σᵢ αᵢ R^A_i`` and ``B = Σⱼ βⱼ R^B_j`` with seeded random bases
    ``R ~ U(-1, 1)/√k`` and a frozen kaiming-uniform ``A0``; only the coefficients α (``num_basis_A``) and β
    (``num_basis_B``) train, and ``ΔW = (lora_alpha/r)·B·A``.

    Paper: https://arxiv.org/abs/2310.02556; official code: https://github.com/UCDvision/NOLA (LLM variant).

    Differences from the official code: bases come from a local ``torch.Generator`` (the official code re-seeds the
    global RNG), always on the CPU in float32 and in chunks of ``basis_chunk`` bases, then moved to the layer's device
    and dtype, so they regenerate bit-identically on any device; ``A0`` is regenerated from a stored seed too.
    """

    method_name: ClassVar[str] = "nola"

    r: int = field(default=8, metadata={"help": "Rank of the reconstructed A (r×in) and B (out×r)."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: ΔW = (lora_alpha / r)·B·A."})
    num_basis_A: int = field(
        default=512, metadata={"help": "Number k_A of random bases (trainable coefficients) for A."}
    )
    num_basis_B: int = field(
        default=512, metadata={"help": "Number k_B of random bases (trainable coefficients) for B."}
    )
    basis_seed: int = field(
        default=0,
        metadata={
            "help": "Base seed; each layer derives its own seeds from it and its module name. The derived seeds are "
            "saved with the adapter, so the bases regenerate identically when it is loaded."
        },
    )
    cache_bases: bool = field(
        default=False,
        metadata={
            "help": "True keeps the generated bases in memory (fast, k·r·(in+out) floats per layer). False "
            "regenerates them in every forward and backward like the paper (slow, no basis memory)."
        },
    )
    basis_chunk: int = field(
        default=64,
        metadata={"help": "Bases generated per random draw; part of the basis definition, so keep it when loading."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("r", "num_basis_A", "num_basis_B", "basis_chunk"):
            self.check_positive_int(name)
        self.check_positive("lora_alpha")
        self.check_probability("lora_dropout")
        seed = self.basis_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise bad_value(self, "basis_seed", self.basis_seed, "an integer in [0, 2**31)")
