"""Block-LoRA configuration.

Paper: *One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning* (Zhou et al.,
https://arxiv.org/abs/2501.16720). Official code: no public code (the spec below is reconstructed from the paper's
abstract and third-party summaries; the parts marked UNCERTAIN are config options with documented defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._shared.base import ExtConfig, bad_value

INIT_B_CHOICES = ("zeros", "zero_sum")


@dataclass
class BlockLoraConfig(ExtConfig):
    """Configuration of a Block-LoRA adapter (paper https://arxiv.org/abs/2501.16720, no public code).

    A rank-``r`` LoRA whose up-projection is split into ``n_blocks`` column blocks ``B = [B_1 … B_n]`` (each
    ``d_out × r/n``) and whose down-projection blocks are all one shared ``A_s`` (``r/n × d_in``), so
    ``ΔW = s·Σ_i B_i A_s = s·(Σ_i B_i)·A_s`` with ``s = lora_alpha / r``. The layer computes the fused form
    ``s·(x A_sᵀ)(Σ_i B_i)ᵀ``: one down-projection of rank ``r/n`` plus a sum of the blocks (the paper's "matrix
    multiplications become additions").

    What this means (derived, stated honestly): every ``B_i`` receives the same gradient, so for optimizers whose
    update depends only on the gradient history and linearly on the parameter (SGD, Adam, AdamW with weight decay)
    the trained model equals a rank-``r/n`` LoRA with ``B' = Σ_i B_i`` whose B-update is ``n`` times larger. With the
    default ``init_B="zeros"`` all blocks stay identical for the whole run; ``init_B="zero_sum"`` starts the blocks
    different (still ``ΔW = 0``) but the trained ``ΔW`` is the same up to rounding. UNCERTAIN: the scale convention
    (``α/r`` with the full rank r here; any other convention is a different ``lora_alpha``), the default
    ``n_blocks`` and the initialisation.
    """

    method_name: ClassVar[str] = "block_lora"

    r: int = field(
        default=8,
        metadata={"help": "Total LoRA rank r, partitioned into n_blocks blocks; the shared down-projection A_s has "
                  "r / n_blocks rows, so ΔW has rank <= r / n_blocks."},
    )
    n_blocks: int = field(
        default=2,
        metadata={"help": "Number of up-projection blocks B_i (they all share A_s); must divide r. UNCERTAIN: the "
                  "paper's default is not public; 2 here."},
    )
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator α; the branch is scaled by α / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    init_B: str = field(
        default="zeros",
        metadata={
            "help": "Initialisation of the blocks B_i (only with init_weights=True). 'zeros': all B_i = 0 (LoRA's "
            "init; the blocks then stay identical, i.e. a rank-r/n LoRA with an n-times larger B step). "
            "'zero_sum': random blocks with Σ B_i = 0 exactly (ΔW = 0 at init, blocks differ, same trained ΔW under "
            "SGD/Adam/AdamW). UNCERTAIN; default 'zeros'."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_positive_int("r")
        self.check_positive_int("n_blocks")
        if self.r % self.n_blocks:
            raise bad_value(self, "n_blocks", self.n_blocks, f"a divisor of r={self.r}")
        self.check_positive("lora_alpha")
        self.check_probability("lora_dropout")
        if self.init_B not in INIT_B_CHOICES:
            raise bad_value(self, "init_B", self.init_B, f"one of {INIT_B_CHOICES}")
