"""LISA: train only γ randomly sampled decoder blocks (plus embeddings, final norm and LM head), resampled every K steps.

Paper: *LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning*
(https://arxiv.org/abs/2403.17919). Official code: https://github.com/OptimalScale/LMFlow
(``src/lmflow/pipeline/utils/lisa_trainer.py``, ``DynamicLayerActivationCallback``; defaults in ``src/lmflow/args.py``:
``lisa_activated_layers=2``, ``lisa_interval_steps=20``).

Differences from the official callback:

* the official one freezes every block in its constructor, i.e. before ``Trainer`` builds the optimizer, so blocks
  frozen then are missing from the optimizer; here nothing is frozen until the first switch (step 0), after the
  optimizer exists;
* the official one draws from numpy's global RNG; here the draw of interval ``k`` is the ``(k+1)``-th
  ``np.random.RandomState(seed).choice(L, γ, replace=False)`` — the same sets the official callback gives after
  ``np.random.seed(seed)`` — but replayed from ``(seed, k)`` alone, so a resumed run samples the same blocks and the
  global RNG is left alone;
* with ``reset_state=True`` (default) switched-off parameters lose their optimizer state (``exp_avg`` ...) and their
  ``.grad``, so memory holds optimizer state for the active blocks only (the official code keeps the state of every
  block ever active; a block re-activated later restarts from fresh Adam state here);
* adapter mode: on a PEFT model only the adapter (LoRA) parameters of the sampled blocks are switched.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from torch import nn
from transformers import TrainerCallback

__all__ = ["LisaCallback", "find_layers"]

_COMMON_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (``model.base_model.model``), else ``model``."""
    try:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model.base_model.model
    except ImportError:  # pragma: no cover
        pass
    return model


