"""LISA: train only γ randomly sampled decoder blocks (plus embeddings, final norm and LM head), resampled every K
steps.

Paper: *LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning*
(https://arxiv.org/abs/2403.17919). Official code: https://github.com/OptimalScale/LMFlow
(``src/lmflow/pipeline/utils/lisa_trainer.py``, ``DynamicLayerActivationCallback``; defaults in ``src/lmflow/args.py``:
``lisa_activated_layers=2``, ``lisa_interval_steps=20``).

What the official callback does (LMFlow master, checked): its constructor freezes nothing; at ``on_step_begin`` with
``global_step % K == 0`` (step 0 included) it sets ``requires_grad=False`` on every block parameter and ``True`` on
the γ blocks of ``np.random.choice(L, γ, replace=False)`` drawn from numpy's global RNG. Parameters outside the
blocks are left as they are (all trainable in full fine-tuning). It never touches the optimizer: the Trainer builds
it before step 0 with every parameter trainable, and the Adam state of a block switched off stays allocated (not
updated while frozen, since its ``.grad`` is ``None`` after ``zero_grad``). History (``finetuner.py`` before the
callback moved to ``lisa_trainer.py``): the first version (LMFlow ``ac7e9c32``, 2024-03-12) froze every block in the
constructor, before the Trainer built its optimizer, so the optimizer held no block; ``c050639d`` (committed
2024-03-31) sampled γ blocks in the constructor instead, so only those reached it; ``942e5b87`` (2024-04-01, "Fix OOM
problem during init") removed that call, which is the behaviour since.

Differences from the official callback:

* the draw of interval ``k`` is the ``(k+1)``-th ``np.random.RandomState(seed).choice(L, γ, replace=False)`` — the
  same sets the official callback gives after ``np.random.seed(seed)`` — replayed from ``(seed, k)`` alone, so a
  resumed run samples the same blocks and numpy's global RNG is left alone;
* with ``reset_state=True`` (default) switched-off parameters lose their optimizer state (``exp_avg`` ...) and their
  ``.grad``, so memory holds optimizer state for the active blocks only; ``reset_state=False`` keeps it, as the
  official callback does (a block re-activated later then continues from its old Adam state);
* parameters matching ``always_train`` (embeddings, final norm, LM head) are switched on explicitly;
* two modes for PEFT models that the official code does not have (``mode=``): ``"adapter"`` switches only the
  adapter (LoRA) parameters of the sampled blocks; ``"hybrid"`` trains the base weights of the sampled blocks and the
  adapter weights of all the other blocks (the issue's "PEFT adapter on the non-sampled layers");
* the optimizer is checked at the first switch: a parameter LISA can switch on that the optimizer does not hold (it
  would get gradients and never update) raises ``ValueError``.

Building the optimizer. Every parameter that can ever be switched on must be in the optimizer (``lisa_parameters``
lists them). With ``transformers.Trainer`` and its default optimizer nothing is needed: the callback's
``on_init_end`` (end of ``Trainer.__init__``, before ``train()`` builds the optimizer and wraps the model in DDP) makes
all of them trainable, and the first switch at step 0 freezes what is not sampled. With ``Trainer(optimizers=...)`` or
a hand-written loop, build the optimizer over ``lisa_parameters(model, mode=...)``.

Saving. In ``"full"`` and ``"hybrid"`` mode on a PEFT model base weights train, and ``PeftModel.save_pretrained`` (what
``Trainer`` saves for a PEFT model) writes the adapter only: save ``model.merge_and_unload()`` (or the base model's
full state dict) to keep the trained base weights.

Multi-process (DDP): blocks are frozen between steps, so DDP must tolerate parameters without gradients:
``find_unused_parameters=True``, which ``Trainer`` uses unless activation checkpointing is on (then pass
``ddp_find_unused_parameters=True`` with non-reentrant checkpointing); ``ddp_find_unused_parameters=False`` raises.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from torch import nn
from transformers import TrainerCallback

__all__ = ["LisaCallback", "find_layers", "lisa_parameters"]

MODES = ("full", "adapter", "hybrid")

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


def _unique(params) -> List[nn.Parameter]:
    """``params`` without repeats (tied weights), in first-seen order."""
    return list({id(p): p for p in params}.values())


class LisaCallback(TrainerCallback):
    """LISA layer sampling (paper https://arxiv.org/abs/2403.17919, official code https://github.com/OptimalScale/LMFlow
    ``DynamicLayerActivationCallback``).

    Every ``interval_steps`` optimizer steps (from step 0) ``n_layers`` decoder blocks are drawn uniformly without
    replacement. What trains then depends on ``mode``:

    * ``"full"`` (the paper's LISA): every parameter of the sampled blocks, plus the parameters outside the blocks
      that match ``always_train`` (embeddings, final norm, LM head); the other blocks are frozen.
    * ``"adapter"``: on a PEFT model, only the adapter parameters (those trainable when the callback sets up) of the
      sampled blocks; the base model and ``always_train`` stay frozen.
    * ``"hybrid"``: on a PEFT model, the base weights (every non-adapter parameter) of the sampled blocks, the adapter
      parameters of every other block, and ``always_train`` as in full mode. A sampled block's own adapter is frozen
      while its base weights train.

    With ``transformers.Trainer``: ``Trainer(..., callbacks=[LisaCallback(n_layers=2, interval_steps=20)])`` and the
    Trainer's default optimizer — the callback makes every parameter it may switch on trainable at the end of
    ``Trainer.__init__`` so the optimizer holds them all. With ``Trainer(optimizers=(opt, sched))`` or a hand-written
    loop: build ``opt`` over :func:`lisa_parameters` and call ``lisa.step(optimizer=opt)`` before each optimizer
    step (before the forward pass). An optimizer missing one of those parameters raises ``ValueError`` at the first
    switch.

    Args:
        model: the model; taken from the Trainer when omitted.
        n_layers: γ, the number of sampled blocks (official default 2; the paper's README uses 1).
        interval_steps: K, the number of optimizer steps between switches (default 20).
        seed: seed of the sampling. The blocks of interval ``k = step // K`` are a function of ``(seed, k)`` only.
        layers_attr: dotted path of the ``nn.ModuleList`` of blocks (default: found automatically).
        always_train: name substrings of parameters outside the blocks that always train (full and hybrid mode).
        adapter_mode: older spelling of ``mode``: ``True`` is ``"adapter"``, ``False`` is ``"full"``.
        reset_state: delete the optimizer state and ``.grad`` of parameters switched off (default True; the official
            callback keeps them: ``False``).
        mode: ``"full"``, ``"adapter"`` or ``"hybrid"``; ``None`` (default): ``"adapter"`` when the model has PEFT
            tuner layers, else ``"full"``.
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
        *,
        mode: Optional[str] = None,
    ):
        for arg, value in (("n_layers", n_layers), ("interval_steps", interval_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LisaCallback.{arg} must be an integer >= 1; got {value!r}.")
        if mode is not None and mode not in MODES:
            raise ValueError(f"LisaCallback.mode must be one of {MODES} or None; got {mode!r}.")
        if adapter_mode is not None:
            legacy = "adapter" if adapter_mode else "full"
            if mode is not None and mode != legacy:
                raise ValueError(
                    f"LisaCallback: adapter_mode={adapter_mode!r} means mode={legacy!r}, which contradicts "
                    f"mode={mode!r}; pass only mode."
                )
            mode = legacy
        self.model = model
        self.n_layers = n_layers
        self.interval_steps = interval_steps
        self.seed = seed
        self.layers_attr = layers_attr
        self.always_train = tuple(always_train)
        self.mode = mode
        self.reset_state = reset_state
        self.optimizer = None
        self.num_steps = 0  # optimizer steps seen through step() without an explicit global_step
        self.active_layers: List[int] = []
        self.current_interval: Optional[int] = None
        self.history: List[tuple] = []  # (global_step, active layer indices) at each switch
        self._setup_done = False
        self._optimizer_checked = False
        self._rng = None
        self._rng_interval = -1

    @property
    def adapter_mode(self) -> Optional[bool]:
        """``mode == "adapter"`` (``None`` until the mode is resolved)."""
        return None if self.mode is None else self.mode == "adapter"

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
        if self.mode is None:
            self.mode = "adapter" if _has_peft_layers(self.model) else "full"
        self._names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        # per block: the parameters on while it is sampled, and those on while it is not (hybrid only)
        self._sampled_params: List[List[nn.Parameter]] = []
        self._unsampled_params: List[List[nn.Parameter]] = []
        for block in layers:
            params = _unique(block.parameters())
            adapter = [p for p in params if p.requires_grad]  # the adapters on a PEFT model
            base = [p for p in params if not p.requires_grad]
            if self.mode == "full":
                self._sampled_params.append(params)
                self._unsampled_params.append([])
            elif self.mode == "adapter":
                self._sampled_params.append(adapter)
                self._unsampled_params.append([])
            else:
                self._sampled_params.append(base)
                self._unsampled_params.append(adapter)
        adapters = self._unsampled_params if self.mode == "hybrid" else self._sampled_params
        if self.mode != "full" and not any(adapters):
            raise ValueError(
                f"LisaCallback(mode={self.mode!r}): no trainable adapter parameters in the blocks; this mode needs a "
                "PEFT model (or use mode='full')."
            )
        if self.mode == "hybrid" and not any(self._sampled_params):
            raise ValueError("LisaCallback(mode='hybrid'): every block parameter is already trainable, so there are "
                             "no base weights to tell from adapter weights; wrap the model in PEFT first.")
        if self.mode != "adapter":
            frozen_quantized = [self._names[id(p)] for ps in self._sampled_params for p in ps
                                if not p.is_floating_point()]
            if frozen_quantized:
                raise ValueError(
                    f"LisaCallback(mode={self.mode!r}) trains the base weights of sampled blocks, but "
                    f"{frozen_quantized[0]} is not a floating-point tensor (quantized?); use mode='adapter'."
                )
        in_blocks = {id(p) for block in layers for p in block.parameters()}
        self._always_params: Dict[str, nn.Parameter] = {}
        if self.mode != "adapter":
            for name, p in self.model.named_parameters():
                if id(p) not in in_blocks and any(pat in name for pat in self.always_train):
                    self._always_params[name] = p
        self._setup_done = True

    def candidate_parameters(self) -> List[nn.Parameter]:
        """Every parameter this callback can switch on (each once): what the optimizer must hold."""
        self._setup()
        groups = [list(self._always_params.values())] + self._sampled_params + self._unsampled_params
        return _unique(p for ps in groups for p in ps)

    def prepare(self) -> None:
        """Make every candidate parameter trainable, so that an optimizer built next from the parameters that require
        grad (``Trainer``'s default) holds all of them. The first switch then freezes what is not active."""
        for p in self.candidate_parameters():
            p.requires_grad_(True)

    def _check_optimizer(self, optimizer) -> None:
        opt = _unwrap_optimizer(optimizer)
        groups = getattr(opt, "param_groups", None)
        if not groups:
            return
        held = {id(p) for g in groups for p in g["params"]}
        if not held & {id(p) for p in self.model.parameters()}:
            return  # holds copies (e.g. DeepSpeed's flattened partitions): nothing to compare with
        missing = [self._names[id(p)] for p in self.candidate_parameters() if id(p) not in held]
        if missing:
            raise ValueError(
                f"LisaCallback(mode={self.mode!r}): {len(missing)} parameters that LISA switches on are not in the "
                f"optimizer, so they would get gradients and never update (e.g. {missing[:3]}). Build the optimizer "
                "over peft_ext.callbacks.lisa.lisa_parameters(model, mode=...), or let Trainer build its default "
                "optimizer with this callback in callbacks=[...]."
            )

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
    def _switch(self, params, on: bool, optimizer) -> None:
        for p in params:
            p.requires_grad_(on)
            if not on and self.reset_state:
                p.grad = None
                if optimizer is not None:
                    optimizer.state.pop(p, None)

    def _set_active(self, active: List[int], optimizer) -> None:
        optimizer = _unwrap_optimizer(optimizer)
        active_set = set(active)
        for p in self._always_params.values():
            p.requires_grad_(True)
        for idx in range(self.total_layers):
            on = idx in active_set
            # switch off first: in hybrid mode a block's two lists never overlap, but be safe for shared weights
            self._switch(self._unsampled_params[idx] if on else self._sampled_params[idx], False, optimizer)
        for idx in range(self.total_layers):
            on = idx in active_set
            self._switch(self._sampled_params[idx] if on else self._unsampled_params[idx], True, optimizer)
        self.active_layers = sorted(active_set)

    def step(self, global_step: Optional[int] = None, optimizer=None) -> List[int]:
        """Apply the active blocks of optimizer step ``global_step`` (default: a counter of the calls) and return them.

        Switches only when the step enters a new interval (``global_step // K`` changed, which includes step 0 and the
        first step of a resumed run). ``optimizer`` (or the one given before) is checked to hold every parameter
        LISA can switch on (once) and is cleaned of switched-off parameters (``reset_state``).
        """
        self._setup()
        if optimizer is not None:
            self.optimizer = optimizer
        if self.optimizer is not None and not self._optimizer_checked:
            self._check_optimizer(self.optimizer)
            self._optimizer_checked = True
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
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """End of ``Trainer.__init__``: without a user optimizer, make every candidate parameter trainable so that
        the optimizer ``train()`` builds (and DDP's wrapper) hold all of them."""
        if self.model is None:
            self.model = model
        if optimizer is None and self.model is not None:
            self.prepare()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Remember model and optimizer; refuse DDP without ``find_unused_parameters``."""
        if self.model is None:
            self.model = model
        if optimizer is not None:
            self.optimizer = optimizer
        if args is not None and getattr(args, "world_size", 1) > 1 and args.ddp_find_unused_parameters is False:
            raise ValueError(
                "LisaCallback freezes blocks between steps, so under DDP some parameters get no gradient: "
                "TrainingArguments.ddp_find_unused_parameters must not be False (use True or leave it None)."
            )

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        """Switch blocks at the start of every optimizer step that begins a new interval."""
        self.step(state.global_step, optimizer=optimizer)


def lisa_parameters(model: nn.Module, mode: Optional[str] = None, layers_attr: Optional[str] = None,
                    always_train: Sequence[str] = ("embed", "lm_head", "norm")) -> List[nn.Parameter]:
    """Every parameter a :class:`LisaCallback` with these settings can switch on: build the optimizer over these.

    Call it before training (on a PEFT model, while only the adapters require grad: that is how adapter weights are
    told from base weights). Example: ``torch.optim.AdamW(lisa_parameters(model, mode="hybrid"), lr=...)``.

    LISA paper: https://arxiv.org/abs/2403.17919; official code https://github.com/OptimalScale/LMFlow.
    """
    return LisaCallback(model, n_layers=1, layers_attr=layers_attr, always_train=always_train,
                        mode=mode).candidate_parameters()
