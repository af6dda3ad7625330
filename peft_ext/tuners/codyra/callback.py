"""CoDyRA rank-pruning schedule: after a dense phase, threshold the per-rank importances g after every optimizer step.

Paper: *Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with
Dynamic Rank-Selective LoRA* (CoDyRA, https://arxiv.org/abs/2412.01004). Official code:
https://github.com/Artificer-AI-Lab/CoDyRA (``models/codyra.py``, ``train_model``: the threshold walks
``np.linspace(0, max_kappa, lambda_num)`` after ``dense_iters``; g is thresholded after ``optimizer.step()``).
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from transformers import TrainerCallback

from .._shared.base import bad_value
from .config import THRESHOLD_MODES, CodyraConfig
from .model import apply_threshold, effective_rank, threshold_at


class CodyraThresholdCallback(TrainerCallback):
    """Applies CoDyRA's threshold schedule once per optimizer step.

    With ``transformers.Trainer`` (or a TRL trainer): ``Trainer(..., callbacks=[CodyraThresholdCallback()])``; it acts
    in ``on_optimizer_step`` (after ``optimizer.step()``, once per optimizer step whatever the gradient accumulation)
    and reads the run length from ``state.max_steps``. In a hand-written loop: ``cb = CodyraThresholdCallback(model,
    max_steps=T)`` and ``cb.step()`` right after each ``optimizer.step()`` (or ``cb.step(global_step, max_steps)``).

    The schedule (``peft_ext.tuners.codyra.threshold_at``): the first ``⌊dense_fraction·T⌋`` steps are dense, then τ
    walks ``linspace(0, max_kappa, num_thresholds)``; τ is not scaled by the learning rate. ``schedule="official"``
    (config or override) uses the official loop's timing instead (``official_threshold_at``). Each layer thresholds
    in its adapter's ``threshold_mode`` ('soft' = the paper's proximal step, 'official' = the official code's
    update). ``CoDyRAThresholdCallback`` (the name METHODS.md uses) is the same class.

    Args:
        model: the model holding CoDyRA layers; taken from the Trainer when omitted.
        seed: accepted for the common ``cls(model=..., seed=...)`` constructor; the schedule is deterministic.
        adapter_name: the CoDyRA adapter to prune (default: each layer's active adapters).
        max_steps: run length T for ``step()`` without ``max_steps``; the Trainer's ``state.max_steps`` otherwise.
        max_kappa, num_thresholds, dense_fraction, schedule, threshold_mode: override the adapter config's values."""

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        seed: int = 0,
        adapter_name: Optional[str] = None,
        max_steps: Optional[int] = None,
        max_kappa: Optional[float] = None,
        num_thresholds: Optional[int] = None,
        dense_fraction: Optional[float] = None,
        threshold_mode: Optional[str] = None,
        schedule: Optional[str] = None,
    ):
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise bad_value(self, "max_steps", max_steps, "an integer >= 1 or None")
        if threshold_mode is not None and threshold_mode not in THRESHOLD_MODES:
            raise bad_value(self, "threshold_mode", threshold_mode, f"one of {THRESHOLD_MODES} or None")
        overrides = {"max_kappa": max_kappa, "num_thresholds": num_thresholds, "dense_fraction": dense_fraction,
                     "schedule": schedule}
        # validate the overrides with the config's own checks (errors name CodyraConfig's field)
        CodyraConfig(**{k: v for k, v in overrides.items() if v is not None})
        self.model = model
        self.seed = seed
        self.adapter_name = adapter_name
        self.max_steps = max_steps
        self.overrides = overrides
        self.threshold_mode = threshold_mode
        self.num_steps = 0  # optimizer steps seen through step()
        self.last_threshold: Optional[float] = None

    def schedule(self) -> dict:
        """``max_kappa``, ``num_thresholds``, ``dense_fraction``, ``schedule``: the overrides, else the adapter's
        config values."""
        configs = getattr(self.model, "peft_config", None) or {}
        name = self.adapter_name
        if name is None and configs:
            active = getattr(self.model, "active_adapters", None) or list(configs)
            name = active[0] if isinstance(active, (list, tuple)) else active
        config = configs.get(name) if name is not None else None
        if not isinstance(config, CodyraConfig):
            config = CodyraConfig()
        return {k: (v if v is not None else getattr(config, k)) for k, v in self.overrides.items()}

    def threshold_at(self, step: int, max_steps: Optional[int] = None) -> Optional[float]:
        """τ applied after optimizer step ``step`` (0-based) of a ``max_steps`` run; None in the dense phase."""
        max_steps = max_steps if max_steps is not None else self.max_steps
        if max_steps is None:
            raise ValueError(
                "CodyraThresholdCallback needs the run length: pass max_steps to the constructor or step().")
        return threshold_at(step, max_steps, **self.schedule())

    def step(self, global_step: Optional[int] = None, max_steps: Optional[int] = None) -> Optional[float]:
        """Threshold g after optimizer step ``global_step`` (0-based; default a counter of the calls) and return the τ
        applied (None in the dense phase)."""
        if self.model is None:
            raise ValueError("CodyraThresholdCallback.step() needs the model: pass it to the constructor.")
        if global_step is None:
            global_step = self.num_steps
        tau = self.threshold_at(global_step, max_steps)
        if tau is not None:
            apply_threshold(self.model, tau, self.adapter_name, self.threshold_mode)
        self.num_steps = global_step + 1
        self.last_threshold = tau
        return tau

    def effective_rank(self) -> dict[str, int]:
        """Active ranks per layer right now (see ``peft_ext.tuners.codyra.effective_rank``)."""
        return effective_rank(self.model, self.adapter_name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.model is None:
            self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        max_steps = self.max_steps if self.max_steps is not None else state.max_steps
        self.step(state.global_step, max_steps)


CoDyRAThresholdCallback = CodyraThresholdCallback  # the name METHODS.md §5.4 uses
