"""SwitchLoRA model: injects ``SwitchLoraLinear`` layers and saves the rewritten base weights with the adapter.

Paper: *SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information* (https://arxiv.org/abs/2406.06564).
Official code: https://github.com/asfsdsf/SwitchLoRA (``switchlora/``).
"""

from __future__ import annotations

import warnings

from torch import nn

from .._shared.base import ExtModel
from .layer import SwitchLoraLayer, SwitchLoraLinear


def switchlora_layers(model: nn.Module) -> list[SwitchLoraLayer]:
    """All SwitchLoRA layers inside ``model`` (a PeftModel, a SwitchLoraModel or any module holding them)."""
    return [m for m in model.modules() if isinstance(m, SwitchLoraLayer)]


class SwitchLoraModel(ExtModel):
    """SwitchLoRA tuner model.

    Switching, and the initial compensation ``W −= s·B₀A₀`` (``compensate_init``, default, as the official
    ``layer2lora``), rewrite the base weight of the targeted layers, so the adapter is not separable from its base:
    ``save_pretrained`` also stores ``<layer>.base_layer.weight`` of every layer whose weight was rewritten (without
    any merged ``s·B·A``; with compensation that is every layer, from step 0), and ``PeftModel.from_pretrained`` on
    the original base model puts it back, reproducing the model exactly. Merge / unmerge add / subtract ``s·B·A``
    to / from the rewritten W (``merge_and_unload()`` is the trained model). ``disable_adapter()`` and
    ``delete_adapter()`` keep the rewritten weight: with compensation, ``disable_adapter()`` gives ``W − s·B₀A₀``
    from the start, not the original base. Several SwitchLoRA adapters on one model share the base weights they
    rewrite (each compensated adapter subtracts its own start, which changes what the others compute): train one at
    a time."""

    prefix: str = "switchlora_"
    tuner_layer_cls = SwitchLoraLayer
    layer_cls = SwitchLoraLinear

    def _layer_kwargs(self, config, adapter_name: str, current_key: str) -> dict:
        return {"module_key": current_key}

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if not isinstance(module, SwitchLoraLayer) or not module.base_weight_mutated():
                continue
            key = f"{name}.base_layer.weight" if name else "base_layer.weight"
            weight = state_dict.get(key, module.get_base_layer().weight).detach()
            if module.merged_adapters:
                warnings.warn(
                    f"Saving SwitchLoRA layer {name} while merged: its base weight is stored with the merged s·B·A "
                    "subtracted again (float rounding); unmerge before saving for an exact copy."
                )
                weight = weight.clone()
                for merged in module.merged_adapters:
                    weight -= module.get_delta_weight(merged).to(weight.dtype)
            to_return[key] = weight
        return to_return

    def switch_counts(self, adapter_name=None) -> dict[str, int]:
        """Vectors switched so far per layer (A-rows + B-columns) for ``adapter_name`` (default: the active one)."""
        name = adapter_name or self.active_adapters[0]
        out = {}
        for key, module in self.model.named_modules():
            if isinstance(module, SwitchLoraLayer) and name in module.switchlora_track:
                out[key] = int(module.switchlora_track[name].switched)
        return out
