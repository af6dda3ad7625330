"""Gated LoRA model: injects ``GatedLoraLinear`` layers, hands per-call route inputs to them, adds TARA's alignment
loss to ``outputs.loss``, and exports single branches as plain LoRA.

Papers: MTP https://arxiv.org/abs/2507.11851 (no official code; unofficial https://github.com/siihwanpark/MTP-GLoRA),
TARA https://arxiv.org/abs/2508.08812 (https://github.com/YuqiPeng77/TARA), Arcana MM-LoRA
https://arxiv.org/abs/2410.13733 (no public code), RegionBLIP https://arxiv.org/abs/2308.02299
(https://github.com/mightyzau/RegionBLIP).
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import Optional, Union

import torch
from torch import nn

from .._shared.base import ExtModel
from .._shared.routing import route_value, value_range
from .config import GatedLoraConfig
from .layer import ROUTE_ARGS, GatedLoraLayer, GatedLoraLinear


def module_matches(spec: Optional[Union[list[str], str]], key: str) -> bool:
    """Whether module name ``key`` matches ``spec``: None matches everything, a string is a regex matched against
    the full name, a list holds names matched exactly or as a dotted suffix. Used for ``gated_modules`` /
    ``alignment_modules`` (TARA https://arxiv.org/abs/2508.08812, code https://github.com/YuqiPeng77/TARA)."""
    if spec is None:
        return True
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key == name or key.endswith("." + name) for name in spec)


def gated_lora_layers(model: nn.Module) -> list[GatedLoraLayer]:
    """All gated LoRA layers inside ``model`` (a PeftModel, a GatedLoraModel or any module holding them)."""
    return [m for m in model.modules() if isinstance(m, GatedLoraLayer)]


@contextmanager
def _exporting_branch(model: nn.Module, branch: str, adapter_name: str):
    layers = [layer for layer in gated_lora_layers(model) if adapter_name in layer.branches]
    if not layers:
        raise ValueError(f"The model has no gated LoRA adapter {adapter_name!r}.")
    if branch not in layers[0].branches[adapter_name]:
        raise ValueError(
            f"branch {branch!r} is not a branch of adapter {adapter_name!r}; "
            f"branches: {layers[0].branches[adapter_name]}."
        )
    for layer in layers:
        layer._export_branch[adapter_name] = branch
    try:
        yield
    finally:
        for layer in layers:
            layer._export_branch.pop(adapter_name, None)


def save_branch_as_lora(
    model: nn.Module, path, branch: str, adapter_name: str = "default", rank: Optional[int] = None
) -> None:
    """Save one branch of a gated LoRA adapter as a plain PEFT LoRA adapter (``peft.tuners.lora.conversion``).

    The gate is dropped: the exported LoRA applies the branch to every token, i.e. it equals the gated adapter only
    where the route selects this branch. Ungated layers (``gated_modules``, ``mode='sum'``) export this branch only
    as well. ``rank`` defaults to the branch's rank, which reproduces ``ΔW_b`` exactly up to SVD round-off."""
    from peft.tuners.lora.conversion import save_as_lora

    layers = [layer for layer in gated_lora_layers(model) if adapter_name in layer.branches]
    if not layers:
        raise ValueError(f"The model has no gated LoRA adapter {adapter_name!r}.")
    if branch not in layers[0].branches[adapter_name]:
        raise ValueError(
            f"branch {branch!r} is not a branch of adapter {adapter_name!r}; "
            f"branches: {layers[0].branches[adapter_name]}."
        )
    if any(layer.gated[adapter_name] for layer in layers):
        warnings.warn(
            f"save_branch_as_lora: the per-token gate of branch {branch!r} is dropped; the exported LoRA applies the "
            "branch to every token."
        )
    if rank is None:
        rank = layers[0].ranks[adapter_name][layers[0].branches[adapter_name].index(branch)]
    with _exporting_branch(model, branch, adapter_name):
        save_as_lora(path, model, rank=rank, adapter_name=adapter_name)


