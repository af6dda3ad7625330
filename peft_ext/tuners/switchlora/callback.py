"""SwitchLoRA switching: before each optimizer step, switch a scheduled number of LoRA vectors with candidates, reset
the partners' Adam state and keep them frozen for a few steps.

Paper: *SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information* (https://arxiv.org/abs/2406.06564).
Official code: https://github.com/asfsdsf/SwitchLoRA (``switchlora/switch_lora.py``: ``switch_lora``,
``_get_switch_rate``, ``_get_switch_replace_num``, ``zero_lora_states``, ``correct_switched_lora``).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback

from ... import fsdp
from .layer import SwitchLoraLayer
from .optim import SwitchLoraAdamW

_AGE_KEY = "switchlora_step"  # per-vector step counts kept in a stock Adam/AdamW state


def switch_rate(step: int, descent_steps: float, base: float = 0.3) -> float:
    """The paper's switching frequency factor ``base^((step+1)/descent_steps)`` (floored at 1e-8 like the official
    ``_get_switch_rate``): 1 at the start, ``base`` at ``step + 1 = descent_steps``."""
    return max(base ** ((step + 1) / descent_steps), 1e-8)


def switch_interval(step: int, max_steps: int, interval: float = 40.0, descent_rate: float = 0.1,
                    base: float = 0.3, fixed: bool = False) -> float:
    """Steps per full replacement of the r vectors at optimizer step ``step``:
    ``interval / base^((step+1)/T_d)`` with ``T_d = descent_rate·max_steps`` (``interval`` itself when ``fixed``)."""
    if fixed:
        return float(interval)
    return interval / switch_rate(step, descent_rate * max_steps, base)


def _inner_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _is_adam(optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, SwitchLoraAdamW))


def _fill_vectors(tensor: torch.Tensor, dim: int, positions: torch.Tensor) -> None:
    """Zero the rows (``dim`` 0) or columns (``dim`` 1) ``positions`` of ``tensor``: of this rank's shard under FSDP2
    (rows it holds, shifted to local indices), of the whole tensor otherwise."""
    local, rows = fsdp.local_shard(tensor)
    positions = positions.to(local.device)
    if dim == 0:
        positions = positions[(positions >= rows.start) & (positions < rows.stop)] - rows.start
    local.index_fill_(dim, positions, 0)


class SwitchLoraCallback(TrainerCallback):
    """Drives SwitchLoRA switching.

    With ``transformers.Trainer``: ``Trainer(..., callbacks=[SwitchLoraCallback(model)])``; it acts in
    ``on_pre_optimizer_step`` (after backward and gradient clipping, before ``optimizer.step()``), once per optimizer
    step. In a hand-written loop: ``cb = SwitchLoraCallback(model)`` and ``cb.step(optimizer, global_step, max_steps)``
    right before each ``optimizer.step()``.

    Each step, on every SwitchLoRA layer of the adapter: ``k`` = stochastic rounding of ``r / interval`` (see
    ``switch_interval``; schedule constants from the adapter's config), capped by the layer's ``available_switches``;
    ``layer.switch(adapter, k)`` swaps k rows of A and k columns of B (output unchanged); the partners' optimizer
    state (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, and the step count) is zeroed; then the gradients of all
    frozen vectors are zeroed (frozen for ``adam_warm_step`` steps, the switch step included).

    Optimizers: ``peft_ext.optim.switchlora.SwitchLoraAdamW`` keeps a step count per vector (the official
    ``StepAdamW``); its per-vector step is zeroed. Stock ``torch.optim.AdamW`` / ``Adam`` (what ``Trainer`` builds,
    foreach or fused) have one step count ``t`` per tensor: the callback keeps per-vector counts ``k`` in the
    optimizer state (key ``"switchlora_step"``, saved with the optimizer checkpoint; cast to the parameter dtype on
    reload by torch) and, in a step post-hook on the optimizer, adds ``lr·(u(t) − u(k))`` to A and B with
    ``u(c) = (m/(1−β1^c)) / (√(v/(1−β2^c)) + eps)``: the update becomes the per-vector one (up to float rounding)
    instead of ≈ ``(1−β1)/√(1−β2)·lr`` ≈ 3.2·lr on the first step after a reset. Any other optimizer is refused
    while ``reset_optimizer_state`` is True (set it False in the config to switch without resets).

    Args:
        model: the model holding SwitchLoRA layers; taken from the Trainer when omitted.
        seed: seed of the stochastic rounding of the number of switches; the draw of step t is a function of
            (seed, t) alone (a local generator; the global RNG is left alone), so resumed runs switch the same.
        adapter_name: the SwitchLoRA adapter to switch (default: each layer's active adapters).
        max_steps: total optimizer steps T of the schedule; by default the Trainer's ``state.max_steps`` or the
            ``max_steps`` given to ``step``."""

    def __init__(self, model: Optional[nn.Module] = None, seed: int = 0, adapter_name: Optional[str] = None,
                 max_steps: Optional[int] = None):
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"SwitchLoraCallback.max_steps must be None or an integer >= 1; got {max_steps!r}.")
        self.model = model
        self.seed = int(seed)
        self.adapter_name = adapter_name
        self.max_steps = max_steps
        self.num_steps = 0  # optimizer steps seen through step() without a global_step
        self.last_switched = 0  # vectors (A-rows + B-columns) switched by the last step()
        self._vector_dims: dict[int, tuple[torch.Tensor, int]] = {}
        self._hooked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._young: dict[int, tuple] = {}  # id(param) -> (weakref, whether some vector was reset)

    # ------------------------------------------------------------------ helpers
    def _pairs(self) -> list[tuple[SwitchLoraLayer, str]]:
        if self.model is None:
            raise ValueError("SwitchLoraCallback needs the model: pass it to the constructor.")
        pairs = []
        for layer in (m for m in self.model.modules() if isinstance(m, SwitchLoraLayer)):
            names = [self.adapter_name] if self.adapter_name else list(layer.active_adapters)
            pairs.extend((layer, name) for name in names if name in layer.switchlora_track)
        if not pairs:
            raise ValueError("SwitchLoraCallback: the model has no SwitchLoRA layers"
                             + (f" with adapter {self.adapter_name!r}." if self.adapter_name else "."))
        return pairs

    def replace_counts(self, pairs, global_step: int, max_steps: int) -> list[int]:
        """Number of vectors of each kind to switch at ``global_step`` on each (layer, adapter) of ``pairs``:
        stochastic rounding of ``r / interval`` with uniforms drawn from (seed, global_step), before capping."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(global_step))
        uniforms = torch.rand(len(pairs), generator=gen, dtype=torch.float64).tolist()
        counts = []
        for (layer, name), u in zip(pairs, uniforms):
            sched = layer.schedule[name]
            interval = switch_interval(global_step, max_steps, sched["switch_interval"],
                                       sched["switch_descent_rate"], sched["switch_rate_base"],
                                       sched["fixed_interval"])
            if interval < 2 * sched["adam_warm_step"]:
                raise RuntimeError(f"SwitchLoRA switch interval {interval} < 2·adam_warm_step; a partner would switch "
                                   "while frozen.")
            exact = layer.r[name] / interval
            whole = int(exact)
            counts.append(whole + (1 if u < exact - whole else 0))
        return counts

    # ------------------------------------------------------------------ optimizer state
    def _reset(self, optimizer, param: torch.Tensor, dim: int, positions: torch.Tensor) -> None:
        """Zero the Adam state of the vectors ``positions`` of ``param`` (rows if dim == 0, columns if dim == 1)."""
        state = optimizer.state.get(param)
        if not state:
            return  # no state yet: the first step starts every vector fresh anyway
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                _fill_vectors(state[key], dim, positions)
        step = state.get("step")
        if torch.is_tensor(step) and step.dim() == 2:  # SwitchLoraAdamW: per-vector steps
            _fill_vectors(step, dim, positions)
            return
        ages = state.get(_AGE_KEY)
        if ages is None:
            t = float(step) if step is not None else 0.0
            shape = (param.shape[0], 1) if dim == 0 else (1, param.shape[1])
            ages = state[_AGE_KEY] = torch.full(shape, t, dtype=torch.float32, device=param.device)
        ages.index_fill_(dim, positions.to(ages.device), 0)
        self._young[id(param)] = (weakref.ref(param), True)

    def _ensure_hook(self, optimizer) -> None:
        if optimizer in self._hooked:
            return
        self_ref = weakref.ref(self)

        def hook(opt, args, kwargs):
            cb = self_ref()
            if cb is not None:
                cb._correct_bias(opt)

        self._hooked[optimizer] = optimizer.register_step_post_hook(hook)

    def _is_young(self, p: torch.Tensor, ages: torch.Tensor, t: float) -> bool:
        """Whether some vector of ``p`` counts other steps than the tensor (known from resets; checked once after a
        reload)."""
        known = self._young.get(id(p))
        if known is None or known[0]() is not p:
            known = self._young[id(p)] = (weakref.ref(p), bool((ages != t).any()))
        return known[1]

    @torch.no_grad()
    def _correct_bias(self, optimizer) -> None:
        """After a stock Adam/AdamW step: count one step for every tracked vector and replace the tensor-step update
        ``u(t)`` of the tensors that hold reset vectors by the per-vector one ``u(k)``, batched with foreach ops.
        Both use identical arithmetic, so vectors whose count equals the tensor's get exactly zero correction."""
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            params, exp_avgs, sq_avgs, ages_list, steps = [], [], [], [], []
            for p in group["params"]:
                entry = self._vector_dims.get(id(p))
                if entry is None or entry[0] is not p or p.grad is None:
                    continue
                state = optimizer.state.get(p)
                if not state or "step" not in state:
                    continue
                step = state["step"]
                if torch.is_tensor(step) and step.dim() == 2:
                    continue  # native per-vector steps
                t = float(step)
                ages = state.get(_AGE_KEY)
                if ages is None:
                    shape = (p.shape[0], 1) if entry[1] == 0 else (1, p.shape[1])
                    state[_AGE_KEY] = torch.full(shape, t, dtype=torch.float32, device=p.device)
                    continue
                if ages.dtype != torch.float32:  # torch casts optimizer state to the parameter dtype on reload
                    ages = state[_AGE_KEY] = ages.float()
                ages.add_(1)
                if not self._is_young(p, ages, t):
                    continue
                # FSDP2: this rank's rows of the parameter and its Adam state (all rows without FSDP)
                local, rows = fsdp.local_shard(p)
                params.append(local)
                exp_avgs.append(fsdp.local_shard(state["exp_avg"])[0])
                sq = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
                sq_avgs.append(fsdp.local_shard(sq)[0])
                ages_list.append(ages[rows] if entry[1] == 0 else ages)
                steps.append(t)
            if not params:
                continue
            sqrt_v = torch._foreach_sqrt(sq_avgs)
            eps = group["eps"]

            def update(counts: list) -> list:
                bias1 = torch._foreach_pow(beta1, counts)
                torch._foreach_mul_(bias1, -1.0)
                torch._foreach_add_(bias1, 1.0)
                bias2 = torch._foreach_pow(beta2, counts)
                torch._foreach_mul_(bias2, -1.0)
                torch._foreach_add_(bias2, 1.0)
                torch._foreach_sqrt_(bias2)
                denom = torch._foreach_div(sqrt_v, bias2)
                torch._foreach_add_(denom, eps)
                return torch._foreach_div(torch._foreach_div(exp_avgs, bias1), denom)

            tensor_steps = torch._foreach_add(torch._foreach_mul(ages_list, 0.0), steps)
            diff = torch._foreach_sub(update(tensor_steps), update(ages_list))
            torch._foreach_mul_(diff, float(group["lr"]))
            torch._foreach_add_(params, [d.to(p.dtype) for d, p in zip(diff, params)])

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, optimizer=None, global_step: Optional[int] = None, max_steps: Optional[int] = None) -> int:
        """Switch, reset partners' optimizer state and freeze, for the optimizer step ``global_step`` (0-based; the
        Trainer passes ``state.global_step``; default: a counter of the calls) of ``max_steps``. Call it after
        backward and before ``optimizer.step()``. Returns the number of vectors switched (A-rows + B-columns)."""
        pairs = self._pairs()
        if global_step is None:
            global_step = self.num_steps
        self.num_steps = global_step + 1
        total = max_steps if max_steps is not None and max_steps > 0 else self.max_steps
        needs_schedule = any(not layer.schedule[name]["fixed_interval"] for layer, name in pairs)
        if needs_schedule and (total is None or total <= 0):
            raise ValueError("SwitchLoraCallback.step needs max_steps (the total optimizer steps of the schedule): "
                             "pass it to step() or to the constructor.")
        opt = _inner_optimizer(optimizer) if optimizer is not None else None
        resets = any(layer.schedule[name]["reset_optimizer_state"] for layer, name in pairs)
        if resets and opt is None:
            raise ValueError("SwitchLoraCallback.step needs the optimizer to reset the partners' Adam state; pass it, "
                             "or set SwitchLoraConfig.reset_optimizer_state=False.")
        if resets and not _is_adam(opt):
            raise TypeError(f"SwitchLoraCallback resets Adam state, but the optimizer is {type(opt).__name__}; use "
                            "torch.optim.AdamW / Adam or peft_ext.optim.switchlora.SwitchLoraAdamW, or set "
                            "SwitchLoraConfig.reset_optimizer_state=False.")
        self._vector_dims = {}
        for layer, name in pairs:
            A, B, _ = layer.lora_factors(name)
            self._vector_dims[id(A)] = (A, 0)
            self._vector_dims[id(B)] = (B, 1)
        if resets:
            self._ensure_hook(opt)

        counts = self.replace_counts(pairs, global_step, total or 1)
        switched = 0
        for (layer, name), count in zip(pairs, counts):
            num = min(count, layer.available_switches(name))
            if num > 0:
                rows_a, cols_b = layer.switch(name, num)
                switched += 2 * num
                if layer.schedule[name]["reset_optimizer_state"]:
                    A, B, _ = layer.lora_factors(name)
                    self._reset(opt, B, 1, rows_a)  # partners of the switched A-rows: B-columns
                    self._reset(opt, A, 0, cols_b)  # partners of the switched B-columns: A-rows
            layer.freeze_gradients(name)
        self.last_switched = switched
        return switched

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.model is None:
            self.model = model
        for layer, name in self._pairs():  # the Trainer moved the model (banks included) to its device
            layer.place_bank(name)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.model is None:
            self.model = model
        self.step(optimizer, state.global_step, state.max_steps)
