"""CoDyRA model: injects ``CodyraLinear`` layers; rank-selection and continual-learning helpers.

Paper: *Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with
Dynamic Rank-Selective LoRA* (CoDyRA, https://arxiv.org/abs/2412.01004). Official code:
https://github.com/Artificer-AI-Lab/CoDyRA (``models/codyra.py``: ``train_model``, ``increment_task``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from torch import nn

from .._shared.base import ExtModel, bad_value
from .config import SCHEDULES
from .layer import PAST_NAMES, CodyraLayer, CodyraLinear


def codyra_layers(model: nn.Module) -> list[CodyraLayer]:
    """All CoDyRA layers inside ``model``."""
    return [m for m in model.modules() if isinstance(m, CodyraLayer)]


def _named_layers(model: nn.Module, adapter_name: Optional[str]):
    """(name, layer, adapter) for every CoDyRA layer holding ``adapter_name`` (default: its active adapters); the name
    is the layer's path inside the base model (e.g. ``model.layers.0.self_attn.q_proj``), whatever wraps it."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, CodyraLayer):
            for adapter in [adapter_name] if adapter_name else module.active_adapters:
                if adapter in module.codyra_gate:
                    found.append((module.layer_key.get(adapter) or name, module, adapter))
    if not found:
        raise ValueError(
            f"The model has no CoDyRA adapter {adapter_name!r}." if adapter_name else "The model has no CoDyRA layers."
        )
    return found


def effective_rank(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, int]:
    """Active ranks (non-zero entries of g) per CoDyRA layer, keyed by its path inside the base model (e.g.
    ``model.layers.0.self_attn.q_proj``; the adapter name is appended when
    several adapters are counted)."""
    found = _named_layers(model, adapter_name)
    several = len({a for _, _, a in found}) > 1
    return {(f"{name}[{a}]" if several else name): layer.effective_rank(a) for name, layer, a in found}


def apply_threshold(
    model: nn.Module, tau: float, adapter_name: Optional[str] = None, mode: Optional[str] = None
) -> int:
    """Threshold the importance vector g of every CoDyRA layer with ``tau`` (``mode``: 'soft' | 'official', default
    each adapter's ``threshold_mode``); returns the total number of active ranks afterwards."""
    found = _named_layers(model, adapter_name)
    return sum(layer.apply_threshold(a, tau, mode) for _, layer, a in found)


