"""Routing helpers shared by the routed tuners (MoLA, SMoRA, LoRA-Mixer, gated LoRA, prompt-aware LoRA, O3).

Per-call inputs (``route_ids=``, ``modality=``, ``gate=``, ``ood_weight=``) reach the layers through
``ExtModel._enable_peft_forward_hooks`` (see ``base.py``): a tuner model lists them in ``call_args`` and each layer
reads ``self.call_inputs[name]``. Auxiliary losses are recorded with ``layer.record_aux_loss(weighted_value)`` and
added to ``outputs.loss`` when labels are given. This module holds what the routed methods compute alike: input
validation that names the argument (types and value ranges once per call in the tuner model's hook, shapes per layer
without reading tensor values), ``TokenRoutes`` (per-token inputs under ``generate``), top-k routing, the
Switch/Mixtral load-balancing loss (used by MoLA, arXiv 2402.08562, official code https://github.com/GCYZSL/MoLA), and
per-expert load statistics.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def route_value(name: str, value, *, kind: str, per_sample_ok: bool = False) -> Optional[torch.Tensor]:
    """Type and dtype check of a per-call routing input, done once per call on the value as given.

    ``kind`` is ``"int"`` (route ids), ``"bool"`` (masks; integer 0/1 accepted and turned into bool, which reads the
    values once) or ``"float"`` (gates / weights, turned into float32). With ``per_sample_ok`` a Python number is
    accepted and becomes a 0-d tensor. Returns the converted tensor (None stays None); raises a ValueError naming
    ``name`` otherwise. Shapes are checked per layer by ``check_route_shape``; value ranges are method-specific and
    checked by the tuner model's hook (``ExtModel._check_call_inputs``).

    Used by LoRA-Mixer, gated LoRA, O3 and prompt-aware LoRA."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        if per_sample_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(value if kind == "int" else float(value))
        else:
            allowed = "one entry per token" + (", one per sample or a scalar" if per_sample_ok else "")
            raise ValueError(f"{name} must be a torch.Tensor ({allowed}); got {type(value).__name__}.")
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
    return value


def check_route_shape(
    name: str, value: Optional[torch.Tensor], x: torch.Tensor, *, per_sample_ok: bool = False
) -> Optional[torch.Tensor]:
    """Shape check of a routing input (already through ``route_value``) against the layer input ``x``
    (``[..., tokens, features]``); reads no tensor values, so it never waits for the device.

    The value must have ``x``'s leading shape (one entry per token), or with ``per_sample_ok`` one entry per sample
    (shape ``[batch]``) or a 0-d scalar. Returns it on ``x``'s device, broadcastable to ``x.shape[:-1]``; raises a
    ValueError naming ``name`` otherwise. Used by the layers of LoRA-Mixer, gated LoRA and O3."""
    if value is None:
        return None
    token_shape = tuple(x.shape[:-1])
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


def check_route_input(
    name: str,
    value,
    x: torch.Tensor,
    *,
    kind: str,
    per_sample_ok: bool = False,
) -> Optional[torch.Tensor]:
    """``route_value`` then ``check_route_shape``: validate a per-call routing input against the layer input ``x``.

    Reads tensor values only to turn a 0/1 integer mask into bool; a bool mask, an integer or a float input is
    checked from its dtype and shape alone.

    Used by LoRA-Mixer, gated LoRA, O3 and prompt-aware LoRA."""
    value = route_value(name, value, kind=kind, per_sample_ok=per_sample_ok)
    return check_route_shape(name, value, x, per_sample_ok=per_sample_ok)


def value_range(value: torch.Tensor) -> Optional[tuple]:
    """``(min, max)`` of a tensor as Python numbers with one device read, or None when it is empty. For the
    once-per-call range checks of route ids (gated LoRA, LoRA-Mixer)."""
    if value.numel() == 0:
        return None
    low, high = torch.stack([value.min(), value.max()]).tolist()
    return low, high


