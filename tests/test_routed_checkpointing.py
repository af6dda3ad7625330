"""Auxiliary losses under gradient checkpointing (MoLA https://arxiv.org/abs/2402.08562, LoRA-Mixer
https://arxiv.org/abs/2507.00029, TARA's alignment loss in gated LoRA https://arxiv.org/abs/2508.08812).

Reentrant checkpointing runs the checkpointed blocks under ``no_grad``, so the layers cannot record their terms: a
training forward with labels must raise instead of silently training without them. Non-reentrant checkpointing
recomputes the blocks inside backward: the terms must not be recorded a second time there."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from conftest import randomize_adapter, tiny_llama
from peft_ext import MolaConfig
from peft_ext.tuners.gated_lora import GatedLoraConfig
from peft_ext.tuners.lora_mixer import LoraMixerConfig

ROUTE = torch.full((2, 12), -1)
ROUTE[0, 3], ROUTE[1, 5] = 0, 0  # TARA's rare token
ALIGN = torch.zeros(2, 12, dtype=torch.bool)
ALIGN[0, 4], ALIGN[1, 6] = True, True  # its class word

CASES = [  # (config, per-call inputs)
    pytest.param(MolaConfig(r=4, num_experts=4, top_k=2, balance_loss_weight=0.5, target_modules=["q_proj", "v_proj"]),
                 {}, id="mola-layer-scope"),
    pytest.param(MolaConfig(r=4, num_experts=4, top_k=2, balance_loss_weight=0.5, balance_loss_scope="module",
                            target_modules=["q_proj", "v_proj"]), {}, id="mola-module-scope"),
    pytest.param(LoraMixerConfig(r=4, num_experts=3, top_k=2, balance_loss_weight=0.5, entropy_loss_weight=0.5,
                                 target_modules=["q_proj", "v_proj"]), {}, id="lora_mixer"),
    pytest.param(GatedLoraConfig(r=4, branches=["concept"], target_modules=["q_proj", "k_proj", "v_proj"],
                                 gated_modules=["k_proj", "v_proj"], alignment_loss_weight=0.5,
                                 alignment_modules=["k_proj"]),
                 {"route_ids": ROUTE, "align_mask": ALIGN}, id="gated_lora-tara"),
]


def model_for(config, checkpointing=None):
    """A trained-looking adapter on the tiny Llama; ``checkpointing``: None (off) or the use_reentrant flag."""
    base = tiny_llama()
    model = get_peft_model(base, config)
    randomize_adapter(model)
    if checkpointing is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model.train()
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config, call", CASES)
def test_reentrant_checkpointing_raises_instead_of_dropping_the_aux_loss(config, call, ids):
    model = model_for(config, checkpointing=True)
    with pytest.raises(RuntimeError, match=r"use_reentrant.*False"):
        model(input_ids=ids, labels=ids, **call)
    with torch.no_grad():  # no gradients at the top level: nothing is lost, nothing raised
        model(input_ids=ids, labels=ids, **call)


@pytest.mark.parametrize("config, call", CASES)
def test_non_reentrant_checkpointing_keeps_the_aux_loss_once(config, call, ids):
    plain = model_for(config)
    expected = plain(input_ids=ids, labels=ids, **call).loss
    expected_aux = plain.base_model.aux_loss()
    assert expected_aux is not None and expected_aux.item() > 1e-3
    expected.backward()

    model = model_for(config, checkpointing=False)
    loss = model(input_ids=ids, labels=ids, **call).loss
    aux = model.base_model.aux_loss()
    # the same fp32 operations in the same order: checkpointing only recomputes them
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(aux, expected_aux, rtol=1e-6, atol=1e-7)
    loss.backward()  # recomputes every decoder layer, with gradients, inside backward
    assert torch.equal(model.base_model.aux_loss(), aux), "the recomputation recorded the terms again"
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")  # torch's hint to pass use_reentrant explicitly
def test_prepare_model_for_kbit_training_default_checkpointing_raises(tmp_path, ids):
    """PEFT's prepare_model_for_kbit_training turns on reentrant checkpointing by default."""
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    base = prepare_model_for_kbit_training(base)
    model = get_peft_model(base, MolaConfig(r=4, num_experts=4, top_k=2, balance_loss_weight=0.5,
                                            target_modules=["q_proj"]))
    model.train()
    with pytest.raises(RuntimeError, match="prepare_model_for_kbit_training"):
        model(input_ids=ids, labels=ids)
