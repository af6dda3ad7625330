"""ALLoRA (https://arxiv.org/abs/2410.09692) against hand computations of c_i = 1/sqrt(‖θ_i‖² + 1/η²) and AdamW."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from conftest import tiny_mlp
from peft_ext.optim.allora import (
    ALLoRA,
    allora_lora_config,
    allora_multiplier,
    create_allora_optimizer,
    is_lora_param_name,
)


@pytest.mark.parametrize("eta", [0.5, 2.0, 10.0])
def test_multiplier_is_eta_at_zero_row(eta):
    theta = torch.zeros(3, 5)
    theta[1] = 1.0  # one non-zero row: its multiplier must differ, the zero rows' must be exactly eta
    c = allora_multiplier(theta, eta=eta, row_dim=0)
    assert c.shape == (3, 1)
    assert c[0].item() == pytest.approx(eta, rel=1e-6)
    assert c[2].item() == pytest.approx(eta, rel=1e-6)
    assert c[1].item() == pytest.approx(1 / math.sqrt(5 + 1 / eta**2), rel=1e-6)


@pytest.mark.parametrize("norm", [1e2, 1e3, 1e4])
def test_multiplier_tends_to_inverse_norm(norm):
    eta = 2.0
    theta = torch.randn(4, 16, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True) * norm  # every row has norm `norm`
    c = allora_multiplier(theta, eta=eta, row_dim=0).squeeze(1)
    # exact: c·‖θ‖ = 1/sqrt(1 + 1/(η‖θ‖)²) ≈ 1 - 1/(2η²‖θ‖²)
    bound = 1 / (2 * eta**2 * norm**2)
    assert torch.all((c * norm - 1).abs() <= bound * 1.01 + 1e-12)
    assert torch.all((c * norm - 1).abs() <= 2e-5)


def test_multiplier_row_dim_options():
    theta = torch.randn(3, 5)
    by_col = allora_multiplier(theta, eta=2.0, row_dim=1)
    assert by_col.shape == (1, 5)
    torch.testing.assert_close(by_col.squeeze(0), torch.rsqrt(theta.pow(2).sum(0) + 0.25))
    whole = allora_multiplier(theta, eta=2.0, row_dim=None)
    torch.testing.assert_close(whole, torch.rsqrt(theta.pow(2).sum() + 0.25))
    with pytest.raises(ValueError):
        allora_multiplier(theta, eta=0.0)


def test_lora_param_names():
    assert is_lora_param_name("base_model.model.lin0.lora_A.default.weight")
    assert is_lora_param_name("base_model.model.lin0.lora_B.default.weight")
    assert is_lora_param_name("base_model.model.emb.lora_embedding_A.default")
    assert not is_lora_param_name("base_model.model.lin1.modules_to_save.default.weight")
    assert not is_lora_param_name("base_model.model.lin0.base_layer.weight")


def lora_mlp(seed=0):
    model = get_peft_model(
        tiny_mlp(seed), allora_lora_config(r=4, target_modules=["lin0"], modules_to_save=["head"])
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero A and B so that both factors get gradients and rows of different norms
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def set_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen)


def hand_adamw(p, grads, lr, betas, eps, wd):
    """AdamW (decoupled weight decay, bias correction) on the given per-step gradients (callables of p)."""
    p = p.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, grad_fn in enumerate(grads, start=1):
        g = grad_fn(p)
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def test_two_steps_equal_hand_computation():
    eta, lr, betas, eps, wd = 2.0, 0.05, (0.9, 0.99), 1e-8, 0.1
    model = lora_mlp()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in named.items()}
    gen = torch.Generator().manual_seed(3)
    raw = [{n: torch.randn(p.shape, generator=gen) for n, p in named.items()} for _ in range(2)]

    opt = create_allora_optimizer(model, lr=lr, eta=eta, betas=betas, eps=eps, weight_decay=wd)
    for step_grads in raw:
        for n, p in named.items():
            p.grad = step_grads[n].clone()
        opt.step()
        for n, p in named.items():  # the caller's gradients are left untouched
            assert torch.equal(p.grad, step_grads[n])

    for n, p in named.items():
        if is_lora_param_name(n):
            # c recomputed from the current θ (rows = dim 0) before each step
            grads = [lambda q, g=g[n]: g * torch.rsqrt(q.pow(2).sum(1, keepdim=True) + 1 / eta**2) for g in raw]
        else:
            grads = [lambda q, g=g[n]: g for g in raw]
        expected = hand_adamw(start[n], grads, lr, betas, eps, wd)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=n)


def test_scaling_changes_the_update():
    """With c frozen at state init the second step would differ: check the recomputed c is what is used."""
    eta, lr = 2.0, 0.1
    model = lora_mlp()
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    p0 = p.detach().clone()
    g1, g2 = torch.randn_like(p), torch.randn_like(p)
    opt = create_allora_optimizer(model, lr=lr, eta=eta, weight_decay=0.0)
    for g in (g1, g2):
        for q in model.parameters():
            q.grad = None
        p.grad = g.clone()
        opt.step()
    c = lambda q: torch.rsqrt(q.pow(2).sum(1, keepdim=True) + 1 / eta**2)  # noqa: E731
    frozen_c = c(p0)
    stale = hand_adamw(p0, [lambda q: g1 * frozen_c, lambda q: g2 * frozen_c], lr, (0.9, 0.999), 1e-8, 0.0)
    fresh = hand_adamw(p0, [lambda q: g1 * c(q), lambda q: g2 * c(q)], lr, (0.9, 0.999), 1e-8, 0.0)
    torch.testing.assert_close(p.detach(), fresh, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stale, fresh, rtol=1e-4, atol=1e-5)


def test_non_lora_parameters_are_plain_adamw():
    lr, wd = 0.01, 0.05
    model = lora_mlp()
    twin = lora_mlp()
    set_grads(model, 11)
    set_grads(twin, 11)
    opt = create_allora_optimizer(model, lr=lr, eta=2.0, weight_decay=wd)
    assert [g["allora"] for g in opt.param_groups] == [True, False]
    assert all(is_lora_param_name(n) for n in opt.param_groups[0]["param_names"])
    assert not any(is_lora_param_name(n) for n in opt.param_groups[1]["param_names"])
    ref_params = [p for n, p in twin.named_parameters() if p.requires_grad and not is_lora_param_name(n)]
    ref = torch.optim.AdamW(ref_params, lr=lr, weight_decay=wd)
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    ref.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if not p.requires_grad:
            continue
        assert torch.equal(p.grad, grads_before[n])  # gradients untouched, LoRA ones included
        if not is_lora_param_name(n):
            assert torch.equal(p.detach(), q.detach()), n
        else:
            assert not torch.equal(p.detach(), q.detach()), n


def test_plain_params_and_dict_row_dim():
    a = nn.Parameter(torch.randn(4, 6))
    opt = ALLoRA([a], lr=0.1, eta=3.0, row_dim=None, weight_decay=0.0)
    assert opt.param_groups[0]["allora"] is True
    g = torch.randn(4, 6)
    a0 = a.detach().clone()
    a.grad = g.clone()
    opt.step()
    c = torch.rsqrt(a0.pow(2).sum() + 1 / 9)
    expected = hand_adamw(a0, [lambda q: g * c], 0.1, (0.9, 0.999), 1e-8, 0.0)
    torch.testing.assert_close(a.detach(), expected)

    model = lora_mlp()
    opt = create_allora_optimizer(model, lr=0.1, row_dim={"lora_A": 0, "lora_B": 1}, weight_decay=0.0)
    set_grads(model, 5)
    b_name, b = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    b0, gb = b.detach().clone(), b.grad.clone()
    opt.step()
    c = torch.rsqrt(b0.pow(2).sum(0, keepdim=True) + 0.25)  # columns of B (rank components)
    expected = hand_adamw(b0, [lambda q: gb * c], 0.1, (0.9, 0.999), 1e-8, 0.0)
    torch.testing.assert_close(b.detach(), expected)


def test_closure_and_state_dict_roundtrip():
    model = lora_mlp()
    opt = create_allora_optimizer(model, lr=0.01)
    x = torch.randn(5, 64)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    sd = opt.state_dict()
    opt2 = create_allora_optimizer(model, lr=0.01)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["allora"] is True and opt2.param_groups[0]["eta"] == 2.0


def test_no_lora_params_raises():
    with pytest.raises(ValueError, match="no trainable LoRA"):
        create_allora_optimizer(tiny_mlp(), lr=0.1)


def test_preset_has_no_dropout_and_unit_scaling():
    cfg = allora_lora_config(r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2})
    assert isinstance(cfg, LoraConfig)
    assert cfg.lora_dropout == 0.0 and cfg.lora_alpha == 4 and not cfg.use_rslora
    model = get_peft_model(tiny_mlp(), cfg)
    for layer in (model.base_model.model.lin0, model.base_model.model.lin1):
        assert layer.scaling["default"] == 1.0
        assert isinstance(layer.lora_dropout["default"], nn.Identity)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B = 0 at init
    assert model.base_model.model.lin1.r["default"] == 2
    assert allora_lora_config().r == 8 and allora_lora_config().lora_alpha == 8


@pytest.mark.parametrize(
    "kwargs", [{"lora_dropout": 0.1}, {"r": 8, "lora_alpha": 16}, {"use_rslora": True}, {"alpha_pattern": {"x": 2}}]
)
def test_preset_rejects_conflicts(kwargs):
    with pytest.raises(ValueError):
        allora_lora_config(**kwargs)


def test_trains_a_tiny_model():
    torch.manual_seed(0)
    model = get_peft_model(tiny_mlp(), allora_lora_config(r=4, target_modules=["lin0", "lin1"]))
    x, y = torch.randn(32, 64), torch.randint(0, 4, (32,))
    opt = create_allora_optimizer(model, lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------- apply_to


def test_grad_mode_constant_factor_cancels_update_mode_does_not():
    """Under Adam a per-row factor that is constant over time cancels: a zero row of B (c = η) takes the plain AdamW
    first step with apply_to="grad", and η times that step with apply_to="update"."""
    eta, lr = 3.0, 0.01
    b = torch.zeros(6, 4)  # zero rows: c = η exactly
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    steps = {}
    for mode in ("plain", "grad", "update"):
        p = nn.Parameter(b.clone())
        opt = (torch.optim.AdamW([p], lr=lr, weight_decay=0.0) if mode == "plain"
               else ALLoRA([p], lr=lr, eta=eta, weight_decay=0.0, apply_to=mode))
        p.grad = g.clone()
        opt.step()
        assert torch.equal(p.grad, g)  # the caller's gradient is left untouched in both modes
        steps[mode] = p.detach().clone()
    # Adam's first step is lr·g/(|g| + eps): with |g| ~ 1 scaling g by η changes it by ~eps/|g| relative (≤ 1e-6 here)
    torch.testing.assert_close(steps["grad"], steps["plain"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(steps["update"], eta * steps["plain"], rtol=1e-6, atol=1e-9)
    # the plain first step is lr in every coordinate (−lr·sign(g)), so "update" moved η·lr, "grad" lr
    torch.testing.assert_close(steps["plain"].abs(), torch.full_like(b, lr), rtol=1e-5, atol=0)


def test_update_mode_two_steps_equal_hand_computation():
    eta, lr, betas, eps, wd = 2.0, 0.05, (0.9, 0.99), 1e-8, 0.1
    model = lora_mlp()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in named.items()}
    gen = torch.Generator().manual_seed(4)
    raw = [{n: torch.randn(p.shape, generator=gen) for n, p in named.items()} for _ in range(2)]
    opt = create_allora_optimizer(model, lr=lr, eta=eta, betas=betas, eps=eps, weight_decay=wd, apply_to="update")
    assert opt.param_groups[0]["apply_to"] == "update"
    for step_grads in raw:
        for n, p in named.items():
            p.grad = step_grads[n].clone()
        opt.step()
    for n, p in named.items():
        q = start[n].clone()
        m, v = torch.zeros_like(q), torch.zeros_like(q)
        for t, grads in enumerate(raw, start=1):
            g = grads[n]
            c = torch.rsqrt(q.pow(2).sum(1, keepdim=True) + 1 / eta**2) if is_lora_param_name(n) else 1.0
            m = betas[0] * m + (1 - betas[0]) * g
            v = betas[1] * v + (1 - betas[1]) * g * g
            adam = q * (1 - lr * wd) - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
            q = q + c * (adam - q)  # the row's whole AdamW step (update and weight decay) times c_i
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6, msg=n)
    # and it is not the gradient-scaling result
    grad_model = lora_mlp()
    grad_opt = create_allora_optimizer(grad_model, lr=lr, eta=eta, betas=betas, eps=eps, weight_decay=wd)
    gnamed = {n: p for n, p in grad_model.named_parameters() if p.requires_grad}
    for step_grads in raw:
        for n, p in gnamed.items():
            p.grad = step_grads[n].clone()
        grad_opt.step()
    lora_b = next(n for n in named if "lora_B" in n)
    assert not torch.allclose(named[lora_b], gnamed[lora_b], rtol=1e-3, atol=1e-4)


def test_apply_to_is_validated():
    with pytest.raises(ValueError, match="apply_to"):
        ALLoRA([nn.Parameter(torch.zeros(2, 2))], apply_to="weights")
    with pytest.raises(ValueError, match="apply_to"):
        create_allora_optimizer(lora_mlp(), lr=0.1, apply_to="both")
