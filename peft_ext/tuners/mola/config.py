"""MoLA configuration.

Paper: *Higher Layers Need More LoRA Experts* (Gao et al., 2024; NAACL Findings 2025 as *MoLA: MoE LoRA with
Layer-wise Expert Allocation*), https://arxiv.org/abs/2402.08562. Official code: https://github.com/GCYZSL/MoLA
(``src/mola_lora_hacked.py`` ``Linear_MoE``, ``src/mola_modeling_llama_hacked.py`` ``load_balancing_loss_func``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from .._shared.base import ExtConfig, bad_value

PerLayer = Union[int, list, str]
BALANCE_SCOPES = ("layer", "module")


def parse_per_layer(config, name: str, value) -> Union[int, list[int]]:
    """Validate a per-layer setting (``num_experts`` / ``top_k``) and return it as an int or a list of ints.

    Accepted: an int >= 1 (every layer); a list of ints >= 1, one per decoder layer (the official code's
    ``--number_experts 2,2,...,8``); or a depth pattern string ``"2,4,6,8"``: the decoder layers are cut into as many
    contiguous groups of (near) equal size as there are values and group g uses value g (MoLA-▽ on 32 layers: layers
    0-7 get 2, 8-15 get 4, 16-23 get 6, 24-31 get 8). Raises a ValueError naming the field otherwise."""
    allowed = "an int >= 1, a list of ints >= 1 (one per layer) or a depth pattern string such as '2,4,6,8'"
    if isinstance(value, bool):
        raise bad_value(config, name, value, allowed)
    if isinstance(value, int):
        if value < 1:
            raise bad_value(config, name, value, allowed)
        return value
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("/", ",").split(",") if p.strip()]
        try:
            ints = [int(p) for p in parts]
        except ValueError:
            raise bad_value(config, name, value, allowed) from None
        if not ints or any(v < 1 for v in ints):
            raise bad_value(config, name, value, allowed)
        return value
    if isinstance(value, (list, tuple)):
        if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise bad_value(config, name, value, allowed)
        return list(value)
    raise bad_value(config, name, value, allowed)


def pattern_values(value: str) -> list[int]:
    """The integers of a depth pattern string such as ``"2,4,6,8"`` (also ``"2/4/6/8"``)."""
    return [int(p.strip()) for p in value.replace("/", ",").split(",") if p.strip()]


def value_for_layer(config, name: str, value, layer_index: Optional[int], num_layers: Optional[int]) -> int:
    """The value of the per-layer setting ``name`` for decoder layer ``layer_index`` of ``num_layers``.

    See ``parse_per_layer`` for the forms; a list must have exactly one entry per layer, a pattern string of G values
    gives layer i the value ``pattern[i * G // num_layers]``. Modules outside a numbered layer list (no layer index)
    only accept a plain int."""
    if isinstance(value, int):
        return value
    if layer_index is None or not num_layers:
        raise bad_value(
            config, name, value,
            "an int for modules that are not inside a numbered layer list (set layers_pattern, e.g. 'layers', if "
            "the model's layer list is not found)",
        )
    if isinstance(value, str):
        values = pattern_values(value)
        return values[min(len(values) - 1, layer_index * len(values) // num_layers)]
    if len(value) != num_layers:
        raise bad_value(
            config, name, value,
            f"a list with one entry per layer ({num_layers} layers), an int, or a depth pattern string such as "
            "'2,4,6,8' (groups of layers)",
        )
    return value[layer_index]


@dataclass
class MolaConfig(ExtConfig):
    """Configuration of a MoLA adapter: a mixture of LoRA experts on every target module, with a learned top-k router
    and a number of experts that may differ from layer to layer (MoLA-▽ puts more experts in higher layers).

    Per token x: ``p = softmax(x W_rᵀ)`` (fp32, router without dropout), ``(w, idx) = topk(p, k)``, ``w ← w / Σw``,
    ``y = x Wᵀ + Σ_{e∈idx} w_e · (α/r) · B_e A_e drop(x)``. Paper https://arxiv.org/abs/2402.08562, official code
    https://github.com/GCYZSL/MoLA.

    Differences from the official code, all documented options: ``renormalize=None`` (default) keeps the official
    renormalisation for k >= 2 but uses the raw probability for k = 1, where renormalising makes every weight 1 and
    the router untrainable (official: always renormalise, set ``renormalize=True``). The balance loss is off by default
    as in the official code (``obalance=False``); ``balance_loss_weight=0.001`` is the official ``obalance=True``.
    """

    method_name: ClassVar[str] = "mola"

    r: int = field(default=8, metadata={"help": "LoRA rank of every expert (paper: 8)."})
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator α; each expert is scaled by α/r."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the experts' input, in [0, 1) (paper: 0.05); the router sees x."}
    )
    num_experts: PerLayer = field(
        default=8,
        metadata={
            "help": "LoRA experts per target module: an int (every layer), a list with one int per decoder layer, or "
            "a depth pattern string: '2,4,6,8' cuts the layers into 4 contiguous groups (MoLA-▽: 2 experts in the "
            "lowest quarter ... 8 in the highest)."
        },
    )
    top_k: PerLayer = field(
        default=2,
        metadata={"help": "Experts each token uses (paper: 2); same forms as num_experts, at most num_experts."},
    )
    renormalize: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Renormalise the selected probabilities to sum to 1. None: yes for top_k >= 2 (official), no for "
            "top_k = 1 (renormalising top-1 makes the weight 1 and the router gets no gradient). True / False force it."
        },
    )
    balance_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the load-balancing loss E·Σ_e f_e·P̄_e added to outputs.loss when labels are given; "
            "0 disables it (official default obalance=False); 0.001 is the official obalance=True."
        },
    )
    balance_loss_scope: str = field(
        default="layer",
        metadata={
            "help": "'layer': one loss per decoder layer over the concatenated routing of all its adapted modules, "
            "summed over layers (official); 'module': one loss per adapted module, summed."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_positive_int("r")
        self.check_positive("lora_alpha")
        self.check_probability("lora_dropout")
        self.num_experts = parse_per_layer(self, "num_experts", self.num_experts)
        self.top_k = parse_per_layer(self, "top_k", self.top_k)
        if isinstance(self.num_experts, int) and isinstance(self.top_k, int) and self.top_k > self.num_experts:
            raise bad_value(self, "top_k", self.top_k, f"at most num_experts ({self.num_experts})")
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise bad_value(self, "renormalize", self.renormalize, "None, True or False")
        w = self.balance_loss_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
            raise bad_value(self, "balance_loss_weight", w, "a finite number >= 0 (0 disables the loss)")
        if self.balance_loss_scope not in BALANCE_SCOPES:
            raise bad_value(self, "balance_loss_scope", self.balance_loss_scope, f"one of {BALANCE_SCOPES}")
        if self.renormalize is True and self.top_k == 1:
            warnings.warn(
                "MolaConfig: top_k=1 with renormalize=True gives every token weight 1, so the router receives no "
                "gradient from the task loss (only from the balance loss); use renormalize=None or False.",
                stacklevel=3,
            )

    def resolve_renormalize(self, top_k: int) -> bool:
        """Whether a layer with ``top_k`` experts per token renormalises its routing weights."""
        return self.renormalize if self.renormalize is not None else top_k >= 2