def current_tokens(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The token tensor of a transformers-style model call: ``input_ids`` ``[batch, tokens]`` or ``inputs_embeds``
    ``[batch, tokens, d]`` (keyword), or a positional integer ``[batch, tokens]`` tensor; None for other models.
    Used by ``TokenRoutes`` for gated LoRA and LoRA-Mixer."""
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2 and not args[0].is_floating_point():
        return args[0]
    return None


def past_length(kwargs: dict) -> int:
    """Number of positions already in the KV cache before this forward: ``cache_position[0]`` when transformers
    passes it, else the length of ``past_key_values`` (0 without a cache). Used by ``TokenRoutes`` for gated LoRA
    and LoRA-Mixer."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    past = kwargs.get("past_key_values")
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:  # legacy tuple cache: ((key [batch, heads, past, dim], value), ...)
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class TokenRoutes:
    """Forward pre-hook that fits a call's per-token route inputs to each forward of the model inside the call, so
    that ``generate`` works with them. ``ExtModel`` registers it on the base model for one ``PeftModel`` call.

    A plain forward runs the model once and the inputs pass unchanged. ``generate`` runs it once per step: first the
    prompt, then (with a KV cache) one new token at a time, or (without) the whole grown sequence. A per-token input
    ``[batch, L]`` given to the call covers the positions of the call's tokens (``L`` = the prompt length; with a
    cache passed in, ``input_ids`` from position 0 or only the uncached tokens). At each forward the absolute
    positions of the current tokens come from ``cache_position`` or the cache length (``past_length``); the hook
    takes ``route[:, positions]`` inside the given route and ``fill`` beyond it (the generated tokens): a value, or
    ``"last"`` for each sample's last given entry. When ``generate`` repeats every sample for ``num_beams`` /
    ``num_return_sequences`` (``repeat_interleave`` on dim 0), per-token and per-sample (``[batch]``) inputs are
    repeated alike. Inputs of any other shape are left as given, so the layers' shape check names them.

    ``fills`` maps the input names that follow the token axis to their fill. Used by gated LoRA (and TARA) and
    LoRA-Mixer."""

    def __init__(self, inputs: dict, fills: dict, layers: list, call_tokens: Optional[torch.Tensor]):
        self.inputs = inputs
        given = {n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() in (1, 2)}
        self.fills = {n: f for n, f in fills.items() if n in given}  # [batch, tokens] or [batch] inputs
        self.layers = layers
        self.batch = call_tokens.shape[0] if call_tokens is not None else None
        self.length = call_tokens.shape[1] if call_tokens is not None else None
        self.offset: Optional[int] = None  # absolute position of route[:, 0], fixed by the first forward
        self.fitted = False  # the layers hold fitted inputs, not the given ones
        self._repeated: dict = {}

    def __bool__(self) -> bool:
        return bool(self.fills)

    def __call__(self, module, args, kwargs):
        tokens = current_tokens(args, kwargs)
        if tokens is None:
            return None
        batch, n = tokens.shape[0], tokens.shape[1]
        past = past_length(kwargs)
        if self.offset is None:  # the first forward of the call sees the call's tokens (or their uncached part)
            self.batch = self.batch or batch
            self.length = self.length or n
            self.offset = past + n - self.length
        start = past - self.offset
        repeat = batch // self.batch if batch % self.batch == 0 else 0
        if start == 0 and n == self.length and repeat == 1:
            if self.fitted:
                self._hand_over(self.inputs)
            return None
        fitted = {}
        for name, fill in self.fills.items():
            value = self.inputs[name]
            if value.shape[0] != self.batch or (value.dim() == 2 and value.shape[1] != self.length) or not repeat:
                continue  # not this call's [batch, tokens] / [batch]: left to the layers' shape check
            if repeat > 1:
                key = (name, repeat)
                if key not in self._repeated:
                    self._repeated[key] = value.repeat_interleave(repeat, dim=0)
                value = self._repeated[key]
            if value.dim() == 2:
                value = _take_positions(value, start, n, fill)
            fitted[name] = value
        if fitted:
            self._hand_over({**self.inputs, **fitted})
        return None

    def _hand_over(self, inputs: dict) -> None:
        for layer in self.layers:
            layer.call_inputs = inputs
        self.fitted = inputs is not self.inputs


def _take_positions(route: torch.Tensor, start: int, n: int, fill) -> torch.Tensor:
    """Columns ``start .. start + n - 1`` of ``route`` ``[batch, L]``; columns at or beyond ``L`` take ``fill``."""
    length = route.shape[1]
    inside = route[:, max(start, 0) : min(start + n, length)]
    extra = n - inside.shape[1]
    if extra <= 0:
        return inside
    if fill == "last":
        column = route[:, length - 1 :]
    else:
        column = torch.full((route.shape[0], 1), fill, dtype=route.dtype, device=route.device)
    return torch.cat([inside, column.expand(-1, extra)], dim=1)


def topk_route(
    logits: torch.Tensor, k: int, renormalize: bool = True, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k softmax routing in fp32.

    Returns ``(weights, mask, probs)``, each ``[..., E]``: ``probs = softmax(logits / temperature)``; ``mask`` is 1 on
    the k selected experts; ``weights`` are the selected probabilities, renormalised to sum to 1 over the selection
    when ``renormalize`` (MoLA, Mixtral), zero elsewhere. With k = E and renormalisation the weights equal ``probs``.
    Note that top-1 with renormalisation gives weight 1 and no task-loss gradient to the router.

    Used by MoLA and LoRA-Mixer."""
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


def load_balance_loss(
    probs: torch.Tensor, mask: torch.Tensor, token_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The Switch-Transformer / Mixtral load-balancing loss ``E · Σ_e f_e · P̄_e`` (as MoLA uses it).

    ``probs`` and ``mask`` are ``[..., E]``; ``f_e`` is the mean over tokens of ``mask[..., e]`` (the fraction of
    routing slots that pick e, summing to k) and ``P̄_e`` the mean router probability. ``token_mask`` (``[...]``,
    bool) leaves out padding. The minimum, for uniform routing, is k.

    Used by MoLA and LoRA-Mixer."""
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

    Used by MoLA and LoRA-Mixer."""
    return mask.detach().reshape(-1, mask.shape[-1]).float().mean(dim=0)


def routing_statistics(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer expert load of the last forward: ``{module name: {adapter: load [E]}}``.

    Reads ``last_load`` (a dict adapter -> tensor) from every module that has one, i.e. the routed tuner layers.
    Useful for logging and for plotting expert load per depth.

    For MoLA, LoRA-Mixer
 and SMoRA
 layers."""
    stats = {}
    for name, module in model.named_modules():
        load = getattr(module, "last_load", None)
        if isinstance(load, dict) and load:
            stats[name] = {k: v for k, v in load.items()}
    return stats
