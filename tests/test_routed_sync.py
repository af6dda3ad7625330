"""The routed layers read no tensor values during their forward (each read would wait for the GPU, once per layer and
forward): route inputs are checked once per call by the tuner model's hook, the layers check shapes only.

Gated LoRA (https://arxiv.org/abs/2507.11851, TARA https://arxiv.org/abs/2508.08812), LoRA-Mixer
(https://arxiv.org/abs/2507.00029) and MoLA (https://arxiv.org/abs/2402.08562). On CPU the reads are caught by making
the Python-level conversions of a tensor (``bool``, ``int``, ``float``, ``item``, ``tolist``) raise while a tuner layer
runs; the value checks must still reject bad inputs, now from the hook."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from conftest import randomize_adapter, tiny_llama
from peft_ext import MolaConfig
from peft_ext.tuners._shared.base import ExtLayer
from peft_ext.tuners.gated_lora import GatedLoraConfig
from peft_ext.tuners.lora_mixer import LoraMixerConfig

READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


class HostReadGuard:
    """Pre/post forward hooks on every tuner layer that make tensor-to-Python conversions raise inside the layer."""

    def __init__(self, model):
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        self.handles = []
        for m in model.modules():
            if isinstance(m, ExtLayer):
                self.handles.append(m.register_forward_pre_hook(lambda *a: self._arm()))
                self.handles.append(m.register_forward_hook(lambda *a: self._disarm()))

    def _arm(self):
        def refuse(tensor, *args, **kwargs):
            raise AssertionError("a tuner layer read a tensor value during its forward")

        for name in READS:
            setattr(torch.Tensor, name, refuse)

    def _disarm(self):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)

    def remove(self):
        self._disarm()
        for handle in self.handles:
            handle.remove()


ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
route = (torch.arange(24) % 3 - 1).reshape(2, 12)
rare = torch.zeros(2, 12, dtype=torch.long)
rare[0, 3], rare[1, 5] = 1, 1  # an integer 0/1 gate, converted to bool once by the hook
align = torch.zeros(2, 12, dtype=torch.long)
align[0, 4], align[1, 6] = 1, 1

CASES = [  # (config, call inputs, whether the forward records auxiliary-loss terms)
    pytest.param(GatedLoraConfig(r=4, branches=["a", "b"], target_modules=TARGETS), {"route_ids": route}, False,
                 id="gated-route_ids"),
    pytest.param(GatedLoraConfig(r=4, branches=["vision", "language"], target_modules=TARGETS),
                 {"modality": (route >= 0).long()}, False, id="gated-modality"),
    pytest.param(GatedLoraConfig(r=4, branches=["concept"], target_modules=TARGETS, alignment_loss_weight=0.5),
                 {"gate": rare, "align_mask": align}, True, id="gated-tara-alignment"),
    pytest.param(LoraMixerConfig(r=4, num_experts=3, top_k=2, target_modules=TARGETS), {}, True, id="mixer-router"),
    pytest.param(LoraMixerConfig(r=4, num_experts=3, top_k=2, target_modules=TARGETS), {"expert_ids": route + 1},
                 False, id="mixer-expert_ids"),
    pytest.param(MolaConfig(r=4, num_experts=4, top_k=2, balance_loss_weight=0.1, target_modules=TARGETS), {}, True,
                 id="mola-balance"),
]


@pytest.mark.parametrize("config, call, records_aux", CASES)
def test_routed_layers_read_no_tensor_values(config, call, records_aux):
    model = get_peft_model(tiny_llama(), config)
    randomize_adapter(model)
    model.train()
    guard = HostReadGuard(model)
    try:
        out = model(input_ids=ids, labels=ids, **call)  # a training forward: auxiliary losses are computed too
    finally:
        guard.remove()
    assert torch.isfinite(out.loss)
    assert (model.base_model.aux_loss() is not None) == records_aux
    guard = HostReadGuard(model)
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, **call)
    finally:
        guard.remove()


def test_the_guard_catches_a_read():
    """The guard is live: a layer that reads a value (here: a hook standing in for ``int(route.min())``) fails."""
    model = get_peft_model(tiny_llama(), GatedLoraConfig(r=4, branches=["a", "b"], target_modules=["q_proj"]))
    layer = next(m for m in model.modules() if isinstance(m, ExtLayer))
    guard = HostReadGuard(model)
    extra = layer.register_forward_pre_hook(lambda m, a: int(m.call_inputs["route_ids"].min()))
    try:
        with pytest.raises(AssertionError, match="read a tensor value"):
            model(input_ids=ids, route_ids=route)
    finally:
        extra.remove()
        guard.remove()
