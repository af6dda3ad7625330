"""LayRA: LoRA on selected initial and final layers only, on upstream ``peft.LoraConfig``; plus an optional CKA-ranked
layer selection borrowed from a *different* paper.

LayRA paper: *Continually Adding New Languages to Multilingual Language Models* — https://arxiv.org/abs/2509.11414
(no public code found). LayRA adds LoRA to "selected initial and final layers while keeping the rest of the model
frozen": early layers encode the new language, middle layers reason in English, final layers translate back. How many
initial and final layers the paper picks, and which modules inside them, is UNCERTAIN: :func:`layra_layers` takes
``n_first`` / ``n_last`` explicitly, ``configs/layra.yaml`` documents its choice.

CKA selection (:func:`cka_select_layers`) comes from *Layer-wise LoRA fine-tuning: a similarity metric approach*
(official code https://github.com/c2d-usp/Layer-wise-LoRA-with-CKA, ``decoder-only/select_layers_decoder.py``): linear
CKA between consecutive hidden states (the last non-pad token of each sample, 128 samples in the paper), keep the
``⌊fraction·L⌋`` layers whose output is least similar to their input. It is **not** LayRA's rule; its relation to
LayRA is UNCERTAIN, and it is offered only as an alternative way to fill ``layers_to_transform``.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from peft import LoraConfig

PAPER_URL = "https://arxiv.org/abs/2509.11414"
CODE_URL = ""
CKA_CODE_URL = "https://github.com/c2d-usp/Layer-wise-LoRA-with-CKA"

# Llama-family projection names; LoRA's target_modules may not be the string "all-linear" together with
# layers_to_transform (PEFT refuses that combination), so the preset lists them.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}; got {value!r}.")
    return value


def layra_layers(n_layers: int, n_first: int, n_last: int) -> list[int]:
    """The LayRA layer set ``[0 … n_first−1] ∪ [L−n_last … L−1]`` of a model with ``L = n_layers`` blocks.

    LayRA: https://arxiv.org/abs/2509.11414 (no public code). The two ranges must not overlap (that would be plain
    LoRA on some middle-free model, almost certainly a mistake), and at least one layer must be selected.
    """
    _int("layra_layers", "n_layers", n_layers, 1)
    _int("layra_layers", "n_first", n_first, 0)
    _int("layra_layers", "n_last", n_last, 0)
    if n_first + n_last == 0:
        raise ValueError("layra_layers: n_first + n_last must be >= 1; got 0 (no layer would be adapted).")
    if n_first + n_last > n_layers:
        raise ValueError(
            f"layra_layers: n_first + n_last ({n_first} + {n_last}) must be <= n_layers ({n_layers}); the first and "
            "last ranges would overlap."
        )
    return list(range(n_first)) + list(range(n_layers - n_last, n_layers))


def layra_preset(
    n_layers: Optional[int] = None,
    n_first: Optional[int] = None,
    n_last: Optional[int] = None,
    *,
    layers: Optional[Sequence[int]] = None,
    layers_pattern: str = "layers",
    **kwargs: Any,
) -> LoraConfig:
    """A LayRA config (https://arxiv.org/abs/2509.11414; no public code): ``LoraConfig`` with
    ``layers_to_transform = layra_layers(n_layers, n_first, n_last)`` and ``layers_pattern`` (``"layers"`` for
    Llama-style ``model.layers.N``).

    Pass either ``n_layers``/``n_first``/``n_last`` or an explicit ``layers`` list (e.g. from
    :func:`cka_select_layers`, a selection rule from a different paper). ``target_modules`` defaults to the seven
    Llama projections (UNCERTAIN for the paper); every other keyword is a ``LoraConfig`` field.
    """
    if layers is not None:
        if any(v is not None for v in (n_layers, n_first, n_last)):
            raise ValueError("layra_preset: pass either `layers` or n_layers/n_first/n_last, not both.")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layra_preset.layers must be a non-empty list of layer indices; got {layers!r}.")
        for i in layers:
            _int("layra_preset", "layers[i]", i, 0)
        selected = sorted(set(layers))
    else:
        missing = [k for k, v in (("n_layers", n_layers), ("n_first", n_first), ("n_last", n_last)) if v is None]
        if missing:
            raise ValueError(f"layra_preset needs n_layers, n_first and n_last (or `layers`); missing {missing}.")
        selected = layra_layers(n_layers, n_first, n_last)
    if not isinstance(layers_pattern, str) or not layers_pattern:
        raise ValueError(f"layra_preset.layers_pattern must be a non-empty string; got {layers_pattern!r}.")
    for fixed in ("layers_to_transform",):
        if fixed in kwargs:
            raise ValueError(f"layra_preset sets {fixed} itself; pass n_first/n_last or `layers` instead.")
    allowed = {f.name for f in fields(LoraConfig) if f.init} - {"layers_to_transform", "layers_pattern"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"layra_preset got unknown argument(s) {unknown}; allowed: n_layers, n_first, n_last, layers, "
            "layers_pattern and the LoraConfig fields."
        )
    kwargs.setdefault("target_modules", list(DEFAULT_TARGETS))
    if isinstance(kwargs["target_modules"], str):
        raise ValueError(
            "layra_preset.target_modules must be a list of module names: PEFT ignores layers_to_transform when "
            f"target_modules is a string (got {kwargs['target_modules']!r})."
        )
    return LoraConfig(layers_to_transform=selected, layers_pattern=layers_pattern, **kwargs)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two feature matrices ``x`` (n×d_x) and ``y`` (n×d_y), rows = samples:
    ``‖X̄ᵀȲ‖²_F / (‖X̄ᵀX̄‖_F · ‖ȲᵀȲ‖_F)`` with column-centred ``X̄, Ȳ`` (fp32, in float64 accumulation).

    As the ``linear_cka`` of https://github.com/c2d-usp/Layer-wise-LoRA-with-CKA (CKA: Kornblith et al. 2019,
    https://arxiv.org/abs/1905.00414). Used by :func:`cka_select_layers`; not part of LayRA.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs two 2-D matrices with the same number of rows; got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}.")
    if x.shape[0] < 2:
        raise ValueError("linear_cka needs at least 2 samples (rows).")
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(x.T @ y) ** 2
    denom = (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)).clamp_min(1e-12)
    return float(cross / denom)


def _last_token_index(attention_mask: Optional[torch.Tensor], batch: int, length: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.full((batch,), length - 1, device=device, dtype=torch.long)
    mask = attention_mask.to(device).bool()
    if not mask.any(dim=1).all():
        raise ValueError("cka_select_layers: a sample has an all-zero attention_mask (no token to read).")
    positions = torch.arange(length, device=device).expand(batch, length)
    return torch.where(mask, positions, -1).max(dim=1).values  # last non-pad position, left or right padding


@torch.no_grad()
def cka_layer_scores(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
    """``[CKA(h_i, h_{i+1}) for i < L]``: linear CKA between the input and output hidden states of each block, on
    the last non-pad token of every sample.

    From *Layer-wise LoRA fine-tuning: a similarity metric approach* (official code
    https://github.com/c2d-usp/Layer-wise-LoRA-with-CKA, ``decoder-only/select_layers_decoder.py``); offered as an
    alternative layer selection for the LayRA preset (*Continually Adding New Languages to Multilingual Language
    Models*, https://arxiv.org/abs/2509.11414, no public code), which is not LayRA's own rule.

    ``batches`` are keyword dicts for ``model(**batch, output_hidden_states=True)`` (``input_ids``,
    ``attention_mask``, …; ``labels`` are dropped). ``hidden_states[0]`` is the embedding output and, in
    transformers, ``hidden_states[L]`` is taken after the final norm, exactly as in the official script. Pass the base
    model (adapters would change the hidden states). The model runs in eval mode; its mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    features: Optional[list[list[torch.Tensor]]] = None
    try:
        for batch in batches:
            inputs = {k: v for k, v in dict(batch).items() if k != "labels"}
            out = model(**inputs, output_hidden_states=True)
            hidden = getattr(out, "hidden_states", None)
            if hidden is None:
                raise ValueError(f"{type(model).__name__} returned no hidden_states; cka_layer_scores needs them.")
            first = hidden[0]
            idx = _last_token_index(inputs.get("attention_mask"), first.shape[0], first.shape[1], first.device)
            rows = torch.arange(first.shape[0], device=first.device)
            if features is None:
                features = [[] for _ in hidden]
            elif len(features) != len(hidden):
                raise ValueError("cka_layer_scores: the number of hidden states changed between batches.")
            for store, h in zip(features, hidden):
                store.append(h[rows, idx].float().cpu())
    finally:
        model.train(was_training)
    if features is None:
        raise ValueError("cka_layer_scores: `batches` is empty.")
    reps = [torch.cat(f, dim=0) for f in features]
    return [linear_cka(reps[i], reps[i + 1]) for i in range(len(reps) - 1)]


def select_lowest(scores: Sequence[float], fraction: float = 0.5) -> list[int]:
    """Indices of the ``⌊fraction·len(scores)⌋`` lowest scores (ties: lower index first), in ascending index order.

    The selection rule of *Layer-wise LoRA fine-tuning: a similarity metric approach* (official code
    https://github.com/c2d-usp/Layer-wise-LoRA-with-CKA, ``ratio_of_layers``, default 0.5), used to fill
    ``layers_to_transform`` of the LayRA preset (*Continually Adding New Languages to Multilingual Language Models*,
    https://arxiv.org/abs/2509.11414, no public code); it is not LayRA's own rule.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"cka_select_layers.fraction must be a number in (0, 1]; got {fraction!r}.")
    k = math.floor(fraction * len(scores))
    if k < 1:
        raise ValueError(
            f"cka_select_layers: fraction {fraction} of {len(scores)} layers selects no layer; raise the fraction."
        )
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:k])


def cka_select_layers(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], fraction: float = 0.5
) -> list[int]:
    """Layers to adapt by the CKA rule of *Layer-wise LoRA fine-tuning: a similarity metric approach* (official code
    https://github.com/c2d-usp/Layer-wise-LoRA-with-CKA): the ``⌊fraction·L⌋`` blocks with the lowest linear CKA
    between their input and output hidden states (the ones that change the representation most).

    Borrowed from a different paper than LayRA (https://arxiv.org/abs/2509.11414); feed the result to
    ``layra_preset(layers=...)``. See :func:`cka_layer_scores` for what ``batches`` holds.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"cka_select_layers.fraction must be a number in (0, 1]; got {fraction!r}.")
    return select_lowest(cka_layer_scores(model, batches), fraction)
