"""Gated LoRA configuration.

One config covers four papers whose adapter is "LoRA branches switched on per token":

* *Your LLM Knows the Future: Uncovering Its Multi-Token Prediction Potential* (https://arxiv.org/abs/2507.11851;
  no official code, unofficial https://github.com/siihwanpark/MTP-GLoRA): one branch, on only at MTP ``<mask>``
  positions; every other position is the untouched base model.
* *TARA: Token-Aware LoRA for Composable Personalization in Diffusion Models* (https://arxiv.org/abs/2508.08812;
  code https://github.com/YuqiPeng77/TARA): one branch per concept, active only at its rare-token positions in the
  cross-attention ``to_k`` / ``to_v``, plain LoRA elsewhere, plus the token alignment loss.
* Arcana's MM-LoRA, *Improving Multi-modal Large Language Model through Boosting Vision Capabilities*
  (https://arxiv.org/abs/2410.13733; no public code): a vision and a language branch chosen by a modality mask.
* *RegionBLIP* (https://arxiv.org/abs/2308.02299; code https://github.com/mightyzau/RegionBLIP): one branch per
  modality, chosen per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from .._shared.base import ExtConfig, bad_value

MODES = ("route", "sum")


@dataclass
class GatedLoraConfig(ExtConfig):
    """Configuration of a gated LoRA adapter: ``y_t = x_t Wᵀ + s_b · B_b A_b x_t`` where ``b`` is the branch token
    ``t`` is routed to, and ``y_t = x_t Wᵀ`` (bit-identical to the base model) for tokens routed nowhere.

    Routing comes per call through ``PeftModel``: ``model(input_ids, route_ids=...)`` (int ``[batch, tokens]``,
    ``-1`` = base only, ``b`` = branch index, or one id per sample, or a branch name for the whole call),
    ``modality=`` (bool mask for two branches: True = ``branches[0]``, e.g. vision; False = ``branches[1]``),
    ``gate=`` (bool mask: True = the ``default_route`` branch, or the only branch), and ``align_mask=`` (TARA's
    class-word positions for the alignment loss). Without any of them every token uses ``default_route``; with
    no ``default_route`` either, an eval forward is the base model and a training forward raises a ValueError.

    Papers: MTP https://arxiv.org/abs/2507.11851 (no code; unofficial https://github.com/siihwanpark/MTP-GLoRA),
    TARA https://arxiv.org/abs/2508.08812 (https://github.com/YuqiPeng77/TARA), Arcana MM-LoRA
    https://arxiv.org/abs/2410.13733 (no public code), RegionBLIP https://arxiv.org/abs/2308.02299
    (https://github.com/mightyzau/RegionBLIP).
    """

    method_name: ClassVar[str] = "gated_lora"

    branches: list[str] = field(
        default_factory=lambda: ["default"],
        metadata={
            "help": "Names of the LoRA branches, in route-id order (route id b selects branches[b]), e.g. ['default'] "
            "(MTP), ['vision', 'language'] (MM-LoRA), ['image', 'image_region', 'pointcloud', 'pointcloud_region'] "
            "(RegionBLIP), one per concept (TARA)."
        },
    )
    r: Union[int, dict[str, int]] = field(
        default=8, metadata={"help": "Rank of every branch (int), or a rank per branch name (dict)."}
    )
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator α; branch b is scaled by α / r_b."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the branches' input, in [0, 1)."})
    rank_ratio: Optional[list[float]] = field(
        default=None,
        metadata={
            "help": "MM-LoRA's rank split (UNCERTAIN in the paper): positive weights, one per branch; branch b gets "
            "rank max(1, round(r · w_b / Σw)) of the integer r. None: every branch has rank r."
        },
    )
    mode: str = field(
        default="route",
        metadata={
            "help": "'route': each token uses the branch it is routed to (the papers' gate). 'sum': every branch on "
            "every token, route inputs ignored (MM-LoRA's 'both LoRAs on all tokens' reading, UNCERTAIN)."
        },
    )
    default_route: Optional[str] = field(
        default=None,
        metadata={
            "help": "Branch applied to every token when a call passes no route input (and the branch a bool gate= "
            "switches on). Merging merges this branch. None (the default): such calls run the base model only, and a "
            "training forward (train mode, autograd on) without route_ids= / modality= / gate= raises a ValueError "
            "naming both ways out. The default stays None rather than a branch because the gate is the method: MTP "
            "must leave next-token positions bit-identical to the base and TARA / MM-LoRA route per token, so a "
            "forgotten route input must stop training, not silently train the branch on every token."
        },
    )
    gated_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Target modules that are gated (names / suffixes, or one regex matched against the full module "
            "name). The other targets apply every branch to every token (TARA: only cross-attention to_k/to_v are "
            "gated, to_q/to_out and self-attention are plain LoRA). None: every target is gated."
        },
    )
    alignment_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of TARA's token alignment loss mean|(base+Δ)[routed tokens] − base[align_mask tokens]|, "
            "averaged over the alignment layers and added to outputs.loss when labels are passed; 0 disables."
        },
    )
    alignment_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Gated modules on which the alignment loss is computed (TARA: the cross-attention to_k); names / "
            "suffixes or one regex. None: every gated module."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        branches = self.branches
        if isinstance(branches, str):
            branches = self.branches = [branches]
        if (
            not isinstance(branches, (list, tuple))
            or not branches
            or not all(isinstance(b, str) and b for b in branches)
            or len(set(branches)) != len(branches)
        ):
            raise bad_value(self, "branches", branches, "a non-empty list of distinct non-empty branch names")
        self.branches = list(branches)
        if isinstance(self.r, dict):
            if set(self.r) != set(self.branches) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in self.r.values()
            ):
                raise bad_value(self, "r", self.r,
                                f"an integer >= 1 or a dict {{branch: integer >= 1}} over {self.branches}")
            if self.rank_ratio is not None:
                raise bad_value(self, "rank_ratio", self.rank_ratio, "None when r is a dict of ranks")
        else:
            self.check_positive_int("r")
        self.check_positive("lora_alpha")
        self.check_probability("lora_dropout")
        if self.rank_ratio is not None:
            ratio = self.rank_ratio
            if (
                not isinstance(ratio, (list, tuple))
                or len(ratio) != len(self.branches)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in ratio)
            ):
                raise bad_value(self, "rank_ratio", ratio,
                                f"None or {len(self.branches)} positive numbers (one per branch)")
            self.rank_ratio = [float(w) for w in ratio]
        if self.mode not in MODES:
            raise bad_value(self, "mode", self.mode, f"one of {list(MODES)}")
        if self.default_route is not None and self.default_route not in self.branches:
            raise bad_value(self, "default_route", self.default_route, f"None or one of the branches {self.branches}")
        weight = self.alignment_loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise bad_value(self, "alignment_loss_weight", weight, "a number >= 0 (0 disables the alignment loss)")
        for name in ("gated_modules", "alignment_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
                raise bad_value(self, name, value, "None, a regex string or a list of module names")
            setattr(self, name, sorted(value))

    def branch_ranks(self) -> list[int]:
        """The rank of each branch, in ``branches`` order."""
        if isinstance(self.r, dict):
            return [int(self.r[b]) for b in self.branches]
        if self.rank_ratio is None:
            return [int(self.r)] * len(self.branches)
        total = sum(self.rank_ratio)
        return [max(1, round(self.r * w / total)) for w in self.rank_ratio]
