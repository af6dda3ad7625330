"""O3 orthogonal LoRA configuration.

Paper: *Practical Unlearning for Large Language Models* (O3; Gao, Wang, Weng, Wang, Zhu;
https://arxiv.org/abs/2407.10223).
Official code: https://github.com/GCYZSL/O3-LLM-UNLEARNING (``ScienceQA_expriment/src/lora_layer_hacked_o.py``,
``src/modeling_llama_hacked_o.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from .._shared.base import ExtConfig, bad_value

ORTH_REDUCTIONS = ("block_mean", "module_mean", "sum")
REQUEST_MODES = ("resume", "new_adapter")


@dataclass
class O3LoraConfig(ExtConfig):
    """Configuration of an O3 orthogonal LoRA for continual unlearning (https://arxiv.org/abs/2407.10223; official
    code https://github.com/GCYZSL/O3-LLM-UNLEARNING).

    Forward: ``y = x·Wᵀ + w₁·(α/r)·drop(x)·Aᵀ·Bᵀ`` where the gate ``w₁`` is the per-call ``ood_weight=`` (a scalar,
    one value per sample, one per token, or a dict adapter -> gate), else the gate scorer's output in eval mode
    (``model.set_gate_scorer``), else 1 in training and ``merge_gate`` in eval mode. With labels,
    ``outputs.loss = CE + orth_weight · o_loss`` with ``o_loss = Σ_modules Σ_j ‖A_j^prev · A_curᵀ‖_F²`` reduced by
    ``orth_reduction``; the earlier requests' ``A_j^prev`` are frozen snapshots saved with the adapter
    (``snapshot_ranks``) and the A matrices of the live adapters named in ``prev_adapters``; only A is constrained.

    Differences from the official code: the official layer computes ``w₀·x·Wᵀ + w₁·(...)`` with a base gate ``w₀``
    that is always 1 in its scripts — no ``w₀`` here; its gate is one ``[w₀, w₁]`` pair per batch — per-sample and
    per-token gates and one gate per adapter are extensions.
    """

    method_name: ClassVar[str] = "o3_lora"

    r: int = field(default=8, metadata={"help": "LoRA rank r (the paper uses 8)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scale numerator α; the branch is scaled by α/r."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1) (the paper's setting is 0.05)."}
    )
    orth_weight: float = field(
        default=0.1,
        metadata={
            "help": "Weight λ of the orthogonality loss added to outputs.loss when labels are passed "
            "(L = CE + λ·o_loss; the paper uses 0.1). 0 turns the loss off."
        },
    )
    prev_adapters: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Names of other O3 adapters on the same model (earlier requests trained as separate adapters) "
            "whose current A matrices enter this adapter's orthogonality loss (detached: they never receive "
            "gradient). Snapshots taken with snapshot_request / start_new_request enter it as well."
        },
    )
    snapshot_ranks: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Ranks of the frozen A snapshots of earlier requests stored with this adapter (one entry per "
            "snapshot; maintained by snapshot_request / start_new_request, which also fill the snapshot buffer). "
            "Saved so that a reloaded adapter keeps its snapshots and the orthogonality loss continues."
        },
    )
    orth_reduction: str = field(
        default="block_mean",
        metadata={
            "help": "How the per-module orthogonality terms are reduced: 'block_mean' (official: the sum over all "
            "adapted modules divided by the model's number of decoder layers, config.num_hidden_layers, whether or "
            "not a layer carries the adapter; when that is unknown, or smaller than the number of adapted blocks, "
            "by the number of adapted blocks, a module outside any numbered block counting as a block of its own), "
            "'module_mean' (averaged over adapted modules) or 'sum'."
        },
    )
    merge_gate: float = field(
        default=1.0,
        metadata={
            "help": "The fixed gate w₁ (>= 0) that merge_adapter / merge_and_unload / save_as_lora bake into W "
            "(ΔW = w₁·(α/r)·B·A); an eval-mode forward without ood_weight and without a gate scorer uses it too, so "
            "merged and unmerged outputs agree. Training forwards use w₁ = 1 unless ood_weight is passed."
        },
    )
    request_mode: str = field(
        default="resume",
        metadata={
            "help": "What start_new_request does: 'resume' (official scripts: snapshot the current A and keep "
            "training the same LoRA, so every earlier snapshot enters the orthogonality loss) or 'new_adapter' "
            "(one fresh LoRA per request whose snapshot buffer holds every earlier request's A). The paper does not "
            "say which; 'resume' follows the official code."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_positive_int("r")
        self.check_finite("lora_alpha")
        self.check_probability("lora_dropout")
        self.check_finite("orth_weight", strict=False)
        self.check_finite("merge_gate", strict=False)
        if self.prev_adapters is None:
            self.prev_adapters = []
        if isinstance(self.prev_adapters, str):
            self.prev_adapters = [self.prev_adapters]
        if not isinstance(self.prev_adapters, (list, tuple)) or not all(
            isinstance(n, str) and n for n in self.prev_adapters
        ):
            raise bad_value(self, "prev_adapters", self.prev_adapters, "a list of adapter names (non-empty strings)")
        self.prev_adapters = list(self.prev_adapters)
        if self.snapshot_ranks is None:
            self.snapshot_ranks = []
        if not isinstance(self.snapshot_ranks, (list, tuple)) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.snapshot_ranks
        ):
            raise bad_value(self, "snapshot_ranks", self.snapshot_ranks, "a list of integers >= 1")
        self.snapshot_ranks = list(self.snapshot_ranks)
        if self.orth_reduction not in ORTH_REDUCTIONS:
            raise bad_value(self, "orth_reduction", self.orth_reduction, f"one of {list(ORTH_REDUCTIONS)}")
        if self.request_mode not in REQUEST_MODES:
            raise bad_value(self, "request_mode", self.request_mode, f"one of {list(REQUEST_MODES)}")

    @property
    def snapshot_rows(self) -> int:
        """Total number of stored snapshot rows (the sum of ``snapshot_ranks``)."""
        return sum(self.snapshot_ranks)
