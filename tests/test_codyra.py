"""CoDyRA (https://arxiv.org/abs/2412.01004, official code https://github.com/Artificer-AI-Lab/CoDyRA) against hand
computations of the paper's formulas and of the official code's behaviour (independent oracles, nothing copied)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import LLAMA_TARGETS, randomize_adapter, rel_err, tiny_llama, tiny_mlp
from peft_ext.callbacks.codyra import CodyraThresholdCallback
from peft_ext.tuners.codyra import (
    CodyraConfig,
    CodyraLayer,
    codyra_layers,
    effective_rank,
    increment_task,
    threshold_at,
    threshold_gate,
)

R = 8


def codyra_mlp(targets=("lin0",), **kwargs):
    model = get_peft_model(tiny_mlp(), CodyraConfig(r=R, target_modules=list(targets), **kwargs))
    randomize_adapter(model)
    return model, model.base_model.model.lin0


def factors(layer, adapter="default"):
    return (layer.codyra_down[adapter].weight, layer.codyra_up[adapter].weight, layer.codyra_gate[adapter].weight)


def test_forward_is_gated_lora_without_scale(mlp_inputs):
    model, layer = codyra_mlp()
    A, B, g = factors(layer)
    x, W, bias = mlp_inputs, layer.base_layer.weight, layer.base_layer.bias
    expected = x @ W.T + bias + ((x @ A.T) * g) @ B.T
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gate_of_ones_is_plain_lora_with_scale_one(llama_inputs):
    cod = get_peft_model(tiny_llama(), CodyraConfig(r=R, target_modules=LLAMA_TARGETS, gate_init="ones"))
    randomize_adapter(cod)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=R, target_modules=LLAMA_TARGETS))  # s = α/r = 1
    layers = {n: m for n, m in cod.named_modules() if isinstance(m, CodyraLayer)}
    with torch.no_grad():
        for name, module in lora.named_modules():
            if name in layers:
                layers[name].codyra_gate["default"].weight.fill_(1.0)
                module.lora_A["default"].weight.copy_(layers[name].codyra_down["default"].weight)
                module.lora_B["default"].weight.copy_(layers[name].codyra_up["default"].weight)
        assert rel_err(cod(input_ids=llama_inputs).logits, lora(input_ids=llama_inputs).logits) <= 1e-6


def test_fresh_gate_is_standard_normal_from_a_local_generator():
    base1, base2 = tiny_mlp(), tiny_mlp()
    torch.manual_seed(0)
    m1 = get_peft_model(base1, CodyraConfig(r=64, target_modules=["lin0", "lin1"]))
    torch.manual_seed(1)
    m2 = get_peft_model(base2, CodyraConfig(r=64, target_modules=["lin0", "lin1"]))
    (a0, a1), (b0, _) = codyra_layers(m1), codyra_layers(m2)
    g = a0.codyra_gate["default"].weight
    assert torch.equal(g, b0.codyra_gate["default"].weight)  # independent of the global RNG
    assert not torch.equal(a0.codyra_down["default"].weight, b0.codyra_down["default"].weight)  # A uses it
    assert not torch.equal(g, a1.codyra_gate["default"].weight)  # layers draw differently
    assert abs(g.mean().item()) < 0.5 and 0.6 < g.std().item() < 1.4  # N(0, 1), 64 draws
    assert torch.equal(a0.codyra_up["default"].weight, torch.zeros(64, 64))


def test_soft_threshold_is_the_proximal_step():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(1000, generator=gen)
    tau = 0.3
    expected = np.sign(g.numpy()) * np.maximum(np.abs(g.numpy()) - tau, 0.0)
    got = threshold_gate(g, tau, "soft")
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-7)  # one float32 subtraction
    assert torch.equal(got == 0, g.abs() <= tau)
    assert torch.equal(threshold_gate(g, 0.0, "soft"), g)  # τ = 0 (the dense schedule entry) changes nothing


def _official_oracle(g: torch.Tensor, tau: float) -> torch.Tensor:
    """The official code's three sequential in-place updates, written out."""
    p = g.clone()
    p[p > tau] -= tau
    p[p < -tau] += tau
    p[p.abs() < tau] = 0.0
    return p