def threshold_at(step: int, max_steps: int, max_kappa: float, num_thresholds: int = 50,
                 dense_fraction: float = 0.5, schedule: str = "paper") -> Optional[float]:
    """The CoDyRA threshold τ applied after optimizer step ``step`` (0-based) of a ``max_steps`` run, or None in the
    dense phase.

    ``schedule="paper"``: the first ``D = ⌊dense_fraction·max_steps⌋`` steps are dense; from step D on τ is
    ``linspace(0, max_kappa, num_thresholds)[k]`` with ``k = min(num_thresholds − 1, 1 + ⌊(step − D)·num_thresholds /
    (max_steps − D)⌋)``, i.e. the schedule advances one entry every ``(max_steps − D)/num_thresholds`` steps counted
    from D and reaches ``max_kappa`` for the last ones; with ``max_steps − D < num_thresholds`` it compresses.

    ``schedule="official"``: the official ``train_model`` timing, see ``official_threshold_at``. It counts the
    advances of τ from the start of training (iterations that are multiples of ``L = (T − D)//num_thresholds``), not
    from D, so the two sequences coincide only when L divides D and ``num_thresholds`` divides ``T − D`` (and even then
    the official code skips thresholding at step D itself); with ``T − D < num_thresholds``, L = 0 and τ never leaves
    0 there (no pruning at all)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise bad_value("threshold_at", "max_steps", max_steps, "an integer >= 1")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad_value("threshold_at", "step", step, "an integer >= 0")
    if schedule not in SCHEDULES:
        raise bad_value("threshold_at", "schedule", schedule, f"one of {SCHEDULES}")
    if schedule == "official":
        return official_threshold_at(step, max_steps, max_kappa, num_thresholds, dense_fraction)
    dense = int(dense_fraction * max_steps)
    if step < dense:
        return None
    span = max(max_steps - dense, 1)
    k = min(num_thresholds - 1, 1 + (step - dense) * num_thresholds // span)
    return float(np.linspace(0.0, max_kappa, num_thresholds)[k])


def official_threshold_at(step: int, max_steps: int, max_kappa: float, num_thresholds: int = 50,
                          dense_fraction: float = 0.5) -> Optional[float]:
    """τ after optimizer step ``step`` (0-based) as the official CoDyRA ``train_model`` computes it, or None where it
    does not threshold (official ``models/codyra.py``).

    With ``D = dense_fraction·max_steps`` (a float) and ``L = int((max_steps − D) // num_thresholds)``, the official
    loop moves to the next entry of ``linspace(0, max_kappa, num_thresholds)`` at every iteration ``i >= D`` with
    ``i % L == 0`` (counted from iteration 0; never when L = 0) and thresholds after the optimizer step of every
    iteration ``i > D``. So τ at step t is entry ``min(num_thresholds − 1, #{multiples of L in [⌈D⌉, t]})``."""
    dense = dense_fraction * max_steps
    if step <= dense:
        return None
    length = int((max_steps - dense) // num_thresholds)
    count = 0 if length <= 0 else step // length - (math.ceil(dense) - 1) // length
    return float(np.linspace(0.0, max_kappa, num_thresholds)[min(num_thresholds - 1, count)])


def increment_task(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """CoDyRA's task boundary: fold the adapter's ``B diag(g) A`` (active ranks) into each base weight, then
    re-initialise A, B and g (a fresh gate draw). The model computes the same outputs right after the call (B = 0).

    The folded factors stay in the adapter's buffers (``codyra_past_*``), so ``save_pretrained`` keeps them and
    ``PeftModel.from_pretrained`` on the original base folds them in again. Quantized bases are refused (the fold
    rewrites W), as is a merged adapter. Create a fresh optimizer for the next task (A, B, g are re-initialised in
    place; their old Adam moments would otherwise carry over). Returns the folded rank per layer.

    Official code (``codyra_Linear.increment_task``) keeps the folded factors as frozen ``old_lora_*`` parameters the
    same way."""
    found = _named_layers(model, adapter_name)
    for _, layer, adapter in found:  # check everything before touching any weight
        layer.check_can_fold(adapter)
    folded = {name: layer.increment_task(adapter) for name, layer, adapter in found}
    configs = getattr(model, "peft_config", {}) or {}
    if adapter_name in configs:
        configs[adapter_name].task_index += 1
    return folded


class CodyraModel(ExtModel):
    """CoDyRA tuner model.

    Train with ``peft_ext.callbacks.codyra.CodyraThresholdCallback`` (the rank-pruning schedule); inspect
    ``effective_rank()``; close a task with ``increment_task()``. All three are also reachable on the ``PeftModel``."""

    prefix: str = "codyra_"
    tuner_layer_cls = CodyraLayer
    layer_cls = CodyraLinear

    def _layer_kwargs(self, config, adapter_name: str, current_key: str) -> dict:
        return {"layer_key": current_key}

    def effective_rank(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """Active ranks per layer; see ``peft_ext.tuners.codyra.effective_rank``."""
        return effective_rank(self.model, adapter_name)

    def apply_threshold(self, tau: float, adapter_name: Optional[str] = None, mode: Optional[str] = None) -> int:
        """Threshold g of every layer; see ``peft_ext.tuners.codyra.apply_threshold``."""
        return apply_threshold(self.model, tau, adapter_name, mode)

    def increment_task(self, adapter_name: str = "default") -> dict[str, int]:
        """Fold the current task into the base weights and start a new one; see
        ``peft_ext.tuners.codyra.increment_task``."""
        return increment_task(self, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Create the past-task buffers a checkpoint carries (they only exist after ``increment_task``) before PEFT
        maps the checkpoint keys onto the model's keys."""
        modules = dict(model.named_modules())
        for key, value in state_dict.items():
            for name in PAST_NAMES:
                if key.endswith("." + name):
                    owner = key[: -len(name) - 1]
                    layer = modules.get(owner, modules.get(owner.removeprefix("base_model.model.")))
                    if isinstance(layer, CodyraLayer) and adapter_name in layer.codyra_gate:
                        layer.prepare_past(adapter_name, name, value)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
