"""What every peft-ext tuner shares: the config fields PEFT users expect, a tuner-layer mixin with exact merge /
unmerge over PEFT's generic quantization backend, and a ``BaseTuner`` that creates, tags and validates layers.

A method folder (``tuners/<method>/``) then only says what is particular to its paper: the config fields, the adapter
weights (``update_layer``), the adapter branch (``adapter_forward``) and ``get_delta_weight``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, PeftType, resolve_quantization_backend

from ...version import __version__
from .routing import TokenRoutes, current_tokens


def bad_value(config: Any, name: str, value: Any, allowed: str) -> ValueError:
    """A ValueError that names the config class, the field, the value given and what is allowed.

    Used by every peft-ext method's config; see ``peft_ext.list_methods()`` for each paper and its official code. Built
    on PEFT, https://github.com/huggingface/peft.
    """
    owner = type(config).__name__ if not isinstance(config, str) else config
    return ValueError(f"{owner}.{name} must be {allowed}; got {value!r}.")


@dataclass
class ExtConfig(PeftConfig):
    """Fields shared by every peft-ext tuner config; subclasses set ``method_name`` and add their own fields.

    Not a method itself: see the subclasses (``DyLoraConfig``, ``NolaConfig``, ...) for the paper and official code.

    The tuner base of every peft-ext method; see ``peft_ext.list_methods()`` for each paper and its official code. Built
    on PEFT, https://github.com/huggingface/peft.
    """

    method_name: ClassVar[str] = ""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match) or one regex to adapt, e.g. ['q_proj', 'v_proj']; "
            "'all-linear' takes every linear layer but the output head; None uses PEFT's LoRA defaults for the "
            "architecture."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or one regex never to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (with layers_pattern naming the layer list)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, e.g. 'layers' or 'h'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapter layers to train and save, e.g. ['classifier', 'score']."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the paper's initialisation, which leaves the base output unchanged. False: a random "
            "non-zero adapter (for tests and debugging)."
        },
    )
    peft_ext_version: str = field(
        default=__version__, metadata={"help": "The peft-ext version that wrote this config (informational)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType[self.method_name.upper()]
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise bad_value(self, "layers_to_transform", self.layers_to_transform,
                            "None when target_modules is a regex")
        if self.layers_pattern and self.layers_to_transform is None:
            raise bad_value(self, "layers_to_transform", None, "set when layers_pattern is set")
        self.check_bool("init_weights")

    def check_positive_int(self, name: str) -> None:
        """Raise a ValueError naming ``name`` unless it is an integer >= 1."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad_value(self, name, value, "an integer >= 1")

    def check_positive(self, name: str) -> None:
        """Raise a ValueError naming ``name`` unless it is a number > 0."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise bad_value(self, name, value, "a number > 0")

    def check_probability(self, name: str) -> None:
        """Raise a ValueError naming ``name`` unless it lies in [0, 1)."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise bad_value(self, name, value, "a number in [0, 1)")

    def check_bool(self, *names: str) -> None:
        """Raise a ValueError naming the first of ``names`` that is not True or False."""
        for name in names:
            if not isinstance(getattr(self, name), bool):
                raise bad_value(self, name, getattr(self, name), "True or False")

    def check_finite(self, name: str, strict: bool = True) -> None:
        """Raise a ValueError naming ``name`` unless it is a finite number > 0 (``strict``) or >= 0."""
        value = getattr(self, name)
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not number or not (value > 0 if strict else value >= 0):
            raise bad_value(self, name, value, f"a finite number {'>' if strict else '>='} 0")