def test_official_threshold_zeroes_tau_to_two_tau_and_keeps_tau():
    tau = 0.25  # exact in binary, so |g| = τ and |g| = 2τ are exact
    g = torch.tensor([0.1, -0.2, 0.25, -0.25, 0.3, -0.45, 0.5, -0.5, 0.7, -1.0, 0.0])
    got = threshold_gate(g, tau, "official")
    expected = torch.tensor([0.0, 0.0, 0.25, -0.25, 0.0, 0.0, 0.25, -0.25, 0.45, -0.75, 0.0])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    soft = threshold_gate(g, tau, "soft")
    assert soft[4] != 0 and soft[2] == 0  # the soft step keeps (τ, 2τ) shrunk and zeroes |g| = τ
    rand = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    for t in (0.0, 0.1, 0.7):
        assert torch.equal(threshold_gate(rand, t, "official"), _official_oracle(rand, t))


def test_pruned_ranks_contribute_exactly_nothing(mlp_inputs):
    model, layer = codyra_mlp()
    A, B, g = factors(layer)
    pruned = torch.tensor([1, 4, 6])
    with torch.no_grad():
        g[pruned] = 0.0
        out = model(mlp_inputs)
        delta = layer.get_delta_weight("default")
        A[pruned] = torch.randn(3, 64) * 10
        B[:, pruned] = torch.randn(64, 3) * 10
        assert torch.equal(model(mlp_inputs), out)
        assert torch.equal(layer.get_delta_weight("default"), delta)
        keep = torch.tensor([0, 2, 3, 5, 7])
        torch.testing.assert_close(delta, (B[:, keep] * g[keep]) @ A[keep], rtol=1e-6, atol=1e-7)


def test_effective_rank_counts_non_zero_gates():
    model, layer = codyra_mlp(targets=("lin0", "lin1"))
    with torch.no_grad():
        layer.codyra_gate["default"].weight[:3] = 0.0
    assert layer.effective_rank("default") == R - 3
    assert model.effective_rank() == {"lin0": R - 3, "lin1": R}
    assert effective_rank(model) == model.effective_rank()
    assert torch.equal(layer.rank_mask("default"), torch.tensor([False] * 3 + [True] * (R - 3)))


@pytest.mark.parametrize("mode", ["soft", "official"])
def test_merge_equals_unmerged_with_pruned_ranks(mode, mlp_inputs):
    model, layer = codyra_mlp(targets=("lin0", "lin1"), threshold_mode=mode)
    with torch.no_grad():
        for cl in codyra_layers(model):
            cl.codyra_gate["default"].weight.copy_(torch.linspace(-0.2, 0.2, R))  # |g|: 0.029, 0.086, 0.143, 0.2
    model.apply_threshold(0.06)
    assert model.effective_rank() == {"lin0": 6 if mode == "soft" else 4, "lin1": 6 if mode == "soft" else 4}
    with torch.no_grad():
        unmerged = model(mlp_inputs)
        model.merge_adapter()
        merged = model(mlp_inputs)
        with pytest.raises(RuntimeError, match="unmerge"):
            model.apply_threshold(0.01)
        model.unmerge_adapter()
        plain = model.merge_and_unload()
        assert rel_err(merged, unmerged) <= 1e-5
        assert rel_err(plain(mlp_inputs), unmerged) <= 1e-5


