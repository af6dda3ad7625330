"""ALLoRA: AdamW on LoRA gradients rescaled row by row by an adaptive, norm-dependent coefficient.

Paper: *ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws* (https://arxiv.org/abs/2410.09692). No official code
is public. The paper's recipe: no dropout, no scaling (``lora_alpha == r`` so ``s = 1``), ``B = 0`` at init, and the
gradient of each LoRA parameter row ``θ_i`` multiplied by a coefficient inversely proportional to its ℓ2 norm.

Formula used here (UNCERTAIN, an unverified reading of the paper)::

    c_i = 1 / sqrt(‖θ_i‖² + 1/η²)

so ``c_i = η`` at a zero row and ``c_i ≈ 1/‖θ_i‖`` once ``‖θ_i‖ ≫ 1/η``. ``c`` is recomputed from the current
parameters at every step (third-party "Automagic" optimizers freeze it at state init and use the mean over rows of an
unsquared variant; we do not).

Where ``c`` enters (``apply_to``):

* ``"grad"`` (default, the paper's definition: the abstract scales "the per sample and per parameter gradients with a
  coefficient inversely proportional to parameters' ℓ2 norm"): AdamW runs on ``c ⊙ grad``. Adam divides each
  coordinate by the running RMS of its own gradients, so a factor that stayed constant over time would cancel (up to
  ``eps``): a zero-initialised ``B`` does *not* take η-times larger steps at the start — its first Adam step is the
  plain one. ``c`` acts only through its change over time: as a row's norm grows, ``c`` shrinks and the row's steps
  become smaller than plain Adam's, relative to its gradient history.
* ``"update"`` (the title's "adaptive learning rate" read under Adam): AdamW's whole step of the row (its Adam update
  and decoupled weight decay) is multiplied by ``c_i``, i.e. the row's learning rate is ``lr·c_i``. Here a zero row
  does step η-times further than plain AdamW. Under plain SGD the two readings coincide.

Which axis is a "row" of ``A`` and of ``B`` is UNCERTAIN too: ``row_dim`` picks it (default ``0`` for both, i.e. a row
is ``weight[i, :]``: one rank component of ``A`` (r × in), one output feature of ``B`` (out × r), the usual matrix
convention ``ΔW = B A``); ``row_dim=None`` treats the whole tensor as a single θ.

"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn

__all__ = ["ALLoRA", "allora_multiplier", "allora_lora_config", "create_allora_optimizer", "is_lora_param_name"]

DEFAULT_ETA = 2.0
APPLY_TO = ("grad", "update")
# lora_A / lora_B (Linear, Conv) and lora_embedding_A / lora_embedding_B (Embedding) of PEFT's LoRA layers.
LORA_PARAM_PATTERN = r"(^|\.)lora_(embedding_)?[AB](\.|$)"

RowDim = Union[None, int, Dict[str, Optional[int]]]


def is_lora_param_name(name: str, pattern: str = LORA_PARAM_PATTERN) -> bool:
    """Whether a parameter name (from ``named_parameters``) is a LoRA ``A``/``B`` factor.

    ALLoRA paper: https://arxiv.org/abs/2410.09692; no public code.
    """
    return re.search(pattern, name) is not None


def allora_multiplier(param: torch.Tensor, eta: float = DEFAULT_ETA, row_dim: Optional[int] = 0) -> torch.Tensor:
    """ALLoRA's coefficient ``c_i = 1/sqrt(‖θ_i‖² + 1/η²)``, shaped to broadcast against ``param``.

    ``row_dim`` is the axis indexing the rows θ_i (the norm runs over every other axis); ``None``: one θ, the whole
    tensor. Computed in float32 at least.

    ALLoRA paper: https://arxiv.org/abs/2410.09692; no public code.
    """
    if eta <= 0:
        raise ValueError(f"ALLoRA eta must be > 0; got {eta!r}.")
    p = param.detach()
    p = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
    if row_dim is None or p.dim() == 0:
        sq = p.pow(2).sum()
    else:
        dims = [d for d in range(p.dim()) if d != row_dim % p.dim()]
        sq = p.pow(2).sum(dim=dims, keepdim=True) if dims else p.pow(2)
    return torch.rsqrt(sq + 1.0 / eta**2)


class ALLoRA(torch.optim.AdamW):
    """AdamW with ALLoRA's row-wise coefficient ``c_i = 1/sqrt(‖θ_i‖² + 1/η²)`` on the LoRA parameters
    (paper https://arxiv.org/abs/2410.09692; no official code).

    ``c`` is recomputed from the current parameter values before each update, for every parameter of a group with
    ``allora=True``. With ``apply_to="grad"`` (default) AdamW runs on ``c ⊙ grad``; with ``apply_to="update"`` the
    AdamW step of each row is multiplied by ``c_i`` (see the module docstring for why the two differ under Adam).
    Groups with ``allora=False`` get plain AdamW. After the step the original ``.grad`` tensors are put back untouched.

    Use :func:`create_allora_optimizer` to build it from a PEFT model (LoRA factors in an ``allora`` group, everything
    else in a plain one). Passed directly, groups without an ``allora`` key are treated as LoRA (``allora=True``).

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``. Groups may set ``allora``, ``eta`` and
            ``row_dim`` per group.
        lr, betas, eps, weight_decay, amsgrad: AdamW's, with AdamW's defaults.
        eta: η of ALLoRA (default 2, the value of third-party implementations; the paper's value is UNCERTAIN).
            ``c = η`` at a zero row.
        row_dim: axis indexing the rows θ_i (UNCERTAIN which is right for A and B): an int for all parameters, a
            dict ``{"lora_A": 0, "lora_B": 1}`` keyed by a substring of the parameter name (needs ``named`` params, see
            :func:`create_allora_optimizer`), or ``None`` for one norm per tensor. Default 0.
        apply_to: ``"grad"`` (default, the paper's gradient scaling) or ``"update"`` (``c`` as a per-row learning-rate
            factor on AdamW's step). May also be set per group.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        eta: float = DEFAULT_ETA,
        row_dim: RowDim = 0,
        amsgrad: bool = False,
        apply_to: str = "grad",
        **adamw_kwargs,
    ):
        if not eta > 0:
            raise ValueError(f"ALLoRA eta must be > 0; got {eta!r}.")
        self._allora_defaults = {"allora": True, "eta": float(eta), "row_dim": row_dim, "apply_to": apply_to}
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **adamw_kwargs
        )

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        for key, value in self._allora_defaults.items():
            param_group.setdefault(key, value)
        if not param_group["eta"] > 0:
            raise ValueError(f"ALLoRA eta must be > 0; got {param_group['eta']!r}.")
        if param_group["apply_to"] not in APPLY_TO:
            raise ValueError(f"ALLoRA apply_to must be one of {APPLY_TO}; got {param_group['apply_to']!r}.")
        super().add_param_group(param_group)

    @staticmethod
    def _row_dim_for(group: Dict[str, Any], index: int) -> Optional[int]:
        row_dim = group["row_dim"]
        if not isinstance(row_dim, dict):
            return row_dim
        names = group.get("param_names")
        if not names:
            raise ValueError("ALLoRA: a dict row_dim needs parameter names (build it with create_allora_optimizer).")
        name = names[index]
        for key, value in row_dim.items():
            if key in name:
                return value
        return 0

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        originals = []  # (param, its own .grad) for "grad"
        scaled_steps = []  # (param, value before the step, c) for "update"
        for group in self.param_groups:
            if not group["allora"]:
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                c = allora_multiplier(p, group["eta"], self._row_dim_for(group, i))
                if group.get("apply_to", "grad") == "update":
                    scaled_steps.append((p, p.detach().clone(), c))
                else:
                    originals.append((p, p.grad))
                    p.grad = (p.grad * c).to(p.grad.dtype)
        try:
            super().step()
        finally:
            for p, grad in originals:
                p.grad = grad
        for p, before, c in scaled_steps:  # p <- before + c ⊙ (AdamW's step)
            p.copy_((before + c * (p - before)).to(p.dtype))
        return loss


def create_allora_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    eta: float = DEFAULT_ETA,
    row_dim: RowDim = 0,
    lora_pattern: str = LORA_PARAM_PATTERN,
    **adamw_kwargs,
) -> ALLoRA:
    """An :class:`ALLoRA` optimizer over ``model``'s trainable parameters (``adamw_kwargs`` may set ``apply_to``).

    LoRA factors (names matching ``lora_pattern``: ``lora_A``, ``lora_B``, ``lora_embedding_A/B``) go into a group with
    ALLoRA's gradient scaling; every other trainable parameter (``modules_to_save``, biases, ...) into a plain AdamW
    group. ``adamw_kwargs`` (``betas``, ``eps``, ``weight_decay``, ...) apply to both.

    Use with ``transformers.Trainer`` as ``Trainer(..., optimizers=(create_allora_optimizer(model, lr), None))``.

    ALLoRA paper: https://arxiv.org/abs/2410.09692; no public code.
    """
    lora, lora_names, other, other_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_lora_param_name(name, lora_pattern):
            lora.append(p)
            lora_names.append(name)
        else:
            other.append(p)
            other_names.append(name)
    if not lora:
        raise ValueError("create_allora_optimizer: the model has no trainable LoRA parameters (lora_A / lora_B).")
    groups = [{"params": lora, "param_names": lora_names, "allora": True}]
    if other:
        groups.append({"params": other, "param_names": other_names, "allora": False})
    return ALLoRA(groups, lr=lr, eta=eta, row_dim=row_dim, **adamw_kwargs)


