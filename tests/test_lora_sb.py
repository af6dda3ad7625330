"""LoRA-SB / LoRA-XS (https://arxiv.org/abs/2411.19557, https://arxiv.org/abs/2405.17604): initialisations against
independent SVD oracles, the sign-of-summed-gradient update, the chain rule of the r×r R, frozen A/B (no gradient,
no optimizer state), merging, save/load, a Trainer flow and loud errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from peft import PeftModel, get_peft_model

from conftest import MLP_TARGETS, rel_err, tiny_llama, tiny_mlp
from peft_ext.init.lora_sb import (
    effective_lr,
    estimate_gradients,
    lora_sb_init,
    lora_sb_init_from_trainer,
)
from peft_ext.tuners.lora_sb import LoraSBConfig, lora_sb_layers, low_rank_svd
from peft_ext.tuners.lora_sb.layer import PENDING_WARNING


def best_rank_r(M: torch.Tensor, r: int) -> torch.Tensor:
    """Oracle: the best rank-r approximation (Eckart–Young) from an exact float64 SVD."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


class Toy(nn.Module):
    """One linear layer with a prescribed, decaying spectrum, so the top-r subspace is well separated."""

    def __init__(self, out_f=48, in_f=40, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        U = torch.linalg.qr(torch.randn(out_f, out_f, generator=g)).Q[:, :in_f]
        V = torch.linalg.qr(torch.randn(in_f, in_f, generator=g)).Q
        s = 2.0 ** -torch.arange(in_f, dtype=torch.float32) * 3
        self.lin = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_((U * s) @ V.T)
        self.U, self.s, self.V = U, s, V

    def forward(self, x):
        return self.lin(x)


def only_layer(model):
    layers = lora_sb_layers(model)
    assert len(layers) == 1
    return layers[0]


# ----------------------------------------------------------------------------------------------------------- init


def test_zero_R_gives_the_base_output_exactly(mlp_inputs):
    base = tiny_mlp()
    with torch.no_grad():
        expected = base(mlp_inputs)
    for kwargs in ({"init": "svd", "r_init_std": 0.0}, {"init": "gradient"}, {"init": "svd", "compensate": True}):
        model = get_peft_model(copy.deepcopy(base), LoraSBConfig(r=8, target_modules=MLP_TARGETS, **kwargs))
        with torch.no_grad():
            assert torch.equal(model(mlp_inputs), expected), kwargs
    # the paper's LoRA-XS init (R ~ N(0, 1e-5²)) is close to, but not exactly, the base
    model = get_peft_model(copy.deepcopy(base), LoraSBConfig(r=8, init="svd", target_modules=MLP_TARGETS))
    with torch.no_grad():
        got = model(mlp_inputs)
    assert not torch.equal(got, expected) and rel_err(got, expected) < 1e-3


@pytest.mark.parametrize("niter, tol", [(None, 1e-5), (10, 1e-4)])
def test_xs_init_is_the_truncated_svd_of_W(niter, tol):
    toy = Toy()
    W = toy.lin.weight.detach().clone()
    r = 5
    model = get_peft_model(toy, LoraSBConfig(r=r, init="svd", svd_niter=niter, target_modules=["lin"]))
    layer = only_layer(model)
    A, B = layer.lora_sb_A["default"], layer.lora_sb_B["default"]
    # B·A is the projection of W on its top-r singular subspace (float64 oracle)
    assert rel_err(B @ A, best_rank_r(W, r).float()) <= tol
    # B = U_r and A = S_r V_rᵀ up to one sign per singular pair
    signs = torch.sign((B * toy.U[:, :r]).sum(0))
    assert torch.allclose(B, toy.U[:, :r] * signs, atol=tol * 10)
    assert torch.allclose(A, (toy.s[:r, None] * toy.V[:, :r].T) * signs[:, None], atol=tol * 10)
    # s·B R A is tiny: R ~ N(0, 1e-5²) (5 standard deviations bound the 25 entries comfortably)
    R = layer.lora_sb_R["default"].weight
    assert R.abs().max() < 5e-5 and R.abs().max() > 0
    assert layer.get_delta_weight("default").norm() / W.norm() < 1e-4


def test_low_rank_svd_is_seeded_and_never_touches_the_global_rng():
    M = torch.sign(torch.randn(64, 48, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = low_rank_svd(M, 6, 10, 10, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    b = low_rank_svd(M, 6, 10, 10, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # residual of the randomized truncation within 1e-4 of the optimum (flat spectrum of a sign matrix)
    U, S, Vh = a
    optimum = (M.double() - best_rank_r(M, 6)).norm()
    assert (M - (U * S) @ Vh).norm() <= optimum * (1 + 1e-4)


# ------------------------------------------------------------------------------------------------ LoRA-SB (gradient)


@pytest.mark.parametrize("niter", [None, 10])
def test_sb_init_is_the_best_rank_r_approximation_of_the_sign_update(niter):
    model = get_peft_model(tiny_mlp(), LoraSBConfig(r=6, svd_niter=niter, target_modules=MLP_TARGETS))
    gen = torch.Generator().manual_seed(5)
    grads = {name: torch.randn(64, 64, generator=gen) for name in MLP_TARGETS}
    updates = lora_sb_init(model, grads=grads, lr=1e-3, warmup_ratio=0.1, total_steps=100)
    lr_eff = 1e-3 / (0.1 * 100)
    for name, layer in zip(MLP_TARGETS, lora_sb_layers(model)):
        delta = -lr_eff * torch.sign(grads[name])
        assert torch.equal(updates[name], delta)
        got = layer.get_delta_weight("default")  # s = 1 (lora_alpha = r)
        if niter is None:  # exact SVD: the Eckart–Young optimum, to float32 rounding
            assert rel_err(got, best_rank_r(delta, 6).float()) <= 1e-5
        else:  # randomized: a rank-6 approximation whose residual is within 1e-4 of the optimum
            optimum = (delta.double() - best_rank_r(delta, 6)).norm()
            assert (delta - got).norm() <= optimum * (1 + 1e-4)
        R = layer.lora_sb_R["default"].weight
        assert torch.equal(R, torch.diag(torch.diagonal(R))) and (torch.diagonal(R) > 0).all()  # R = diag(S)
    assert model.peft_config["default"].init == "gradient"


def test_sb_init_is_one_real_adam_step_of_the_full_model_projected_to_rank_r():
    """LoRA-SB's premise: with s = 1 the initial s·B R A is the best rank-r approximation of the first update of full
    fine-tuning. Oracle: a real first step of the full base model with torch.optim.Adam at lr_eff; Adam's first update
    is -lr_eff·g/(|g| + eps) (bias corrections cancel), i.e. -lr_eff·sign(g) up to the eps term."""
    gen = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(8, 64, generator=gen), "labels": torch.randint(0, 4, (8,), generator=gen)}

    def loss_fn(model, b):
        return nn.functional.cross_entropy(model(b["x"]), b["labels"], reduction="sum")

    lr, warmup_ratio, total_steps, r = 1e-2, 0.1, 10, 6
    lr_eff = lr / (warmup_ratio * total_steps)  # 1e-2: a large step keeps the float32 read-back W₁ − W₀ accurate
    base = tiny_mlp()
    model = get_peft_model(copy.deepcopy(base), LoraSBConfig(r=r, svd_niter=None, target_modules=MLP_TARGETS))
    lora_sb_init(model, [batch], num_samples=8, lr=lr, warmup_ratio=warmup_ratio, total_steps=total_steps,
                 loss_fn=loss_fn)
    for eps in (1e-12, 1e-8):
        full = copy.deepcopy(base).train()
        weights = [getattr(full, n).weight for n in MLP_TARGETS]
        before = [w.detach().clone() for w in weights]
        opt = torch.optim.Adam(weights, lr=lr_eff, eps=eps)
        (loss_fn(full, batch) / 8).backward()  # the estimator's loss / batch size on one batch of 8
        grads = [w.grad.clone() for w in weights]
        opt.step()
        for w, w0, g, layer in zip(weights, before, grads, lora_sb_layers(model)):
            real = (w.detach() - w0).double()
            best = best_rank_r(real, r)
            got = layer.get_delta_weight("default").double()
            if eps == 1e-12:
                # eps moves entries by <= eps/min|g| ~ 3e-6 of a step (min nonzero |g| ~ 4e-7 here): negligible.
                # Left: the float32 read-back of W₁ − W₀ (<= ulp(0.125)/2 = 7.5e-7 of a step) and float32 factors,
                # amplified by the rank-r truncation's gap factor σ_r/(σ_r − σ_r+1) (10–35 here); measured ~2e-6.
                assert rel_err(got, best) <= 1e-5
            else:
                # Adam's default eps moves entries with |g| ~ 1e-7 by up to eps/|g| ≈ 3% of a step, which the flat
                # spectrum amplifies elementwise; the Eckart–Young bound holds regardless: s·BRA = [Δ_sign]_r gives
                # ‖Δ − s·BRA‖ <= ‖Δ − [Δ]_r‖ + 2‖Δ − Δ_sign‖ (1e-6 relative margin for float32 rounding).
                sign = -lr_eff * torch.sign(g).double()
                bound = (real - best).norm() + 2 * (real - sign).norm() + 1e-6 * real.norm()
                assert (real - got).norm() <= bound
                assert (real - sign).abs().max() > 1e-3 * lr_eff  # the eps term is visible at this eps


def test_sb_bfloat16_factors_match_the_official_rounding():
    gen = torch.Generator().manual_seed(5)
    grads = {name: torch.randn(64, 64, generator=gen) for name in MLP_TARGETS}
    model = get_peft_model(tiny_mlp(), LoraSBConfig(r=6, svd_niter=None, factor_dtype="bfloat16",
                                                    target_modules=MLP_TARGETS))
    lora_sb_init(model, grads=grads, lr=1e-2)
    layer = lora_sb_layers(model)[0]
    for t in (layer.lora_sb_A["default"], layer.lora_sb_B["default"], layer.lora_sb_R["default"].weight):
        assert torch.equal(t, t.to(torch.bfloat16).float())  # values representable in bfloat16
    oracle = best_rank_r(-1e-2 * torch.sign(grads["lin0"]), 6).float()
    err = rel_err(layer.get_delta_weight("default"), oracle)
    assert 0 < err <= 2e-2  # three bf16 roundings (2**-8 relative each) of the factors


def test_estimated_gradient_is_the_sum_of_per_batch_gradients(mlp_inputs):
    torch.manual_seed(0)
    xs, ys = torch.randn(5, 64), torch.randint(0, 4, (5,))
    batches = [{"x": xs[:2], "labels": ys[:2]}, {"x": xs[2:4], "labels": ys[2:4]}, {"x": xs[4:], "labels": ys[4:]}]

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch["x"]), batch["labels"], reduction="sum")

    base = tiny_mlp()
    oracle = {n: torch.zeros(64, 64) for n in MLP_TARGETS}
    for batch, n in ((batches[0], 2), (batches[1], 1)):  # num_samples=3: the second batch is cut to one example
        ref = copy.deepcopy(base)
        part = {k: v[:n] for k, v in batch.items()}
        (loss_fn(ref, part) / n).backward()
        for name in MLP_TARGETS:
            oracle[name] += getattr(ref, name).weight.grad
    model = get_peft_model(copy.deepcopy(base), LoraSBConfig(r=4, init="svd", target_modules=MLP_TARGETS))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)  # a non-trivial adapter: the estimate must still be the base model's gradient
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = estimate_gradients(model, batches, num_samples=3, loss_fn=loss_fn)
    for name in MLP_TARGETS:
        assert torch.allclose(grads[name], oracle[name], rtol=1e-5, atol=1e-7)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(layer.disable_adapters for layer in lora_sb_layers(model))
    # and on the plain base model, by module name
    plain = estimate_gradients(copy.deepcopy(base), batches, num_samples=3, loss_fn=loss_fn, target_modules=MLP_TARGETS)
    assert all(torch.allclose(plain[n], grads[n], rtol=1e-6, atol=1e-8) for n in MLP_TARGETS)
    # Δ = -lr_eff·sign(ΣG) end to end
    updates = lora_sb_init(model, batches, num_samples=3, lr=2e-3, warmup_steps=4, loss_fn=loss_fn)
    for name in MLP_TARGETS:
        assert torch.equal(updates[name], -5e-4 * torch.sign(oracle[name]))


def test_effective_gradient_of_R_is_the_projected_weight_gradient(mlp_inputs):
    """∂L/∂R = s·Bᵀ (∂L/∂W) Aᵀ (chain rule), so an SGD step η on R moves W by -η·s²·B Bᵀ g_W Aᵀ A."""
    model = get_peft_model(tiny_mlp(), LoraSBConfig(r=6, lora_alpha=12, init="svd", target_modules=["lin0"]))
    layer = only_layer(model)
    with torch.no_grad():
        layer.lora_sb_R["default"].weight.normal_(0, 0.1)
    x = mlp_inputs
    model(x).pow(2).mean().backward()
    g_R = layer.lora_sb_R["default"].weight.grad.clone()
    # oracle: gradient w.r.t. the effective (merged) weight
    ref = tiny_mlp()
    W_eff = (layer.get_base_weight() + layer.get_delta_weight("default")).detach().requires_grad_(True)
    h = torch.relu(nn.functional.linear(x, W_eff, ref.lin0.bias))
    ref.head(ref.act(ref.lin1(h))).pow(2).mean().backward()
    g_W = W_eff.grad
    A, B, s = layer.lora_sb_A["default"], layer.lora_sb_B["default"], 2.0
    assert torch.allclose(g_R, s * B.T @ g_W @ A.T, rtol=1e-4, atol=1e-9)
    before = layer.get_delta_weight("default").detach().clone()
    torch.optim.SGD([layer.lora_sb_R["default"].weight], lr=0.5).step()
    moved = layer.get_delta_weight("default").detach() - before
    assert rel_err(moved, -0.5 * s * s * B @ B.T @ g_W @ A.T @ A) <= 1e-4


# ------------------------------------------------------------------------------------------- frozen A/B, training


def test_frozen_A_B_are_buffers_without_grad_or_optimizer_state(mlp_inputs):
    model = get_peft_model(tiny_mlp(), LoraSBConfig(r=4, init="svd", target_modules=MLP_TARGETS))
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    assert params == {f"base_model.model.{t}.lora_sb_R.default.weight" for t in MLP_TARGETS}
    buffers = {n: b.clone() for n, b in model.named_buffers() if "lora_sb_A" in n or "lora_sb_B" in n}
    assert len(buffers) == 4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(mlp_inputs).pow(2).mean().backward()
    opt.step()
    state_ids = {id(p) for p in opt.state}
    named = dict(model.named_parameters())
    assert state_ids == {id(named[n]) for n in params}
    for n, b in model.named_buffers():
        if n in buffers:
            assert not b.requires_grad and b.grad is None and torch.equal(b, buffers[n])


def test_merge_equals_unmerged_for_every_init(mlp_inputs):
    gen = torch.Generator().manual_seed(1)
    for kwargs in ({"init": "svd"}, {"init": "gradient"}, {"init": "gradient", "compensate": True, "lora_alpha": 3}):
        model = get_peft_model(tiny_mlp(), LoraSBConfig(r=6, target_modules=MLP_TARGETS, **kwargs))
        if kwargs["init"] == "gradient":
            lora_sb_init(model, grads={n: torch.randn(64, 64, generator=gen) for n in MLP_TARGETS}, lr=0.05)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            unmerged = model(mlp_inputs)
            model.merge_adapter()
            merged = model(mlp_inputs)
            model.unmerge_adapter()
            plain = copy.deepcopy(model).merge_and_unload()(mlp_inputs)
        assert rel_err(merged, unmerged) <= 1e-5 and rel_err(plain, unmerged) <= 1e-5, kwargs


def test_compensate_starts_at_the_base_and_keeps_the_gradient(mlp_inputs):
    base = tiny_mlp()
    with torch.no_grad():
        expected = base(mlp_inputs)
    grads = {n: torch.randn(64, 64, generator=torch.Generator().manual_seed(2)) for n in MLP_TARGETS}
    plain = get_peft_model(copy.deepcopy(base), LoraSBConfig(r=6, target_modules=MLP_TARGETS))
    comp = get_peft_model(copy.deepcopy(base), LoraSBConfig(r=6, compensate=True, target_modules=MLP_TARGETS))
    for m in (plain, comp):
        lora_sb_init(m, grads=grads, lr=0.1)
    with torch.no_grad():
        assert torch.equal(comp(mlp_inputs), expected)  # s·B (R - R0) A = 0 exactly
        assert not torch.allclose(plain(mlp_inputs), expected)  # the paper: W is not compensated
    for p_plain, p_comp in zip(lora_sb_layers(plain), lora_sb_layers(comp)):  # same factors, R0 = the initial R
        assert torch.equal(p_plain.lora_sb_A["default"], p_comp.lora_sb_A["default"])
        assert torch.equal(p_comp.lora_sb_R0["default"], p_plain.lora_sb_R["default"].weight)
        assert "default" not in p_plain.lora_sb_R0


def test_gradient_adapter_save_load_restores_the_data_driven_factors(tmp_path, mlp_inputs):
    model = get_peft_model(tiny_mlp(), LoraSBConfig(r=6, compensate=True, target_modules=MLP_TARGETS))
    lora_sb_init(model, grads={n: torch.randn(64, 64) for n in MLP_TARGETS}, lr=0.05)
    with torch.no_grad():
        for layer in lora_sb_layers(model):
            layer.lora_sb_R["default"].weight.add_(0.01)
        expected = model(mlp_inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_mlp(), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].init == "gradient"
    with torch.no_grad():
        assert torch.equal(loaded(mlp_inputs), expected)
    assert not any(layer.lora_sb_pending["default"] for layer in lora_sb_layers(loaded))
    loaded.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loaded adapter is final: no "lora_sb_init has not run" warning
        loaded(mlp_inputs)


def test_training_before_lora_sb_init_warns(mlp_inputs):
    model = get_peft_model(tiny_mlp(), LoraSBConfig(r=4, target_modules=MLP_TARGETS))
    model.train()
    with pytest.warns(UserWarning, match="lora_sb_init"):
        model(mlp_inputs)
    lora_sb_init(model, grads={n: torch.randn(64, 64) for n in MLP_TARGETS}, lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(mlp_inputs)


def test_trainer_flow_with_lora_sb_init_decreases_the_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    ids = torch.randint(0, 8, (8, 16))  # a skewed token distribution the adapter can learn in a few steps
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = get_peft_model(tiny_llama(), LoraSBConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj",
                                                                         "up_proj", "down_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=20,
                             learning_rate=5e-2, warmup_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    updates = lora_sb_init_from_trainer(trainer, num_samples=4)
    assert all(torch.allclose(u[u != 0].abs(), torch.tensor(5e-2 / 2)) for u in updates.values())  # lr / warmup
    frozen = {n: b.clone() for n, b in model.named_buffers() if "lora_sb_" in n}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=PENDING_WARNING[:40])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    named = dict(model.named_parameters())
    assert {id(p) for p in trainer.optimizer.state} <= {id(p) for n, p in named.items() if "lora_sb_R" in n}


def test_quantized_base_rejects_gradient_estimation_but_accepts_grads(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    q = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                         dtype=torch.float32)
    model = get_peft_model(q, LoraSBConfig(r=4, target_modules=["q_proj"]))
    batch = [{"input_ids": torch.randint(0, 128, (2, 8)), "labels": torch.randint(0, 128, (2, 8))}]
    with pytest.raises(ValueError, match="quantized"):
        lora_sb_init(model, batch, lr=1e-3)
    grads = estimate_gradients(tiny_llama(), batch, target_modules=["q_proj"])  # on an unquantized copy
    lora_sb_init(model, grads=grads, lr=1e-3)
    for name, layer in zip(sorted(grads), lora_sb_layers(model)):
        assert rel_err(layer.get_delta_weight("default"), best_rank_r(-1e-3 * torch.sign(grads[name]), 4).float()) < 0.1


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"init": "pissa"}, "init"),
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"factor_dtype": "float16"}, "factor_dtype"),
        ({"svd_niter": -1}, "svd_niter"),
        ({"svd_oversample": -2}, "svd_oversample"),
        ({"r_init_std": -0.1}, "r_init_std"),
        ({"seed": -1}, "seed"),
        ({"compensate": "yes"}, "compensate"),
        ({"init_weights": "no"}, "init_weights"),
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"r_init_std": float("inf")}, "r_init_std"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraSBConfig\.{field} must be"):
        LoraSBConfig(target_modules=["lin0"], **kwargs)