def in_autograd_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread, e.g. activation checkpointing's
    recomputation of a forward. Used by the auxiliary-loss recording of every routed peft-ext tuner (MoLA, LoRA-Mixer,
    gated LoRA / TARA)."""
    return torch._C._current_graph_task_id() != -1


REENTRANT_MESSAGE = (
    "Auxiliary losses ({what}) were not computed: this training forward has gradients enabled and labels, but the "
    "adapter layers ran with gradients disabled, which is what reentrant gradient checkpointing does (torch's "
    "use_reentrant=True, the default of PEFT's prepare_model_for_kbit_training). Use non-reentrant checkpointing: "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{\"use_reentrant\": False}}), "
    "prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={{\"use_reentrant\": False}}) or "
    "TrainingArguments(gradient_checkpointing_kwargs={{\"use_reentrant\": False}})."
)


class _AuxTerms(list):
    """The auxiliary-loss terms of the current forward. They hold autograd graphs, which ``copy.deepcopy`` and pickling
    refuse, so copies of a layer start with no terms."""

    def __deepcopy__(self, memo):
        return _AuxTerms()

    def __reduce__(self):
        return (_AuxTerms, ())


def _unpack_cpu_4bit(base_layer: nn.Module) -> None:
    """Turn off bitsandbytes' in-place AVX512-BF16 repacking of 4-bit weights on CPU, and undo one already done.

    bitsandbytes >= 0.50 repacks ``Linear4bit`` weights on the first no-grad CPU forward when the CPU has AVX512-BF16;
    afterwards gradients stop flowing through the layer and ``dequantize_4bit`` returns wrong weights.
    """
    if not hasattr(base_layer, "support_avx512bf16_for_cpu"):
        return
    base_layer.support_avx512bf16_for_cpu = False
    state = getattr(base_layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        base_layer.weight.data, base_layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            base_layer.weight.data, state
        )


class ExtLayer(BaseTunerLayer):
    """Tuner-layer mixin for additive methods (``y = base(x) + adapter(x)``, ``ΔW`` materialisable).

    Subclasses define ``adapter_layer_names`` (first entry is used to tell which adapters live here), ``update_layer``,
    ``adapter_forward(adapter, x)`` and ``get_delta_weight(adapter)``. Merge / unmerge go through
    ``get_base_weight`` / ``set_base_weight`` so bitsandbytes 4-bit and 8-bit bases work.

    The tuner base of every peft-ext method; see ``peft_ext.list_methods()`` for each paper and its official code. Built
    on PEFT, https://github.com/huggingface/peft.
    """

    mergeable: ClassVar[bool] = True
    merge_refusal: ClassVar[str] = ""  # why merging is impossible, for layers with mergeable = False

    def _init_base(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.call_inputs: dict = {}  # per-call inputs (route ids, gates) of the current forward, set by ExtModel
        self.aux_losses: list = _AuxTerms()  # weighted auxiliary-loss terms recorded by the current forward
        self.aux_skipped = False  # the current call ran this layer without autograd where it would record terms
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.quantization_backend = resolve_quantization_backend(base)
        if self.quantization_backend is not None and self.quantization_backend.layer_type != "linear":
            raise TypeError(f"{type(base).__name__} is not a quantized linear layer; only linear layers are supported.")
        _unpack_cpu_4bit(base)
        in_features, out_features = _get_in_out_features(base)
        if in_features is None or not (isinstance(base, nn.Linear) or self.quantization_backend is not None):
            raise TypeError(
                f"{type(base).__name__} is not supported; peft-ext tuners adapt torch.nn.Linear and bitsandbytes "
                "Linear8bitLt / Linear4bit layers."
            )
        self.in_features, self.out_features = in_features, out_features

    def aux_recording(self) -> bool:
        """Whether this forward computes auxiliary-loss terms (layers ask before computing one): while autograd records.

        Without autograd the layer is marked (``aux_skipped``), so that ``ExtModel`` can tell a gradient-enabled
        training forward that lost its terms to reentrant checkpointing, which runs the checkpointed blocks under
        ``no_grad``. The recomputation that non-reentrant checkpointing runs inside backward computes the terms again
        (it must repeat the forward's operations), and ``record_aux_loss`` drops them there."""
        if torch.is_grad_enabled():
            return True
        self.aux_skipped = True
        return False

    def record_aux_loss(self, value: torch.Tensor) -> None:
        """Record one (already weighted) auxiliary-loss term of this forward; ``ExtModel`` adds the sum of all
        terms to ``outputs.loss`` when labels are given. Kept only while autograd records and not inside backward (a
        checkpointing recompute would otherwise add every term twice)."""
        if torch.is_grad_enabled() and not in_autograd_backward():
            self.aux_losses.append(value)

    def _has_adapter(self, adapter: str) -> bool:
        return adapter in getattr(self, self.adapter_layer_names[0])

    def adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter branch's output for input ``x`` (same leading shape, ``out_features`` last)."""
        raise NotImplementedError

    def adapter_dtype(self, adapter: str) -> torch.dtype:
        """The dtype the adapter computes in (that of its first weight)."""
        holder = getattr(self, self.adapter_layer_names[0])[adapter]
        return next(holder.parameters()).dtype

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``get_delta_weight`` of each adapter to the base weight (dequantising and requantising if needed)."""
        if not self.mergeable:
            raise ValueError(f"{type(self).__name__} cannot be merged: {self.merge_refusal}")
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if self.quantization_backend is not None and not self.quantization_backend.supports_merge:
            raise ValueError(f"Merging is not supported for {self.quantization_backend.backend_name} base layers.")
        for adapter in adapter_names:
            if not self._has_adapter(adapter):
                continue
            weight = self.get_base_weight()
            merged = weight + self.get_delta_weight(adapter).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter!r} seems to be broken.")
            self.set_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters' ``ΔW`` from the base weight again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if self._has_adapter(adapter):
                weight = self.get_base_weight()
                self.set_base_weight(weight - self.get_delta_weight(adapter).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter in self.active_adapters:
            if self._has_adapter(adapter):
                result = self.add_adapter_output(adapter, x, result)
        return result.to(previous_dtype)

    def add_adapter_output(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The layer output after ``adapter`` is applied to input ``x`` on top of ``result`` (the base output plus the
        adapters before it): ``result + adapter_forward(x)``. The one hook a layer overrides when its adapter is
        gated or routed per token instead of added everywhere; ``forward`` handles disabled / merged / dtypes."""
        x_in = self._cast_input_dtype(x, self.adapter_dtype(adapter))
        return result + self.adapter_forward(adapter, x_in).to(result.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return self.mergeable


class ExtModel(BaseTuner):
    """``BaseTuner`` for peft-ext methods: creates ``layer_cls`` around linear (and quantized linear) modules, tags
    the base model for the model card, and turns "target modules matched nothing" into an error naming the field.

    Subclasses set ``prefix``, ``tuner_layer_cls``, ``layer_cls`` and, when layers need per-module arguments,
    override ``_layer_kwargs``.

    The tuner base of every peft-ext method; see ``peft_ext.list_methods()`` for each paper and its official code. Built
    on PEFT, https://github.com/huggingface/peft.
    """

    layer_cls: ClassVar[type]
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    call_args: ClassVar[tuple[str, ...]] = ()  # per-call keyword arguments, e.g. ("route_ids",)
    # per-call inputs that follow the token axis -> the value generated tokens take (see TokenRoutes); a call's
    # ``route_fill=`` (when "route_fill" is in call_args) overrides it
    token_inputs: ClassVar[dict] = {}
    has_aux_loss: ClassVar[bool] = False  # layers call record_aux_loss during forward

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Hand this call's routing inputs to every tuner layer and add auxiliary losses to ``outputs.loss``.

        PEFT's ``PeftModel`` enters this context around each forward / generate (the way it handles
        ``adapter_names=``); the registry adds ``call_args`` to ``PeftModel.special_peft_forward_args`` so the
        names never reach the base model. The inputs are checked once here (``_check_call_inputs``: types and value
        ranges; the layers check shapes only, without reading values) and moved to the model's device. Per-token
        inputs (``token_inputs``) are fitted to each forward inside the call by ``TokenRoutes``, so ``generate`` works
        with them. Inputs stay on the layers until the next call, so gradient checkpointing recomputes with the same
        ones.
        """
        if not self.call_args and not self.has_aux_loss:
            yield
            return
        inputs = self._check_call_inputs({name: kwargs.get(name) for name in self.call_args})
        device = next((p.device for p in self.model.parameters()), None)
        if device is not None:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        layers = list(self.tuner_layers())
        for layer in layers:
            layer.call_inputs = inputs
            layer.aux_losses = _AuxTerms()
            layer.aux_skipped = False
        handles = []
        if self.token_inputs:
            fill = inputs.get("route_fill")
            fills = {name: default if fill is None else fill for name, default in self.token_inputs.items()}
            routes = TokenRoutes(inputs, fills, layers, current_tokens(args, kwargs))
            if routes:
                handles.append(self.model.register_forward_pre_hook(routes, with_kwargs=True))
        if self.has_aux_loss:
            handles.append(self.model.register_forward_hook(self._add_aux_loss, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_call_inputs(self, inputs: dict) -> dict:
        """Validate (and convert) this call's per-call inputs once, on the values as given: types, dtypes and
        value ranges, raising a ValueError that names the argument. Returns the inputs the layers get. Routed
        tuners override it; the layers then check shapes only."""
        return inputs

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the auxiliary-loss terms the last forward recorded (already weighted), or None when there are none."""
        terms = [t for layer in self.tuner_layers() for t in layer.aux_losses]
        if not terms:
            return None
        return torch.stack([t.float() for t in terms]).sum()

    def _aux_share(self, kwargs) -> Optional[torch.Tensor]:
        """This micro-batch's share of the tokens ``transformers.Trainer`` normalises the loss by, or None.

        With gradient accumulation or several processes the Trainer passes ``num_items_in_batch`` (the label tokens of
        all micro-batches of the step, over all processes), the model's loss is a sum over its tokens divided by that
        count, and the Trainer multiplies the loss by the number of processes. An auxiliary loss added unweighted would
        then count once per micro-batch and per process; weighted by this share it enters each optimizer step as the
        token-weighted average over the step's micro-batches, exactly as without accumulation on one process.
        """
        total = kwargs.get("num_items_in_batch")
        labels = kwargs.get("labels")
        if total is None or labels is None or not torch.is_tensor(labels):
            return None
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

        config = getattr(self.model, "config", None)
        shifts = LOSS_MAPPING.get(getattr(self.model, "loss_type", None)) is ForCausalLMLoss and not getattr(
            config, "is_encoder_decoder", False
        )
        local = (labels[..., 1:] if shifts else labels).ne(-100).sum()
        return local.float() / torch.as_tensor(total, dtype=torch.float32, device=local.device)

    def _add_aux_loss(self, module, args, kwargs, output):
        if kwargs.get("labels") is None:
            return output
        if torch.is_grad_enabled() and not in_autograd_backward():
            skipped = sorted({type(m).__name__ for m in self.tuner_layers() if getattr(m, "aux_skipped", False)})
            if skipped:
                raise RuntimeError(REENTRANT_MESSAGE.format(what=", ".join(skipped)))
        loss = output.get("loss") if isinstance(output, dict) else (output[0] if isinstance(output, tuple) else None)
        aux = self.aux_loss() if loss is not None else None
        if aux is None:
            return output
        share = self._aux_share(kwargs)
        if share is not None:
            aux = aux * share.to(aux.device)
        if isinstance(output, tuple):
            return (loss + aux.to(loss.dtype),) + output[1:]
        output["loss"] = loss + aux.to(loss.dtype)
        return output

    def _layer_kwargs(self, config: PeftConfig, adapter_name: str, current_key: str) -> dict:
        return {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        if current_key is None:
            raise ValueError("current_key must not be None")
        if not isinstance(target, self.tuner_layer_cls):
            self._check_layer_type(config, target, current_key)
        kwargs = self._layer_kwargs(config, adapter_name, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, **kwargs)
            return
        new_module = self.layer_cls(target, adapter_name, config, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter trains only after set_adapter
        new_module.train(target.training)  # a new module starts in training mode; follow the module it wraps
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _check_layer_type(config, target: nn.Module, key: str) -> None:
        """Refuse a target that is not a linear layer with an error naming the method (``MethodSpec.layer_types``)."""
        backend = resolve_quantization_backend(target)
        if isinstance(target, nn.Linear) or (backend is not None and backend.layer_type == "linear"):
            return
        method = config.method_name
        raise TypeError(
            f"{method} ({type(config).__name__}): {type(target).__name__} is not supported (target module {key!r}); "
            f"{method} adapts linear layers only (torch.nn.Linear and bitsandbytes Linear8bitLt / Linear4bit). Leave "
            "it out of target_modules, or put it in modules_to_save to train it fully."
        )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except ValueError as exc:
            if "not found in the base model" not in str(exc):
                raise
            config = self.peft_config[adapter_name]
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"{type(config).__name__}.target_modules={config.target_modules!r} matched no module of the model; "
                f"allowed: names (or suffixes) of linear layers, e.g. {names[:12]}, a regex, or 'all-linear'."
            ) from exc

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        # Every bitsandbytes 4-bit layer, adapted or not: a repacked one cuts gradients to all layers below it.
        for module in model.modules():
            _unpack_cpu_4bit(module)

    def _post_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        tags = ["peft-ext", str(config.peft_type.value).lower()]
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(tags)
        else:
            existing = list(getattr(model, "model_tags", None) or [])
            model.model_tags = existing + [t for t in tags if t not in existing]

    def tuner_layers(self):
        """Iterate this model's tuner layers."""
        return (m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls))