def test_threshold_schedule_matches_the_official_loop():
    """τ of every step of a 1000-step run (dense 0.5, 50 thresholds) against a simulation of the official loop's
    counter; the official code thresholds only at steps > dense_iters."""
    T, kappa, num = 1000, 7e-4, 50
    lambdas = np.linspace(0, kappa, num)
    dense_iters = 0.5 * T
    step_len = int((T - dense_iters) // num)
    threshold_id, official = 0, {}
    for it in range(T):
        if it >= dense_iters and it % step_len == 0:
            threshold_id += 1
        if it > dense_iters:
            official[it] = lambdas[min(num - 1, threshold_id)]
    ours = {t: threshold_at(t, T, kappa, num, 0.5) for t in range(T)}
    assert all(ours[t] is None for t in range(500))
    assert ours[500] == lambdas[1]
    assert all(ours[t] == official[t] for t in official)
    assert ours[T - 1] == kappa


def official_loop_taus(T, kappa, num, dense_fraction):
    """τ after each iteration of the official train_model loop, written out (None where it does not threshold)."""
    lambdas = np.linspace(0, kappa, num)
    dense_iters = dense_fraction * T
    step_len = int((T - dense_iters) // num)
    threshold_id, threshold, taus = 0, lambdas[0], {}
    for it in range(T):
        if step_len > 0 and it >= dense_iters and it % step_len == 0:
            threshold_id += 1
            threshold = lambdas[min(num - 1, threshold_id)]
        taus[it] = threshold if it > dense_iters else None
    return taus


@pytest.mark.parametrize(
    "T, num, dense",
    [
        (1000, 50, 0.3),  # D = 300, step length 14: D is not a multiple of it (300 % 14 = 6)
        (25, 5, 0.5),  # D = 12.5 (not an integer), step length 2
        (60, 50, 0.5),  # step length 0: τ never leaves 0
        (1000, 50, 0.5),  # D = 500, step length 10 divides D: official == paper after D
    ],
)
def test_official_schedule_reproduces_the_official_timing(T, num, dense):
    kappa = 7e-4
    official = official_loop_taus(T, kappa, num, dense)
    ours = {t: threshold_at(t, T, kappa, num, dense, schedule="official") for t in range(T)}
    assert ours == official
    paper = {t: threshold_at(t, T, kappa, num, dense) for t in range(T)}
    same = all(paper[t] == official[t] for t in range(T) if official[t] is not None)
    assert same == ((T, num, dense) == (1000, 50, 0.5))  # the paper schedule counts from D: it differs otherwise
    if T == 60:
        assert set(official.values()) == {None, 0.0}


def test_config_schedule_drives_the_callback():
    model, layer = codyra_mlp(schedule="official", max_kappa=0.4, num_thresholds=5, dense_fraction=0.3)
    cb = CodyraThresholdCallback(model, max_steps=20)
    taus = [cb.step() for _ in range(20)]
    assert taus == [threshold_at(t, 20, 0.4, 5, 0.3, schedule="official") for t in range(20)]
    # D = 6 and step length 2 divides it, but num_thresholds = 5 does not divide T − D = 14: the paper schedule
    # spreads the 5 entries over the 14 steps, the official code moves every 2 steps
    assert taus != [threshold_at(t, 20, 0.4, 5, 0.3) for t in range(20)]
    assert CodyraThresholdCallback(model, max_steps=20, schedule="paper").threshold_at(19) == 0.4


def test_callback_alias_matches_the_methods_catalogue_name():
    from peft_ext.callbacks import CoDyRAThresholdCallback, CodyraThresholdCallback as Plain

    assert CoDyRAThresholdCallback is Plain is CodyraThresholdCallback


def test_callback_schedule_in_a_trainer_like_loop(mlp_inputs):
    """Events as transformers.Trainer sends them (on_optimizer_step before global_step += 1), with lr = 0 so only
    the callback changes g: dense steps leave g alone, then each step applies τ from linspace(0, κ, 5)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model, layer = codyra_mlp(max_kappa=0.4, num_thresholds=5, dense_fraction=0.5)
    with torch.no_grad():
        layer.codyra_gate["default"].weight.copy_(torch.linspace(-1.2, 1.2, R))
    cb = CodyraThresholdCallback(seed=0)
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    state, control = TrainerState(max_steps=20, global_step=0), TrainerControl()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    cb.on_train_begin(args, state, control, model=model)
    expected_tau = [None] * 10 + [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.4, 0.4]
    g = layer.codyra_gate["default"].weight
    for step in range(20):
        before = g.detach().clone()
        cb.on_step_begin(args, state, control, model=model)
        model(mlp_inputs).sum().backward()
        opt.step()
        cb.on_optimizer_step(args, state, control, model=model, optimizer=opt)
        opt.zero_grad()
        state.global_step += 1
        tau = expected_tau[step]
        assert cb.last_threshold == pytest.approx(tau) if tau else cb.last_threshold is None
        expected = before if tau is None else threshold_gate(before, cb.last_threshold, "soft")
        assert torch.equal(g, expected), step
    assert layer.effective_rank("default") < R
    assert cb.effective_rank() == {"lin0": layer.effective_rank("default")}


def test_callback_step_for_hand_written_loops_and_overrides():
    model, layer = codyra_mlp(threshold_mode="soft")
    cb = CodyraThresholdCallback(model, max_steps=4, max_kappa=10.0, num_thresholds=2, dense_fraction=0.5,
                                 threshold_mode="official")
    assert [cb.step() for _ in range(4)] == [None, None, 10.0, 10.0]
    assert layer.effective_rank("default") == 0  # |g| ~ 0.1 << τ
    with pytest.raises(ValueError, match="max_steps"):
        CodyraThresholdCallback(model).step()
    with pytest.raises(ValueError, match="needs the model"):
        CodyraThresholdCallback(max_steps=3).step()


def test_callback_with_a_real_trainer_acts_once_per_optimizer_step(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), CodyraConfig(r=4, target_modules=["q_proj", "v_proj"], max_kappa=50.0,
                                                      num_thresholds=3, dense_fraction=0.5))
    ids = torch.randint(0, 128, (8, 8))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    gates = [layer.codyra_gate["default"].weight for layer in codyra_layers(model)]
    start = [g.detach().clone() for g in gates]
    seen = []

    class Recording(CodyraThresholdCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            super().on_optimizer_step(args, state, control, **kwargs)
            seen.append((state.global_step, self.last_threshold))

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=4, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Recording()]).train()
    assert seen == [(0, None), (1, None), (2, 25.0), (3, 50.0)]  # 4 optimizer steps, not 8 micro-batches
    assert all(not torch.equal(g, s) for g, s in zip(gates, start))  # trained
    assert all(layer.effective_rank("default") == 0 for layer in codyra_layers(model))  # τ >> |g|


def test_increment_task_preserves_outputs_and_resets_the_adapter(mlp_inputs):
    model, layer = codyra_mlp(targets=("lin0", "lin1"))
    A, B, g = factors(layer)
    with torch.no_grad():
        g[2] = 0.0
        before = model(mlp_inputs)
        W0 = layer.get_base_weight().clone()
        delta = layer.get_delta_weight("default").clone()
        old_A, old_g = A.detach().clone(), g.detach().clone()
    folded = model.increment_task()
    assert folded == {"lin0": R - 1, "lin1": R}
    with torch.no_grad():
        after = model(mlp_inputs)
    assert rel_err(after, before) <= 1e-6  # W + ΔW vs W x + branch: fp32 rounding only
    torch.testing.assert_close(layer.get_base_weight(), W0 + delta, rtol=1e-6, atol=1e-7)
    assert torch.equal(B, torch.zeros_like(B))
    assert not torch.equal(A, old_A) and not torch.equal(g, old_g) and layer.effective_rank("default") == R
    assert A is layer.codyra_down["default"].weight  # re-initialised in place: the same Parameter objects
    assert model.peft_config["default"].task_index == 1 and layer.task_index["default"] == 1
    assert layer.codyra_past_ranks["default"].tolist() == [R - 1]
    assert layer.codyra_past_up["default"].shape == (64, R - 1)
    increment_task(model)  # a second task: B = 0, so nothing new is folded but the record grows
    assert layer.codyra_past_ranks["default"].tolist() == [R - 1, R]


def test_increment_task_survives_save_and_load_onto_the_original_base(tmp_path, mlp_inputs):
    model, layer = codyra_mlp(targets=("lin0", "lin1"))
    model.increment_task()
    randomize_adapter(model, seed=2)  # "train" the second task
    model.increment_task()
    randomize_adapter(model, seed=3)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(mlp_inputs)
        loaded = PeftModel.from_pretrained(tiny_mlp(), tmp_path)
        assert torch.equal(loaded(mlp_inputs), expected)  # past tasks folded task by task, same arithmetic
        loaded.load_state_dict(loaded.state_dict())  # loading the same history again must not fold it twice
        assert torch.equal(loaded(mlp_inputs), expected)
    assert loaded.peft_config["default"].task_index == 2
    with pytest.warns(UserWarning, match="histories add up"):
        loaded.load_adapter(tmp_path, adapter_name="again")  # its past is folded into the same base weight too
    with torch.no_grad():
        assert rel_err(loaded(mlp_inputs), expected) > 1e-3
        loaded.delete_adapter("again")  # takes its folded past out again
        assert rel_err(loaded(mlp_inputs), expected) <= 1e-6  # subtraction of what was added: rounding only


def test_increment_task_refuses_quantized_and_merged_bases(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    model = get_peft_model(base, CodyraConfig(r=4, target_modules=["q_proj"]))
    start = [layer.get_base_weight().clone() for layer in codyra_layers(model)]
    with pytest.raises(ValueError, match="quantized"):
        model.increment_task()
    assert all(torch.equal(layer.get_base_weight(), s) for layer, s in zip(codyra_layers(model), start))
    mlp, _ = codyra_mlp()
    mlp.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        mlp.increment_task()
    with pytest.raises(ValueError, match="no CoDyRA adapter 'other'"):
        increment_task(copy.deepcopy(mlp), "other")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"threshold_mode": "hard"}, r"CodyraConfig\.threshold_mode must be one of \('soft', 'official'\)"),
        ({"max_kappa": -1.0}, r"CodyraConfig\.max_kappa must be a finite number >= 0"),
        ({"num_thresholds": 1}, r"CodyraConfig\.num_thresholds must be an integer >= 2"),
        ({"dense_fraction": 1.0}, r"CodyraConfig\.dense_fraction must be a number in \[0, 1\)"),
        ({"gate_init": "zeros"}, r"CodyraConfig\.gate_init must be one of"),
        ({"r": 0}, r"CodyraConfig\.r must be an integer >= 1"),
        ({"gate_seed": -1}, r"CodyraConfig\.gate_seed must be an integer >= 0"),
        ({"max_kappa": float("inf")}, r"CodyraConfig\.max_kappa must be a finite number >= 0"),
        ({"schedule": "linear"}, r"CodyraConfig\.schedule must be one of \('paper', 'official'\)"),
        ({"init_weights": "no"}, r"CodyraConfig\.init_weights must be True or False"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CodyraConfig(**kwargs)


def test_bad_callback_and_threshold_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"CodyraThresholdCallback\.threshold_mode must be one of"):
        CodyraThresholdCallback(threshold_mode="hard")
    with pytest.raises(ValueError, match=r"CodyraConfig\.num_thresholds must be an integer >= 2"):
        CodyraThresholdCallback(num_thresholds=1)
    with pytest.raises(ValueError, match=r"threshold_gate\.tau must be a number >= 0"):
        threshold_gate(torch.ones(3), -0.1)
    with pytest.raises(ValueError, match=r"threshold_at\.max_steps must be an integer >= 1"):
        threshold_at(0, 0, 1e-3)