def test_aliases_and_rank_larger_than_the_layer():
    assert LoraSBConfig(init="XS").init == "svd" and LoraSBConfig(init="sb").init == "gradient"
    with pytest.raises(ValueError, match=r"LoraSBConfig\.r must be .*min\(in_features, out_features\) = 4"):
        get_peft_model(tiny_mlp(), LoraSBConfig(r=8, target_modules=["head"]))


def test_bad_init_arguments_raise():
    model = get_peft_model(tiny_mlp(), LoraSBConfig(r=4, target_modules=MLP_TARGETS))
    grads = {n: torch.randn(64, 64) for n in MLP_TARGETS}
    with pytest.raises(ValueError, match="lr is required"):
        lora_sb_init(model, grads=grads)
    with pytest.raises(ValueError, match="total_steps"):
        lora_sb_init(model, grads=grads, lr=1e-3, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="grads has no entry"):
        lora_sb_init(model, grads={"lin0": grads["lin0"]}, lr=1e-3)
    with pytest.raises(ValueError, match="num_samples"):
        lora_sb_init(model, [{"x": torch.randn(2, 64)}], num_samples=0, lr=1e-3)
    with pytest.raises(ValueError, match="not a LoRA-SB adapter"):
        lora_sb_init(model, grads=grads, lr=1e-3, adapter_name="nope")
    assert effective_lr(1e-3, 0.06, 1000) == pytest.approx(1e-3 / 60)


