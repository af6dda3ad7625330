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
from .config import GatedLoraConfig
from .layer import GatedLoraLayer, GatedLoraLinear


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
    """All gated LoRA layers inside ``model`` (a PeftModel, a GatedLoraModel or any module holding them).
    Gated LoRA: MTP https://arxiv.org/abs/2507.11851 (no official code), TARA https://arxiv.org/abs/2508.08812
    (https://github.com/YuqiPeng77/TARA), MM-LoRA https://arxiv.org/abs/2410.13733 (no public code), RegionBLIP
    https://arxiv.org/abs/2308.02299 (https://github.com/mightyzau/RegionBLIP)."""
    return [m for m in model.modules() if isinstance(m, GatedLoraLayer)]


@contextmanager
def _exporting_branch(model: nn.Module, branch: str, adapter_name: str):
    layers = [layer for layer in gated_lora_layers(model) if adapter_name in layer.branches]
    if not layers:
        raise ValueError(f"The model has no gated LoRA adapter {adapter_name!r}.")
    if branch not in layers[0].branches[adapter_name]:
        raise ValueError(
            f"branch {branch!r} is not a branch of adapter {adapter_name!r}; branches: {layers[0].branches[adapter_name]}."
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
    as well. ``rank`` defaults to the branch's rank, which reproduces ``ΔW_b`` exactly up to SVD round-off.
    MTP https://arxiv.org/abs/2507.11851, TARA https://arxiv.org/abs/2508.08812 (code https://github.com/YuqiPeng77/TARA).
    """
    from peft.tuners.lora.conversion import save_as_lora

    layers = [layer for layer in gated_lora_layers(model) if adapter_name in layer.branches]
    if not layers:
        raise ValueError(f"The model has no gated LoRA adapter {adapter_name!r}.")
    if branch not in layers[0].branches[adapter_name]:
        raise ValueError(
            f"branch {branch!r} is not a branch of adapter {adapter_name!r}; branches: {layers[0].branches[adapter_name]}."
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
    """Gated LoRA tuner model (MTP https://arxiv.org/abs/2507.11851, no official code; TARA
    https://arxiv.org/abs/2508.08812, code https://github.com/YuqiPeng77/TARA; MM-LoRA
    https://arxiv.org/abs/2410.13733, no public code; RegionBLIP https://arxiv.org/abs/2308.02299,
    code https://github.com/mightyzau/RegionBLIP).

    Per-call inputs, passed to ``PeftModel`` like PEFT's ``adapter_names=``: ``route_ids`` (int ``[batch, tokens]``,
    ``-1`` = base, ``b`` = ``branches[b]``; or ``[batch]`` / a scalar / a branch name for the whole sample or call),
    ``modality`` (bool, two branches: True = ``branches[0]``), ``gate`` (bool: True = the default branch) and
    ``align_mask`` (bool, TARA's class-word tokens). With ``alignment_loss_weight > 0`` the alignment loss, averaged
    over the alignment layers and weighted, is added to ``outputs.loss`` when ``labels`` are passed.
    """

    prefix: str = "gated_lora_"
    tuner_layer_cls = GatedLoraLayer
    layer_cls = GatedLoraLinear
    call_args = ("route_ids", "modality", "gate", "align_mask")

    @property
    def has_aux_loss(self) -> bool:  # only adapters with TARA's alignment loss record terms
        return any(getattr(cfg, "alignment_loss_weight", 0) > 0 for cfg in self.peft_config.values())

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