def _has_peft_layers(model: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def find_layers(model: nn.Module, layers_attr: Optional[str] = None) -> tuple:
    """``(path, nn.ModuleList)`` of the decoder blocks of ``model`` (a transformers or PEFT model).

    ``layers_attr`` is a dotted path relative to ``model`` or to the transformers model inside a PeftModel (e.g.
    ``"model.layers"``). Without it: the first of the usual paths (``model.layers``, ``transformer.h``, ...) that is a
    ModuleList, else the longest ModuleList in the model.

    LISA paper: https://arxiv.org/abs/2403.17919; official code https://github.com/OptimalScale/LMFlow.
    """
    base = _unwrap_peft(model)
    prefix = "" if base is model else next(n for n, m in model.named_modules() if m is base)
    candidates = [layers_attr] if layers_attr else list(_COMMON_LAYER_PATHS)
    for path in candidates:
        for root, root_prefix in ((base, prefix), (model, "")):
            try:
                module = root.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList):
                return (f"{root_prefix}.{path}" if root_prefix else path), module
    if layers_attr:
        raise ValueError(f"LisaCallback: no nn.ModuleList at {layers_attr!r}.")
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError("LisaCallback: no nn.ModuleList of decoder blocks found; pass layers_attr.")
    return best


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or similar wrappers)."""
    while optimizer is not None and hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


class LisaCallback(TrainerCallback):
    """LISA layer sampling (paper https://arxiv.org/abs/2403.17919, official code https://github.com/OptimalScale/LMFlow
    ``DynamicLayerActivationCallback``).

    Every ``interval_steps`` optimizer steps (from step 0) all decoder blocks are frozen and ``n_layers`` of them,
    drawn uniformly without replacement, are unfrozen; parameters outside the blocks that match ``always_train``
    (embeddings, final norm, LM head) always train.

    With ``transformers.Trainer``: ``Trainer(..., callbacks=[LisaCallback(n_layers=2, interval_steps=20)])`` with every
    parameter trainable when the Trainer builds its optimizer (the first switch happens at step 0, after that). In a
    hand-written loop: build the optimizer over all parameters, then call ``lisa.step(optimizer=opt)`` before each
    optimizer step (before the forward pass).

    Args:
        model: the model; taken from the Trainer when omitted.
        n_layers: γ, the number of active blocks (official default 2; the paper's README uses 1).
        interval_steps: K, the number of optimizer steps between switches (default 20).
        seed: seed of the sampling. The blocks of interval ``k = step // K`` are a function of ``(seed, k)`` only.
        layers_attr: dotted path of the ``nn.ModuleList`` of blocks (default: found automatically).
        always_train: name substrings of parameters outside the blocks that always train (full mode only).
        adapter_mode: switch only the adapter parameters of the blocks (those trainable when the callback first
            switches), leaving the base model frozen. ``None``: on when the model has PEFT tuner layers.
        reset_state: delete the optimizer state and ``.grad`` of parameters switched off (default True).
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        n_layers: int = 2,
        interval_steps: int = 20,
        seed: int = 0,
        layers_attr: Optional[str] = None,
        always_train: Sequence[str] = ("embed", "lm_head", "norm"),
        adapter_mode: Optional[bool] = None,
        reset_state: bool = True,
    ):
        for arg, value in (("n_layers", n_layers), ("interval_steps", interval_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LisaCallback.{arg} must be an integer >= 1; got {value!r}.")
        self.model = model
        self.n_layers = n_layers
        self.interval_steps = interval_steps
        self.seed = seed
        self.layers_attr = layers_attr
        self.always_train = tuple(always_train)
        self.adapter_mode = adapter_mode
        self.reset_state = reset_state
        self.optimizer = None
        self.num_steps = 0  # optimizer steps seen through step() without an explicit global_step
        self.active_layers: List[int] = []
        self.current_interval: Optional[int] = None
        self.history: List[tuple] = []  # (global_step, active layer indices) at each switch
        self._setup_done = False
        self._rng = None
        self._rng_interval = -1

    # ----------------------------------------------------------------------------------------------- set-up
    def _setup(self) -> None:
        if self._setup_done:
            return
        if self.model is None:
            raise ValueError("LisaCallback needs the model: pass it to the constructor.")
        self.layers_path, layers = find_layers(self.model, self.layers_attr)
        self.total_layers = len(layers)
        if self.n_layers > self.total_layers:
            raise ValueError(f"LisaCallback.n_layers={self.n_layers} exceeds the {self.total_layers} blocks.")
        if self.adapter_mode is None:
            self.adapter_mode = _has_peft_layers(self.model)
        # parameters switched per block: all of them (full mode) or those trainable now (adapter mode)
        self._layer_params: List[List[nn.Parameter]] = []
        for block in layers:
            params = [p for p in block.parameters() if p.requires_grad or not self.adapter_mode]
            self._layer_params.append(params)
        if self.adapter_mode and not any(self._layer_params):
            raise ValueError("LisaCallback(adapter_mode=True): no trainable adapter parameters in the blocks.")
        in_blocks = {id(p) for block in layers for p in block.parameters()}
        self._always_params: Dict[str, nn.Parameter] = {}
        if not self.adapter_mode:
            for name, p in self.model.named_parameters():
                if id(p) not in in_blocks and any(pat in name for pat in self.always_train):
                    self._always_params[name] = p
        self._setup_done = True

    # ----------------------------------------------------------------------------------------------- sampling
    def sample(self, interval: int) -> List[int]:
        """The active blocks of interval ``interval`` (steps ``interval*K .. interval*K + K-1``), sorted.

        Equal to the ``(interval+1)``-th ``np.random.choice(L, γ, replace=False)`` after ``np.random.seed(seed)``
        (the official callback's draws), computed from ``(seed, interval)`` alone.
        """
        self._setup()
        if self._rng is None or interval <= self._rng_interval:
            self._rng, self._rng_interval = np.random.RandomState(self.seed), -1
            self._last_draw = None
        while self._rng_interval < interval:
            self._last_draw = self._rng.choice(self.total_layers, self.n_layers, replace=False)
            self._rng_interval += 1
        return sorted(int(i) for i in self._last_draw)

    # ----------------------------------------------------------------------------------------------- switching
    def _set_active(self, active: List[int], optimizer) -> None:
        optimizer = _unwrap_optimizer(optimizer)
        active_set = set(active)
        for p in self._always_params.values():
            p.requires_grad_(True)
        for idx, params in enumerate(self._layer_params):
            on = idx in active_set
            for p in params:
                p.requires_grad_(on)
                if not on and self.reset_state:
                    p.grad = None
                    if optimizer is not None:
                        optimizer.state.pop(p, None)
        self.active_layers = sorted(active_set)

    def step(self, global_step: Optional[int] = None, optimizer=None) -> List[int]:
        """Apply the active blocks of optimizer step ``global_step`` (default: a counter of the calls) and return them.

        Switches only when the step enters a new interval (``global_step // K`` changed, which includes step 0 and the
        first step of a resumed run). ``optimizer`` (or the one given before) is cleaned of switched-off parameters.
        """
        self._setup()
        if optimizer is not None:
            self.optimizer = optimizer
        if global_step is None:
            global_step = self.num_steps
        self.num_steps = global_step + 1
        interval = global_step // self.interval_steps
        if interval != self.current_interval:
            self._set_active(self.sample(interval), self.optimizer)
            self.current_interval = interval
            self.history.append((global_step, list(self.active_layers)))
        return self.active_layers

    def trainable_parameter_names(self) -> List[str]:
        """Names of the parameters that currently require grad."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------------------- Trainer hooks
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.model is None:
            self.model = model
        if optimizer is not None:
            self.optimizer = optimizer

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.step(state.global_step, optimizer=optimizer)