def test_bfloat16_base_keeps_float32_factors_and_exact_compensation(mlp_inputs):
    base = tiny_mlp().to(torch.bfloat16)
    x = mlp_inputs.to(torch.bfloat16)
    with torch.no_grad():
        expected = base(x)
    model = get_peft_model(copy.deepcopy(base), LoraSBConfig(r=6, compensate=True, target_modules=MLP_TARGETS))
    lora_sb_init(model, grads={n: torch.randn(64, 64) for n in MLP_TARGETS}, lr=0.05)
    layer = lora_sb_layers(model)[0]
    assert layer.lora_sb_A["default"].dtype == torch.float32 and layer.lora_sb_B["default"].dtype == torch.float32
    assert layer.lora_sb_R["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_copy_factors_into_a_parameter_copied_reference_adapter(mlp_inputs):
    """TRL clones an adapter by add_adapter + copying parameters; the data-driven buffers need copy_lora_sb_factors."""
    from peft_ext.init.lora_sb import copy_lora_sb_factors

    model = get_peft_model(tiny_mlp(), LoraSBConfig(r=6, target_modules=MLP_TARGETS))
    lora_sb_init(model, grads={n: torch.randn(64, 64) for n in MLP_TARGETS}, lr=0.05)
    with torch.no_grad():
        expected = model(mlp_inputs)
    model.add_adapter("ref", model.peft_config["default"])
    copy_lora_sb_factors(model, "default", "ref")
    model.set_adapter("ref")
    with torch.no_grad():
        assert torch.equal(model(mlp_inputs), expected)


@pytest.mark.parametrize("compensate", [False, True])
def test_low_cpu_mem_usage_loading_reproduces_the_adapter(tmp_path, mlp_inputs, compensate):
    # PeftModel.from_pretrained(..., low_cpu_mem_usage=True) creates the adapter on the meta device and fills it from
    # the file: the frozen buffers A, B (and R₀) must not be left on meta nor copied out of it (which raised before)
    cfg = LoraSBConfig(r=4, init="svd", init_weights=False, compensate=compensate, target_modules=MLP_TARGETS)
    model = get_peft_model(tiny_mlp(), cfg)
    with torch.no_grad():
        expected = model(mlp_inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_mlp(), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    with torch.no_grad():
        assert torch.equal(loaded(mlp_inputs), expected)
