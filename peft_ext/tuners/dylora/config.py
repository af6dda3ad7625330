"""DyLoRA configuration.

Paper: *DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation*
(Valipour et al., EACL 2023, https://arxiv.org/abs/2210.07558). Official code:
https://github.com/huawei-noah/Efficient-NLP (``DyLoRA/loralib``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from .._shared.base import ExtConfig, bad_value


@dataclass
class DyLoraConfig(ExtConfig):
    """Configuration of a DyLoRA adapter: one LoRA of rank ``r`` trained so that every truncation to rank ``b <= r``
    is a usable adapter (nested-rank training with ``peft_ext.callbacks.DyLoraRankSampler``).

    At rank ``b`` the branch is ``(α/r)·x·(A[:b]·√(r/b))ᵀ·(B[:, :b]·√(r/b))ᵀ``, i.e. an effective scale ``α/b``.
    Paper: https://arxiv.org/abs/2210.07558; official code: https://github.com/huawei-noah/Efficient-NLP (DyLoRA/).

    Difference from the official code: it evaluates at rank 1 unless ``set_rank`` is called (its current rank starts
    at 0); here the evaluation rank is ``eval_rank``, which defaults to ``r`` and is saved with the adapter.
    """

    method_name: ClassVar[str] = "dylora"

    r: int = field(default=8, metadata={"help": "Maximum rank r_max; every rank 1..r is usable after training."})
    lora_alpha: float = field(
        default=16, metadata={"help": "Scale numerator α; at rank b the branch is scaled by α/b."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    eval_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "Rank used outside training and by merge, 1..r; None means r. model.set_rank(b) changes it and "
            "the new value is saved with the adapter."
        },
    )
    frozen_lower: bool = field(
        default=True,
        metadata={
            "help": "The paper's 'frozen' mode: at a sampled rank b only row b of A and column b of B get gradient. "
            "False is the paper's 'full' mode: all of A[:b], B[:, :b] train."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_positive_int("r")
        self.check_positive("lora_alpha")
        self.check_probability("lora_dropout")
        if self.eval_rank is None:
            self.eval_rank = self.r
        if isinstance(self.eval_rank, bool) or not isinstance(self.eval_rank, int) or not 1 <= self.eval_rank <= self.r:
            raise bad_value(self, "eval_rank", self.eval_rank, f"an integer in 1..r (1..{self.r}) or None")
