"""MoLA model: injects ``MolaLinear`` layers with a per-layer number of experts and adds the balance loss.

Paper: *Higher Layers Need More LoRA Experts* (https://arxiv.org/abs/2402.08562). Official code:
https://github.com/GCYZSL/MoLA (``src/mola_peft_model_hacked.py``, ``src/mola_modeling_llama_hacked.py``).
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from .._shared.base import ExtModel
from .config import MolaConfig, value_for_layer
from .layer import MolaLayer, MolaLinear

_ANY_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def layer_index_of(key: str, layers_pattern=None) -> Optional[int]:
    """The decoder-layer index of module ``key`` (e.g. 3 for ``model.layers.3.self_attn.q_proj``), or None.

    With ``layers_pattern`` (a name or list of names of the layer list, e.g. ``"layers"``) the number after that name;
    otherwise the first number component of the key (so ``model.layers.3.mlp.experts.5.up_proj`` is layer 3)."""
    key = "." + key
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        for pattern in patterns:
            match = re.search(rf"\.{re.escape(pattern)}\.(\d+)(?=\.|$)", key)
            if match:
                return int(match.group(1))
        return None
    match = _ANY_INDEX.search(key)
    return int(match.group(1)) if match else None


def count_layers(model: nn.Module, layers_pattern=None) -> int:
    """Number of decoder layers of ``model``: one more than the largest layer index among its modules (0 if none)."""
    indices = [layer_index_of(name, layers_pattern) for name, _ in model.named_modules()]
    indices = [i for i in indices if i is not None]
    return max(indices) + 1 if indices else 0


def mola_layers(model: nn.Module) -> list[MolaLayer]:
    """All MoLA layers inside ``model`` (a PeftModel, a MolaModel or any module holding them)."""
    return [m for m in model.modules() if isinstance(m, MolaLayer)]


def experts_per_layer(model: nn.Module, adapter_name: str = "default") -> dict[Optional[int], int]:
    """``{layer index: number of experts}`` of adapter ``adapter_name`` (checks the per-layer allocation)."""
    out = {}
    for layer in mola_layers(model):
        if adapter_name in layer.num_experts:
            out[layer.layer_index[adapter_name]] = layer.num_experts[adapter_name]
    return out


class MolaModel(ExtModel):
    """MoLA tuner model.

    Resolves ``num_experts`` / ``top_k`` for each adapted module from its decoder-layer index (list per layer or
    depth pattern, see ``MolaConfig``), and adds the weighted load-balancing loss to ``outputs.loss`` when labels are
    passed (``aux_loss()`` returns it after any forward with gradients). Per-expert loads of the last forward:
    ``peft_ext.tuners._shared.routing.routing_statistics(model)``."""

    prefix: str = "mola_"
    tuner_layer_cls = MolaLayer
    layer_cls = MolaLinear
    has_aux_loss = True

    def _layer_kwargs(self, config: MolaConfig, adapter_name: str, current_key: str) -> dict:
        index = layer_index_of(current_key, config.layers_pattern)
        num_layers = None
        if not (isinstance(config.num_experts, int) and isinstance(config.top_k, int)):
            cache = self.__dict__.setdefault("_mola_num_layers", {})
            key = str(config.layers_pattern)
            if key not in cache:
                cache[key] = count_layers(self.model, config.layers_pattern)
            num_layers = cache[key]
        return {
            "num_experts": value_for_layer(config, "num_experts", config.num_experts, index, num_layers),
            "top_k": value_for_layer(config, "top_k", config.top_k, index, num_layers),
            "layer_index": index,
        }

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the weighted balance losses of the last forward (None when none was recorded).

        ``balance_loss_scope='layer'`` (official): per decoder layer and adapter, the routing decisions of all its
        adapted modules are pooled (the official code concatenates their router logits) and one loss
        ``E·Σ_e f_e·P̄_e`` is computed; the losses are summed over layers and weighted. ``'module'``: the layers
        recorded one loss each.
        """
        terms = [t.float() for layer in self.tuner_layers() for t in layer.aux_losses]
        groups: dict = {}
        for layer in self.tuner_layers():
            for adapter, (owner, p_sum, m_sum, n) in layer.balance_stats.items():
                if owner is not layer.aux_losses or adapter not in layer.num_experts:
                    continue  # left over from an earlier forward
                index = layer.layer_index[adapter]
                key = (adapter, index if index is not None else id(layer))
                group = groups.setdefault(key, [layer, [], [], 0])
                group[1].append(p_sum)
                group[2].append(m_sum)
                group[3] += n
        for (adapter, _), (layer, p_sums, m_sums, n) in groups.items():
            p_mean = torch.stack(p_sums).sum(0) / n
            f = torch.stack(m_sums).sum(0) / (n * layer.top_k[adapter])
            loss = layer.num_experts[adapter] * (f * p_mean).sum()
            terms.append(layer.balance_loss_weight[adapter] * loss)
        if not terms:
            return None
        return torch.stack(terms).sum()
