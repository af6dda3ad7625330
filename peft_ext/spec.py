"""``MethodSpec``: everything peft-ext declares about one method (paper, code, capabilities).

Each method folder (``peft_ext/tuners/<name>/__init__.py``) defines ``SPEC = MethodSpec(...)``; ``peft_ext.registry``
registers them. Tests, the README table, the CLI and the benchmarks iterate the registered specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from peft.utils import PeftType


@dataclass(frozen=True)
class MethodSpec:
    """Everything peft-ext declares about one method. One spec per paper; tests, docs and benchmarks iterate them.

    Paper and official code are named in each field; see ``peft_ext.list_methods()``.
    """

    name: str = field(metadata={"help": "Lower-case method name; the PeftType member is its upper-case form."})
    config_cls: type = field(metadata={"help": "The PeftConfig subclass."})
    model_cls: type = field(metadata={"help": "The BaseTuner subclass."})
    paper_title: str = field(metadata={"help": "Title of the paper the method comes from."})
    paper_url: str = field(metadata={"help": "Link to the paper (arXiv abstract page)."})
    code_url: str = field(metadata={"help": "Link to the official code, or '' when none is public."})
    example_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "Small config arguments used by the conformance suite, the benchmark and the docs."},
    )
    example_call: Optional[Callable[[tuple], dict]] = field(
        default=None,
        metadata={"help": "Per-call keyword inputs for the conformance suite's calls: given the token shape the layers "
                  "see (x.shape[:-1], e.g. (batch, tokens) or (rows,)), returns e.g. {'route_ids': tensor}; "
                  "deterministic (no random draws), so a fresh process can repeat the call. None: no per-call inputs."},
    )
    conformance_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "Config overrides the conformance suite applies on top of example_kwargs, e.g. turning on "
                  "auxiliary losses ({'balance_loss_weight': 0.01}); a method with an auxiliary loss that sets them "
                  "must add a non-zero one to outputs.loss when labels are given."},
    )
    mergeable: bool = field(default=True, metadata={"help": "merge_and_unload / merge_adapter are exact."})
    quantizable: bool = field(default=True, metadata={"help": "Works on bitsandbytes 4-bit and 8-bit base layers."})
    lora_convertible: bool = field(default=True, metadata={"help": "save_as_lora / convert_to_lora apply."})
    identity_at_init: bool = field(default=True, metadata={"help": "A fresh adapter leaves the base output unchanged."})
    layer_types: tuple = field(
        default=("linear",),
        metadata={"help": "Layer types the tuner adapts: 'linear' (torch.nn.Linear and bitsandbytes 4/8-bit linear), "
                  "'embedding', 'conv1d' (transformers' Conv1D), 'conv2d'. Targeting another type is an error "
                  "naming the method; PEFT's generic suite runs its embedding / conv cases only for the types listed."},
    )
    routed: bool = field(default=False, metadata={
        "help": "Routes tokens (a learned router or per-call inputs such as route ids); not one static ΔW."})
    sparse_routing: bool = field(
        default=False,
        metadata={"help": "Top-k routing: the experts (or ranks) and router rows that no token of a batch selects get "
                  "no gradient from it, so a short training run may leave some adapter weights unchanged."},
    )
    saturating_scales: bool = field(
        default=False,
        metadata={"help": "Per-input scales pass through ReLU and a clamp: where every scale of a batch is 0 or at the "
                  "clamp (or B is still zero), the scale network gets no gradient from it, so a short training run "
                  "may leave it unchanged."},
    )
    rank_within_layer: bool = field(
        default=False,
        metadata={"help": "r must not exceed min(in_features, out_features) of every target layer (the factors come "
                  "from an SVD of W); a larger r is refused with an error naming the layer. PEFT's generic suite "
                  "lowers r to fit its narrow test layers."},
    )
    summary: str = field(default="", metadata={"help": "One line for the README's method table."})
    ba_shape: bool = field(
        default=False,
        metadata={"help": "ΔW = s·B·A with trainable A and B: layers expose lora_factors(adapter) -> (A, B, s), "
                  "so B·A optimizers (LoRA-Pro) apply."},
    )
    train_callback: Optional[Callable] = field(
        default=None,
        metadata={"help": "TrainerCallback class the method trains with (built as cls(model=..., seed=...)), if any."},
    )

    overhead_target: Optional[float] = field(
        default=None,
        metadata={"help": "Training-step time target against PEFT LoRA at equal rank (scripts/bench_overhead.py "
                  "reports it; never asserted)."},
    )
    bench_variants: tuple = field(
        default=(),
        metadata={"help": "Extra (label, config overrides[, step-time target]) rows that scripts/bench_overhead.py "
                  "times besides example_kwargs, e.g. (('paper mode', {'cache_bases': False}, None),); without a "
                  "third entry the row gets overhead_target."},
    )

    @property
    def prefix(self) -> str:
        """The parameter-name prefix, always ``<name>_`` (transformers rebuilds it from the peft type)."""
        return f"{self.name}_"

    @property
    def peft_type(self) -> PeftType:
        """The ``PeftType`` member of this method."""
        return PeftType[self.name.upper()]
