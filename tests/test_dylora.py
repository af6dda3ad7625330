"""DyLoRA against hand computations of the paper's formulas (https://arxiv.org/abs/2210.07558)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import randomize_adapter, rel_err, tiny_llama, tiny_mlp
from peft_ext import DyLoraConfig
from peft_ext.callbacks import DyLoraRankSampler
from peft_ext.tuners.dylora import DyLoraLayer, dylora_layers

R, ALPHA = 8, 16


def dylora_mlp(**kwargs):
    model = get_peft_model(tiny_mlp(), DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin0"], **kwargs))
    randomize_adapter(model)
    return model, model.base_model.model.lin0


@pytest.mark.parametrize("b", range(1, R + 1))
def test_output_at_each_rank_equals_hand_computation(b, mlp_inputs):
    model, layer = dylora_mlp()
    model.set_rank(b)
    A = layer.dylora_down["default"].weight
    B = layer.dylora_up["default"].weight
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    scale = ALPHA / R
    A_b, B_b = A[:b] * (R / b) ** 0.5, B[:, :b] * (R / b) ** 0.5  # the paper's √(r_max/b) on each factor
    expected = mlp_inputs @ W.T + bias + scale * (mlp_inputs @ A_b.T @ B_b.T)
    with torch.no_grad():
        got = layer(mlp_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_full_rank_full_mode_equals_peft_lora(llama_inputs):
    targets = ["q_proj", "v_proj"]
    dy = get_peft_model(tiny_llama(), DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, frozen_lower=False))
    randomize_adapter(dy)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets))
    dy_layers = {n: m for n, m in dy.named_modules() if isinstance(m, DyLoraLayer)}
    with torch.no_grad():
        for name, module in lora.named_modules():
            if name in dy_layers:
                module.lora_A["default"].weight.copy_(dy_layers[name].dylora_down["default"].weight)
                module.lora_B["default"].weight.copy_(dy_layers[name].dylora_up["default"].weight)
        assert rel_err(dy(input_ids=llama_inputs).logits, lora(input_ids=llama_inputs).logits) <= 1e-6


@pytest.mark.parametrize("b", [1, 3, R])
def test_frozen_mode_trains_only_the_bth_component(b, mlp_inputs):
    model, layer = dylora_mlp()
    model.train()
    layer.set_rank("default", b, training_only=True)
    model(mlp_inputs).pow(2).sum().backward()
    gA = layer.dylora_down["default"].weight.grad
    gB = layer.dylora_up["default"].weight.grad
    for i in range(R):
        assert (gA[i].abs().sum() > 0) == (i == b - 1), f"A row {i} at rank {b}"
        assert (gB[:, i].abs().sum() > 0) == (i == b - 1), f"B column {i} at rank {b}"


def test_full_mode_trains_all_components_up_to_b(mlp_inputs):
    model, layer = dylora_mlp(frozen_lower=False)
    model.train()
    layer.set_rank("default", 5, training_only=True)
    model(mlp_inputs).pow(2).sum().backward()
    gA = layer.dylora_down["default"].weight.grad
    assert all(gA[i].abs().sum() > 0 for i in range(5)) and gA[5:].abs().sum() == 0


def test_eval_mode_uses_set_rank_not_sampled_rank(mlp_inputs):
    model, layer = dylora_mlp()
    layer.set_rank("default", 2, training_only=True)
    model.eval()
    with torch.no_grad():
        out_eval = model(mlp_inputs)
        model.set_rank(2)
        out_rank2 = model(mlp_inputs)
    assert not torch.allclose(out_eval, out_rank2)  # eval used rank r, not the sampled 2
    assert model.get_rank() == 2


@pytest.mark.parametrize("b", [1, 4, R])
def test_merge_at_each_rank_equals_unmerged(b, mlp_inputs):
    model, _ = dylora_mlp()
    model.set_rank(b)
    with torch.no_grad():
        unmerged = model(mlp_inputs)
        model.merge_adapter()
        assert rel_err(model(mlp_inputs), unmerged) <= 1e-5


def test_changing_rank_of_merged_adapter_is_an_error():
    model, _ = dylora_mlp()
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.set_rank(3)
    model.unmerge_adapter()
    model.set_rank(3)
    assert model.get_rank() == 3


@pytest.mark.parametrize("bad", [0, R + 1, -1, 2.5, True, None])
def test_set_rank_outside_1_to_r_is_rejected(bad):
    model, _ = dylora_mlp()
    with pytest.raises(ValueError, match=r"rank must be an integer in 1\.\.r"):
        model.set_rank(bad)


def test_set_rank_is_saved_and_restored(tmp_path, mlp_inputs):
    model, _ = dylora_mlp()
    model.set_rank(3)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(mlp_inputs)
        loaded = PeftModel.from_pretrained(tiny_mlp(), tmp_path)
        assert loaded.get_rank() == 3
        assert torch.equal(loaded(mlp_inputs), expected)


def test_default_eval_rank_is_r_not_the_official_rank_1():
    model, layer = dylora_mlp()
    assert model.get_rank() == R and layer.current_rank("default") == R


def test_sampler_is_uniform_over_1_to_r_and_seeded():
    model, _ = dylora_mlp()
    sampler = DyLoraRankSampler(model, seed=7)
    n = 16_000
    ranks = torch.tensor([sampler.sample(k) for k in range(n)])
    counts = torch.bincount(ranks, minlength=R + 1)[1:].float()
    assert counts.sum() == n and ranks.min() >= 1 and ranks.max() <= R
    # Each count is Binomial(n, 1/8): sd = sqrt(n·p·(1-p)) ≈ 41.8; 5 sd leaves a false-alarm chance below 1e-5.
    sd = (n * (1 / R) * (1 - 1 / R)) ** 0.5
    assert ((counts - n / R).abs() <= 5 * sd).all(), counts
    # consecutive steps are not correlated: P(same rank twice in a row) ≈ 1/8
    repeats = (ranks[1:] == ranks[:-1]).float().mean().item()
    assert abs(repeats - 1 / R) < 0.02
    again = DyLoraRankSampler(model, seed=7)
    assert [again.step() for _ in range(50)] == ranks[:50].tolist()  # same seed, same sequence
    assert [DyLoraRankSampler(model, seed=8).sample(k) for k in range(50)] != ranks[:50].tolist()
    assert min(DyLoraRankSampler(model, seed=7, min_rank=5).sample(k) for k in range(200)) == 5


def test_sampler_step_sets_every_layer_and_clear_restores():
    model = get_peft_model(tiny_llama(), DyLoraConfig(r=R, target_modules=["q_proj", "v_proj"]))
    sampler = DyLoraRankSampler(model, seed=0)
    b = sampler.step()
    layers = dylora_layers(model)
    model.train()
    assert all(layer.current_rank("default") == b for layer in layers)
    sampler.clear()
    assert all(layer.current_rank("default") == R for layer in layers)


def test_sampler_with_trainer_samples_every_optimizer_step(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), DyLoraConfig(r=R, target_modules=["q_proj", "v_proj"]))
    seen = []
    layer = dylora_layers(model)[0]
    layer.register_forward_pre_hook(
        lambda mod, args: seen.append(mod.current_rank("default")) if mod.training else None)
    torch.manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 128, (16, 8)).tolist()})
    data = data.map(lambda row: {"labels": row["input_ids"]})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )
    sampler = DyLoraRankSampler(seed=3)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[sampler]).train()
    expected = [DyLoraRankSampler(model, seed=3).sample(step) for step in range(6)]
    # two micro-batches per optimizer step share the step's rank
    assert seen == [b for b in expected for _ in range(2)]
    assert layer.train_rank["default"] is None  # cleared at the end of training


@pytest.mark.parametrize(
    "kwargs, field",
    [({"r": 0}, "r"), ({"r": -2}, "r"), ({"lora_alpha": 0}, "lora_alpha"), ({"lora_alpha": -1.0}, "lora_alpha"),
     ({"r": 4, "eval_rank": 5}, "eval_rank"), ({"eval_rank": 0}, "eval_rank"), ({"lora_dropout": 1.0}, "lora_dropout")],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"DyLoraConfig\.{field} must be"):
        DyLoraConfig(**kwargs)