def allora_lora_config(**kwargs):
    """A ``peft.LoraConfig`` with ALLoRA's settings: ``lora_dropout=0`` and ``lora_alpha=r`` (scaling ``s = 1``), no
    rsLoRA, default init (``B = 0``). Any ``alpha_pattern`` follows ``rank_pattern`` so every layer has ``s = 1``.

    Other keyword arguments go to ``LoraConfig`` unchanged; a conflicting ``lora_dropout``, ``lora_alpha`` or
    ``use_rslora`` raises ``ValueError``.

    ALLoRA paper: https://arxiv.org/abs/2410.09692; no public code.
    """
    from peft import LoraConfig

    r = kwargs.get("r", 8)
    if kwargs.get("lora_dropout", 0.0) != 0.0:
        raise ValueError(f"ALLoRA uses no dropout; got lora_dropout={kwargs['lora_dropout']!r}.")
    if "lora_alpha" in kwargs and kwargs["lora_alpha"] != r:
        raise ValueError(f"ALLoRA uses scaling 1 (lora_alpha == r == {r}); got lora_alpha={kwargs['lora_alpha']!r}.")
    if kwargs.get("use_rslora", False):
        raise ValueError("ALLoRA uses scaling 1; use_rslora=True would make it sqrt(r).")
    if kwargs.get("alpha_pattern"):
        raise ValueError("ALLoRA sets alpha_pattern from rank_pattern (scaling 1); do not pass alpha_pattern.")
    rank_pattern = dict(kwargs.get("rank_pattern") or {})
    kwargs.update(r=r, lora_alpha=r, lora_dropout=0.0, use_rslora=False, alpha_pattern=dict(rank_pattern))
    return LoraConfig(**kwargs)
