"""``SwitchLoraAdamW``: AdamW with one step count per row of A and per column of B, as SwitchLoRA's official optimizer.

Paper: *SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information* (https://arxiv.org/abs/2406.06564).
Official code: https://github.com/asfsdsf/SwitchLoRA (``switchlora/optimizer.py``, ``StepAdamW``).

When SwitchLoRA switches a vector it resets the Adam state of its partner, step count included. With a per-vector
step the partner's bias correction restarts from 1 like a fresh parameter's; a stock ``torch.optim.AdamW`` has one step
count per tensor, and its first update after a reset would be ``(1−β1)/√(1−β2)`` ≈ 3.2 times the learning rate.
``SwitchLoraCallback`` corrects stock Adam/AdamW to the same updates (see its docstring); this optimizer is the
direct implementation.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .layer import SwitchLoraLayer

_VECTOR_DIMS = (None, 0, 1)


class SwitchLoraAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, Loshchilov & Hutter) whose step count, and so bias correction, is kept per row
    (param group ``vector_dim=0``: shape (rows, 1), SwitchLoRA's A) or per column (``vector_dim=1``: shape (1, cols),
    SwitchLoRA's B); other groups (``vector_dim`` absent or None) keep one step count per tensor and behave exactly
    like ``torch.optim.AdamW``.

    Build it with ``create_switchlora_optimizer(model, lr=...)``, which puts every SwitchLoRA A in a ``vector_dim=0``
    group and every B in a ``vector_dim=1`` group; then ``Trainer(..., optimizers=(optimizer, None),
    callbacks=[SwitchLoraCallback(model)])``.

    Difference from the official ``StepAdamW``: a single-tensor loop (no foreach kernels) and amsgrad / maximize
    supported; the arithmetic per element is the same."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
    ):
        if not lr >= 0:
            raise ValueError(f"SwitchLoraAdamW.lr must be >= 0; got {lr!r}.")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"SwitchLoraAdamW.betas must lie in [0, 1); got {betas!r}.")
        if not eps >= 0:
            raise ValueError(f"SwitchLoraAdamW.eps must be >= 0; got {eps!r}.")
        if not weight_decay >= 0:
            raise ValueError(f"SwitchLoraAdamW.weight_decay must be >= 0; got {weight_decay!r}.")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        vector_dim=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["vector_dim"] not in _VECTOR_DIMS:
                raise ValueError(f"SwitchLoraAdamW param group vector_dim must be None, 0 or 1; got "
                                 f"{group['vector_dim']!r}.")
            if group["vector_dim"] is not None and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("SwitchLoraAdamW: a param group with vector_dim set may only hold 2-D tensors.")

    @staticmethod
    def _step_shape(p: torch.Tensor, vector_dim: Optional[int]) -> tuple:
        if vector_dim is None:
            return ()
        return (p.shape[0], 1) if vector_dim == 0 else (1, p.shape[1])

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step; the bias corrections ``1 − β^k`` use each vector's own step count k."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SwitchLoraAdamW does not support sparse gradients.")
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    shape = self._step_shape(p, group["vector_dim"])
                    state["step"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                step = state["step"]
                step.add_(1)
                p.mul_(1 - lr * wd)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                bias1 = 1 - torch.pow(beta1, step)
                bias2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
                denom = (second.sqrt() / bias2_sqrt).add_(eps)
                p.addcdiv_(exp_avg / bias1, denom, value=-lr)
        return loss


def create_switchlora_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    adapter_name: Optional[str] = None,
    **kwargs,
) -> SwitchLoraAdamW:
    """A ``SwitchLoraAdamW`` over the trainable parameters of ``model``: SwitchLoRA A matrices with per-row steps,
    B matrices with per-column steps, everything else (embeddings, norms, head trained in pre-training) per tensor.

     ``adapter_name``: whose A / B get per-vector steps (default: all).
    For ``transformers.Trainer``: ``optimizers=(create_switchlora_optimizer(model, lr=...), None)``."""
    rows, cols = {}, {}
    for layer in (m for m in model.modules() if isinstance(m, SwitchLoraLayer)):
        for name in layer.switchlora_down:
            if adapter_name is None or name == adapter_name:
                A, B, _ = layer.lora_factors(name)
                rows[id(A)], cols[id(B)] = A, B
    if not rows:
        raise ValueError("create_switchlora_optimizer: the model has no SwitchLoRA layers"
                         + (f" with adapter {adapter_name!r}." if adapter_name else "."))
    others = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in rows and id(p) not in cols:
            others.append(p)
    groups = [
        {"params": [p for p in rows.values() if p.requires_grad], "vector_dim": 0},
        {"params": [p for p in cols.values() if p.requires_grad], "vector_dim": 1},
        {"params": others, "vector_dim": None},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("create_switchlora_optimizer: the model has no trainable parameters.")
    return SwitchLoraAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


__all__ = ["SwitchLoraAdamW", "create_switchlora_optimizer"]
