"""Routing helpers shared by the routed tuners (MoLA, SMoRA, LoRA-Mixer, gated LoRA, prompt-aware LoRA, O3).

Per-call inputs (``route_ids=``, ``modality=``, ``gate=``, ``ood_weight=``) reach the layers through
``ExtModel._enable_peft_forward_hooks`` (see ``base.py``): a tuner model lists them in ``call_args`` and each layer
reads ``self.call_inputs[name]``. Auxiliary losses are recorded with ``layer.record_aux_loss(weighted_value)`` and
added to ``outputs.loss`` when labels are given. This module holds what the routed methods compute alike: input
validation that names the argument, top-k routing, the Switch/Mixtral load-balancing loss (used by MoLA,
arXiv 2402.08562, official code https://github.com/GCYZSL/MoLA), and per-expert load statistics.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def check_route_input(
    name: str,
    value: Optional[torch.Tensor],
    x: torch.Tensor,
    *,
    kind: str,
    per_sample_ok: bool = False,
) -> Optional[torch.Tensor]:
    """Validate a per-call routing input against the layer input ``x`` (``[..., tokens, features]``).

    ``kind`` is ``"int"`` (route ids), ``"bool"`` (masks; integer 0/1 accepted) or ``"float"`` (gates / weights).
    The value must have ``x``'s leading shape (one entry per token), or with ``per_sample_ok`` one entry per sample
    (shape ``[batch]``) or a Python / 0-d scalar. Returns the value on ``x``'s device, broadcastable to
    ``x.shape[:-1]``; raises a ValueError naming ``name`` otherwise.

    Used by LoRA-Mixer (https://arxiv.org/abs/2507.00029, code https://github.com/hustcselwb/LoRA-Mixer), gated LoRA
    (https://arxiv.org/abs/2507.11851, no public code), O3 (https://arxiv.org/abs/2407.10223, code
    https://github.com/GCYZSL/O3-LLM-UNLEARNING) and prompt-aware LoRA (https://arxiv.org/abs/2404.00656, code
    https://github.com/microsoft/SpeechT5).
    """
    if value is None:
        return None
    token_shape = tuple(x.shape[:-1])
    if not isinstance(value, torch.Tensor):
        if per_sample_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(value if kind == "int" else float(value))
        else:
            raise ValueError(f"{name} must be a torch.Tensor of shape {token_shape}; got {type(value).__name__}.")
    if kind == "int":
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be an integer tensor (torch.long); got dtype {value.dtype}.")
    elif kind == "bool":
        if value.dtype.is_floating_point or value.is_complex():
            raise ValueError(f"{name} must be a bool or 0/1 integer tensor; got dtype {value.dtype}.")
        if value.dtype != torch.bool:
            if ((value != 0) & (value != 1)).any():
                raise ValueError(f"{name} must only hold 0 and 1; got values {value.unique().tolist()[:8]}.")
            value = value.bool()
    elif kind == "float":
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a real-valued tensor; got dtype {value.dtype}.")
        value = value.float()
    else:  # pragma: no cover - programming error
        raise ValueError(f"kind must be 'int', 'bool' or 'float'; got {kind!r}.")
    shape = tuple(value.shape)
    if shape == token_shape:
        return value.to(x.device)
    if per_sample_ok and value.dim() == 0:
        return value.to(x.device)
    if per_sample_ok and value.dim() == 1 and len(token_shape) >= 1 and shape[0] == token_shape[0]:
        return value.to(x.device).view(shape[0], *([1] * (len(token_shape) - 1)))
    allowed = f"{token_shape} (one entry per token)"
    if per_sample_ok:
        allowed += f", ({token_shape[0] if token_shape else 1},) (one per sample) or a scalar"
    raise ValueError(f"{name} must have shape {allowed} to match this layer's input; got shape {shape}.")


def topk_route(
    logits: torch.Tensor, k: int, renormalize: bool = True, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k softmax routing in fp32.

    Returns ``(weights, mask, probs)``, each ``[..., E]``: ``probs = softmax(logits / temperature)``; ``mask`` is 1 on
    the k selected experts; ``weights`` are the selected probabilities, renormalised to sum to 1 over the selection
    when ``renormalize`` (MoLA, Mixtral), zero elsewhere. With k = E and renormalisation the weights equal ``probs``.
    Note that top-1 with renormalisation gives weight 1 and no task-loss gradient to the router.

    Used by MoLA (https://arxiv.org/abs/2402.08562, code https://github.com/GCYZSL/MoLA) and LoRA-Mixer
    (https://arxiv.org/abs/2507.00029, code https://github.com/hustcselwb/LoRA-Mixer).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    num_experts = probs.shape[-1]
    if k >= num_experts:
        mask = torch.ones_like(probs)
        return probs, mask, probs
    top_p, top_i = probs.topk(k, dim=-1)
    if renormalize:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_p)
    mask = torch.zeros_like(probs).scatter(-1, top_i, 1.0)
    return weights, mask, probs


def load_balance_loss(probs: torch.Tensor, mask: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Switch-Transformer / Mixtral load-balancing loss ``E · Σ_e f_e · P̄_e`` (as MoLA uses it).

    ``probs`` and ``mask`` are ``[..., E]``; ``f_e`` is the mean over tokens of ``mask[..., e]`` (the fraction of
    routing slots that pick e, summing to k) and ``P̄_e`` the mean router probability. ``token_mask`` (``[...]``,
    bool) leaves out padding. The minimum, for uniform routing, is k.

    Used by MoLA (https://arxiv.org/abs/2402.08562, code https://github.com/GCYZSL/MoLA) and LoRA-Mixer
    (https://arxiv.org/abs/2507.00029, code https://github.com/hustcselwb/LoRA-Mixer).
    """
    probs = probs.reshape(-1, probs.shape[-1]).float()
    mask = mask.reshape(-1, mask.shape[-1]).float()
    if token_mask is not None:
        keep = token_mask.reshape(-1).bool()
        probs, mask = probs[keep], mask[keep]
    if probs.shape[0] == 0:
        return probs.sum()
    num_experts = probs.shape[-1]
    return num_experts * (mask.mean(dim=0) * probs.mean(dim=0)).sum()


def expert_load(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of routing slots each expert received in this forward (``[E]``, detached, sums to k).

    Used by MoLA (https://arxiv.org/abs/2402.08562, code https://github.com/GCYZSL/MoLA) and LoRA-Mixer
    (https://arxiv.org/abs/2507.00029, code https://github.com/hustcselwb/LoRA-Mixer).
    """
    return mask.detach().reshape(-1, mask.shape[-1]).float().mean(dim=0)


def routing_statistics(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer expert load of the last forward: ``{module name: {adapter: load [E]}}``.

    Reads ``last_load`` (a dict adapter -> tensor) from every module that has one, i.e. the routed tuner layers.
    Useful for logging and for plotting expert load per depth.

    For MoLA (https://arxiv.org/abs/2402.08562, code https://github.com/GCYZSL/MoLA), LoRA-Mixer
    (https://arxiv.org/abs/2507.00029, code https://github.com/hustcselwb/LoRA-Mixer) and SMoRA
    (https://arxiv.org/abs/2501.15103, no public code) layers.
    """
    stats = {}
    for name, module in model.named_modules():
        load = getattr(module, "last_load", None)
        if isinstance(load, dict) and load:
            stats[name] = {k: v for k, v in load.items()}
    return stats