class GatedLoraModel(ExtModel):
    """Gated LoRA tuner model (MTP gated LoRA, TARA, MM-LoRA, RegionBLIP).

    Per-call inputs, passed to ``PeftModel`` like PEFT's ``adapter_names=``: ``route_ids`` (int ``[batch, tokens]``,
    ``-1`` = base, ``b`` = ``branches[b]``; or ``[batch]`` / a scalar / a branch name for the whole sample or call),
    ``modality`` (bool, two branches: True = ``branches[0]``), ``gate`` (bool: True = the default branch) and
    ``align_mask`` (bool, TARA's class-word tokens). With ``alignment_loss_weight > 0`` the alignment loss, averaged
    over the alignment layers and weighted, is added to ``outputs.loss`` when ``labels`` are passed.

    ``generate`` takes the same inputs: a per-token input ``[batch, prompt length]`` covers the prompt, and each
    generated token takes a fill (see ``peft_ext.tuners._shared.routing.TokenRoutes``): ``route_ids`` -1 (base only:
    MTP's generated tokens are next-token positions, TARA's are no concept), ``modality`` False (the second branch,
    MM-LoRA's language: generated tokens are text), ``gate`` False (base only). ``route_fill=`` passed with the call
    overrides it: a branch index or -1 (``route_ids``), True / False (``modality`` / ``gate``), or ``"last"`` for
    each sample's last prompt position. Per-sample and whole-call inputs apply to every generated token as given."""

    prefix: str = "gated_lora_"
    tuner_layer_cls = GatedLoraLayer
    layer_cls = GatedLoraLinear
    call_args = ("route_ids", "modality", "gate", "align_mask", "route_fill")
    token_inputs = {"route_ids": -1, "modality": False, "gate": False}

    @property
    def has_aux_loss(self) -> bool:  # only adapters with TARA's alignment loss record terms
        return any(getattr(cfg, "alignment_loss_weight", 0) > 0 for cfg in self.peft_config.values())

    def _check_call_inputs(self, inputs: dict) -> dict:
        """Check the route inputs once per call (dtypes, value ranges, ``route_fill``, TARA's token counts), on the
        values as given; the layers then check shapes only."""
        self._check_a_branch_can_train(inputs)
        out = dict(inputs)
        routed = [self.peft_config[a] for a in self.active_adapters if a in self.peft_config]
        routed = [cfg for cfg in routed if cfg.mode == "route"]
        nb = min((len(cfg.branches) for cfg in routed), default=None)
        ids = inputs.get("route_ids")
        if ids is not None and not isinstance(ids, str):
            ids = out["route_ids"] = route_value("route_ids", ids, kind="int", per_sample_ok=True)
            span = value_range(ids)
            for cfg in routed:
                if span is not None and (span[0] < -1 or span[1] >= len(cfg.branches)):
                    raise ValueError(
                        f"route_ids must hold -1 (base only) or a branch index in 0..{len(cfg.branches) - 1} "
                        f"(branches {cfg.branches}); got values in [{span[0]}, {span[1]}]."
                    )
        for name in ("modality", "gate"):
            out[name] = route_value(name, inputs.get(name), kind="bool", per_sample_ok=True)
        out["align_mask"] = route_value("align_mask", inputs.get("align_mask"), kind="bool")
        fill = inputs.get("route_fill")
        if fill is not None and fill != "last":
            if isinstance(ids, torch.Tensor) and nb is not None:
                if isinstance(fill, bool) or not isinstance(fill, int) or not -1 <= fill < nb:
                    raise ValueError(
                        f"route_fill (the route of tokens beyond route_ids, e.g. generated ones) must be 'last' or -1 "
                        f"(base only) or a branch index in 0..{nb - 1}; got {fill!r}."
                    )
            elif out["modality"] is not None or out["gate"] is not None:
                if not isinstance(fill, bool):
                    name = "modality" if out["modality"] is not None else "gate"
                    raise ValueError(
                        f"route_fill (the {name} value of tokens beyond the given mask, e.g. generated ones) must be "
                        f"'last', True or False; got {fill!r}."
                    )
        out["align_mask"] = self._check_alignment(out)
        return out

    def _check_a_branch_can_train(self, inputs: dict) -> None:
        """A training forward (layers in training mode, autograd on) that passes no route input to an active adapter
        without ``default_route`` would run every gated layer as the base model: the adapter would train nothing and
        the user would learn it from autograd ("does not require grad"). Raise a ValueError naming both ways out.

        Reads only Python state (which inputs were given, the config, the layers' flags), never a tensor value, so it
        costs no device sync; the layers are visited only when no route input was given to such an adapter."""
        if not torch.is_grad_enabled() or any(inputs.get(name) is not None for name in ROUTE_ARGS):
            return
        configs = {a: self.peft_config[a] for a in self.active_adapters if a in self.peft_config}
        idle = [a for a, cfg in configs.items() if cfg.mode == "route" and cfg.default_route is None]
        if not idle:
            return
        layers = list(self.tuner_layers())
        if not any(layer.training for layer in layers) or any(layer.disable_adapters for layer in layers):
            return  # inference, or inside disable_adapter(): the base model is what the call asks for
        for adapter in idle:
            owned = [layer for layer in layers if adapter in layer.gated]
            if not owned or not all(layer.gated[adapter] for layer in owned):
                continue  # ungated layers (gated_modules) apply the branches to every token and train
            cfg = self.peft_config[adapter]
            raise ValueError(
                f"gated_lora adapter {adapter!r}: this training forward passes no route input and the adapter has no "
                f"default_route, so no branch is active for any token and the adapter trains nothing. Either pass "
                f"route_ids= (branch index per token, -1 = base only), modality= or gate= with each call, or set "
                f"GatedLoraConfig(default_route=...) to one of the branches {cfg.branches} to apply it to every "
                f"token when a call passes no route input."
            )

    def _check_alignment(self, inputs: dict) -> Optional[torch.Tensor]:
        """TARA pairs the i-th routed token with the i-th ``align_mask`` token: check once per call that the counts
        agree. Returns the mask, or None when either count is zero (no alignment term)."""
        align = inputs.get("align_mask")
        active = [self.peft_config[a] for a in self.active_adapters if a in self.peft_config]
        weighted = any(cfg.alignment_loss_weight > 0 for cfg in active)
        if align is None or not weighted or not torch.is_grad_enabled():
            return align  # the layers record the alignment loss under autograd only
        ids = inputs.get("route_ids")
        if isinstance(ids, str) or (ids is None and inputs.get("modality") is not None):
            routed = torch.ones((), dtype=torch.bool, device=align.device)  # every token is routed to a branch
        elif ids is not None or inputs.get("gate") is not None:
            routed = ids >= 0 if ids is not None else inputs["gate"]
            if routed.dim() == 1 and align.dim() > 1 and routed.shape[0] == align.shape[0]:
                routed = routed.view(-1, *([1] * (align.dim() - 1)))  # one route per sample
        else:
            return None  # no route input: the default branch applies to every token, no routed-token term
        try:
            routed = torch.broadcast_to(routed.to(align.device), align.shape)
        except RuntimeError:
            return align  # shapes disagree: the layers' shape check names the argument
        n_rare, n_cls = torch.stack([routed.sum(), align.sum()]).tolist()
        if n_rare == 0 or n_cls == 0:
            return None
        if n_rare != n_cls:
            raise ValueError(
                f"align_mask marks {n_cls} tokens but {n_rare} tokens are routed to a branch; TARA's alignment loss "
                "pairs them one to one, so the counts must be equal."
            )
        return align

    def _layer_kwargs(self, config: GatedLoraConfig, adapter_name: str, current_key: str) -> dict:
        gated = config.mode == "route" and module_matches(config.gated_modules, current_key)
        align = gated and config.alignment_loss_weight > 0 and module_matches(config.alignment_modules, current_key)
        return {"gated": gated, "align": align}

    def aux_loss(self) -> Optional[torch.Tensor]:
        """TARA's alignment loss of the last forward: the weighted per-layer terms averaged over the layers that
        recorded one (TARA averages over its cross-attention ``to_k`` layers), or None."""
        terms = [t for layer in self.tuner_layers() for t in layer.aux_losses]
        if not terms:
            return None
        return torch.stack([t.float() for t in terms]).mean()

    def save_branch_as_lora(self, path, branch: str, adapter_name: str = "default", rank: Optional[int] = None) -> None:
        """See ``peft_ext.tuners.gated_lora.save_branch_as_lora``."""
        save_branch_as_lora(self, path, branch, adapter_name=adapter_name, rank=rank)
