"""LoRA-Pro optimizer (METHODS.md 5.1): linear-algebra identities against independent float64 oracles, exact parity of
the optimizer with a hand computation of steps 1-4 (t=0 and t>0), training, state-dict round trip, AdamW fallback."""

from __future__ import annotations

import copy
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from peft import LoraConfig, get_peft_model  # noqa: E402

from peft_ext.optim.lorapro import (  # noqa: E402
    LoraProAdamW,
    create_lorapro_optimizer,
    equivalent_gradient,
    factor_updates,
    solve_sylvester_sym,
)

M, N, R, S = 12, 10, 3, 2.0
D = torch.float64


# ---------------------------------------------------------------- independent oracles (float64, explicit inverses)


def proj_B(B):
    return B @ torch.linalg.inv(B.T @ B) @ B.T


def proj_A(A):
    return A.T @ torch.linalg.inv(A @ A.T) @ A


def kron_sylvester(P, Q, C):
    """Solve P X + X Q = C via the Kronecker form (I⊗P + Qᵀ⊗I) vec(X) = vec(C), column-major vec."""
    r, k = C.shape
    K = torch.kron(torch.eye(k, dtype=C.dtype), P) + torch.kron(Q.T.contiguous(), torch.eye(r, dtype=C.dtype))
    x = torch.linalg.solve(K, C.T.reshape(-1))
    return x.reshape(k, r).T


def oracle_pair_step(A, B, gA, gB, s, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8, delta=1e-8, delta3=0.0):
    """Steps 1-4 of METHODS.md 5.1 written out literally (float64). ``t`` is the 0-based step index; ``delta3`` is the
    δ of the step-3 inverses (0: the paper; the official code reuses ``delta``). Returns the new (A, B, m, v)."""
    A, B, gA, gB, m, v = (x.to(D) for x in (A, B, gA, gB, m, v))
    Ir = torch.eye(A.shape[0], dtype=D)
    Im = torch.eye(B.shape[0], dtype=D)
    # 1. equivalent gradient
    if t == 0:
        hA = gA
        hB = gB @ torch.linalg.inv(A @ A.T + delta * Ir) / s**2
    else:
        iBB = torch.linalg.inv(B.T @ B + delta * Ir)
        hA = iBB @ gA / s**2
        hB = (Im - B @ iBB @ B.T) @ gB @ torch.linalg.inv(A @ A.T + delta * Ir) / s**2
    gt = s * B @ hA + s * hB @ A
    # 2. Adam
    b1, b2 = betas
    m = b1 * m + (1 - b1) * gt
    v = b2 * v + (1 - b2) * gt * gt
    u = (m / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + eps)
    # 3. back to factors
    gA2, gB2 = s * B.T @ u, s * u @ A.T
    iAA3 = torch.linalg.inv(A @ A.T + delta3 * Ir)
    if t == 0:
        dA, dB = gA2, gB2 @ iAA3 / s**2
    else:
        iBB3 = torch.linalg.inv(B.T @ B + delta3 * Ir)
        X = kron_sylvester(B.T @ B, A @ A.T, -iBB3 @ gA2 @ A.T / s**2)
        dA = iBB3 @ gA2 / s**2 + X @ A
        dB = (Im - B @ iBB3 @ B.T) @ gB2 @ iAA3 / s**2 - B @ X
    # 4. SGD on the factors
    return A - lr * dA, B - lr * dB, m, v


def rand_factors(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(R, N, generator=g, dtype=D)
    B = torch.randn(M, R, generator=g, dtype=D)
    G = torch.randn(M, N, generator=g, dtype=D)
    return A, B, G


# ---------------------------------------------------------------- (a) equivalent gradient


def test_equivalent_gradient_is_tangent_projection():
    A, B, G = rand_factors()
    gA, gB = S * B.T @ G, S * G @ A.T
    # δ = 1e-14 against eigenvalues of BᵀB, AAᵀ that are O(10): relative perturbation ~1e-15, so 1e-10 is generous
    # float64 round-off for a few chained r×r inverses and m×n products.
    gt = equivalent_gradient(A, B, gA, gB, S, delta=1e-14, first=False)
    PB, PA = proj_B(B), proj_A(A)
    expected = PB @ G + (torch.eye(M, dtype=D) - PB) @ G @ PA
    torch.testing.assert_close(gt, expected, rtol=1e-10, atol=1e-10)
    # t = 0 case: g̃ = s²·BBᵀg + g·P_A (δ→0); with the PEFT init B = 0 this is g·P_A.
    gt0 = equivalent_gradient(A, B, gA, gB, S, delta=1e-14, first=True)
    torch.testing.assert_close(gt0, S**2 * B @ B.T @ G + G @ PA, rtol=1e-10, atol=1e-10)
    Z = torch.zeros_like(B)
    gt0z = equivalent_gradient(A, Z, S * Z.T @ G, gB, S, delta=1e-14, first=True)
    torch.testing.assert_close(gt0z, G @ PA, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- (b) Sylvester


def test_sylvester_solver_residual_and_kronecker_oracle():
    g = torch.Generator().manual_seed(1)
    for r in (1, 3, 8):
        Bm = torch.randn(M, r, generator=g, dtype=D)
        Am = torch.randn(r, N, generator=g, dtype=D)
        P, Q = Bm.T @ Bm, Am @ Am.T
        C = torch.randn(r, r, generator=g, dtype=D)
        X = solve_sylvester_sym(P, Q, C)
        # float64, well-conditioned r×r (eigenvalues O(1..30)): residual at round-off level, 1e-10 absolute.
        torch.testing.assert_close(P @ X + X @ Q, C, rtol=0, atol=1e-10)
        torch.testing.assert_close(X, kron_sylvester(P, Q, C), rtol=1e-9, atol=1e-10)
    # float32 input is solved in float64 internally and returned as float32 (residual at fp32 round-off, ~1e-5).
    X32 = solve_sylvester_sym(P.float(), Q.float(), C.float())
    assert X32.dtype == torch.float32
    torch.testing.assert_close(P.float() @ X32 + X32 @ Q.float(), C.float(), rtol=0, atol=1e-4)


def test_factor_update_sylvester_residual():
    A, B, U = rand_factors(2)
    BtB, AAt = B.T @ B, A @ A.T
    gA2 = S * B.T @ U
    iBB = torch.linalg.inv(BtB)
    dA, dB = factor_updates(A, B, U, S, first=False)
    # Recover X from grad_B = s⁻²(I−P_B)g_B''(AAᵀ)⁻¹ − B·X  ->  X = −(BᵀB)⁻¹Bᵀ grad_B (Bᵀ(I−P_B) = 0).
    X = -iBB @ B.T @ dB
    resid = BtB @ X + X @ AAt + iBB @ gA2 @ A.T / S**2
    assert resid.abs().max() < 1e-10  # float64 round-off
    torch.testing.assert_close(dA, iBB @ gA2 / S**2 + X @ A, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- (c) what the factor update guarantees


def test_factor_update_reproduces_projected_update():
    """The construction guarantees, for *any* X, the linear part s·(B·ΔA + ΔB·A) = −lr·[P_B u + (I−P_B) u P_A]
    exactly (t>0); the true ΔW only adds the second-order term s·ΔB·ΔA. The Sylvester X is the one minimising
    ‖grad_A‖² + ‖grad_B‖²."""
    A, B, U = rand_factors(3)
    lr = 1e-3
    dA, dB = factor_updates(A, B, U, S, first=False)
    PB, PA = proj_B(B), proj_A(A)
    target = PB @ U + (torch.eye(M, dtype=D) - PB) @ U @ PA
    DA, DB = -lr * dA, -lr * dB
    torch.testing.assert_close(S * (B @ DA + DB @ A), -lr * target, rtol=1e-10, atol=1e-12)
    dW = S * ((B + DB) @ (A + DA) - B @ A)
    torch.testing.assert_close(dW, -lr * target + S * DB @ DA, rtol=1e-10, atol=1e-12)
    # optimality of X: any perturbation X -> X + E (grad_A += E·A, grad_B −= B·E) keeps the identity, raises the norm
    g = torch.Generator().manual_seed(4)
    base = dA.square().sum() + dB.square().sum()
    for _ in range(5):
        E = 1e-3 * torch.randn(R, R, generator=g, dtype=D)
        assert (dA + E @ A).square().sum() + (dB - B @ E).square().sum() > base
    # t = 0: s·(B·grad_A + grad_B·A) = s²·BBᵀu + u·P_A, i.e. u·P_A for B = 0
    dA0, dB0 = factor_updates(A, B, U, S, first=True)
    torch.testing.assert_close(S * (B @ dA0 + dB0 @ A), S**2 * B @ B.T @ U + U @ PA, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- tiny PEFT model


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 16)
        self.lin1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def make_model(seed=0, modules_to_save=None, **lora_kwargs):
    torch.manual_seed(seed)
    kwargs = dict(r=R, lora_alpha=2 * R, target_modules=["lin0", "lin1"], lora_dropout=0.0,
                  modules_to_save=modules_to_save)
    kwargs.update(lora_kwargs)
    return get_peft_model(MLP(), LoraConfig(**kwargs))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def loss_fn(model, seed):
    x, y = batch(seed)
    return (model(x) - y).pow(2).mean()


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_pairing_by_module_and_scaling():
    model = make_model(modules_to_save=["head"])
    opt = LoraProAdamW(model, lr=1e-3)
    layers = lora_layers(model)
    assert len(opt.pairs) == len(layers) == 2
    for pair, layer in zip(opt.pairs, layers):
        assert pair.A is layer.lora_A["default"].weight and pair.B is layer.lora_B["default"].weight
        assert pair.scaling == S
    assert [g["lorapro"] for g in opt.param_groups] == [True, False]
    assert all("lr" in g for g in opt.param_groups)
    head = {id(p) for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad}
    assert head and head == {id(p) for p in opt.param_groups[1]["params"]}
    with pytest.raises(ValueError):
        LoraProAdamW(MLP(), lr=1e-3)  # no LoRA layer


# ---------------------------------------------------------------- (d) parity with the hand computation


PARITY_CASES = {
    # name: (LoraConfig overrides, the scaling they must give (computed here, not read from PEFT), optimizer kwargs,
    #        atol on the parameters). The optimizer computes in fp32; its error against the fp64 oracle is fp32
    #        round-off amplified by (BᵀB)⁻¹ at t=1, where B is small: measured ~1.4e-7 (paper, official_delta) and
    #        ~7.7e-6 for rsLoRA r=4 (λ_min(BᵀB) ≈ 3e-5 there); the same library formulas run in float64 agree with the
    #        oracle to 1e-14. Each atol is ~4-7x the measured error and far below the per-step change (~1e-2); a wrong
    #        scaling (rsLoRA read as α/r = 2 instead of α/√r = 4) moves the result by ~1e-2.
    "paper": ({}, S, {}, 1e-6),
    "rslora": ({"r": 4, "lora_alpha": 8, "use_rslora": True}, 8 / 4**0.5, {}, 3e-5),
    "official_delta": ({}, S, {"delta": 1e-3, "official_delta": True}, 1e-6),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_two_steps_match_hand_computation(case):
    lora_kwargs, s, opt_kwargs, atol = PARITY_CASES[case]
    lr = 1e-2
    model = make_model(**lora_kwargs)
    opt = create_lorapro_optimizer(model, lr=lr, **opt_kwargs)
    assert [pair.scaling for pair in opt.pairs] == [s, s]
    delta = opt_kwargs.get("delta", 1e-8)
    delta3 = delta if opt_kwargs.get("official_delta") else 0.0
    layers = lora_layers(model)
    oracle = {}
    for t in range(3):
        opt.zero_grad()
        loss_fn(model, seed=10 + t).backward()
        before = []
        for layer in layers:
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            mv = oracle.get(id(layer), (torch.zeros(B.shape[0], A.shape[1], dtype=D),) * 2)
            before.append((layer, oracle_pair_step(A.detach(), B.detach(), A.grad, B.grad, s, *mv, t=t, lr=lr,
                                                   delta=delta, delta3=delta3)))
        opt.step()
        for layer, (A1, B1, m1, v1) in before:
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            oracle[id(layer)] = (m1, v1)
            if t == 0:  # PEFT init B = 0, so at t = 0 grad_A = s·Bᵀu = 0 and A must not move
                torch.testing.assert_close(A.detach().to(D), A1, rtol=0, atol=0)
            # fp32 optimizer vs fp64 oracle from the same fp32 grads/params: tolerances in PARITY_CASES
            torch.testing.assert_close(A.detach().to(D), A1, rtol=1e-5, atol=atol)
            torch.testing.assert_close(B.detach().to(D), B1, rtol=1e-5, atol=atol)
            st = opt.state[layer.lora_A["default"].weight]
            torch.testing.assert_close(st["exp_avg"].to(D), m1, rtol=1e-4, atol=1e-7)
            assert int(st["step"]) == t + 1
        # keep the oracle on the optimizer's trajectory so that fp32 drift does not accumulate across steps
    assert all(len(opt.state[layer.lora_B["default"].weight]) == 0 for layer in layers)


# ---------------------------------------------------------------- (e) training decreases the loss


def test_training_loop_decreases_loss():
    torch.manual_seed(0)
    model = make_model(seed=1)
    x = torch.randn(64, 16)
    with torch.no_grad():
        y = model(x) + 0.5 * torch.tanh(x[:, :4] @ torch.randn(4, 4))  # realisable-ish shift of the base output
    opt = LoraProAdamW(model, lr=5e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_works_with_lr_scheduler():
    model = make_model()
    opt = LoraProAdamW(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [5e-3]
    loss_fn(model, 0).backward()
    opt.step()
    sched.step()


# ---------------------------------------------------------------- (f) state-dict round trip


def test_state_dict_round_trip():
    model = make_model(modules_to_save=["head"])
    opt = LoraProAdamW(model, lr=1e-2, weight_decay=0.01)
    for t in range(2):
        opt.zero_grad()
        loss_fn(model, 20 + t).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2 = make_model(seed=123, modules_to_save=["head"])  # different init, overwritten by the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2 = LoraProAdamW(model2, lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(ckpt["opt"])
    for t in range(2, 4):
        for mdl, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            loss_fn(mdl, 20 + t).backward()
            o.step()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert n1 == n2
        assert torch.equal(p1, p2), n1  # same arithmetic on the same numbers: bit-identical


# ---------------------------------------------------------------- (g) non-LoRA params get AdamW


def test_non_lora_params_use_adamw():
    model = make_model(modules_to_save=["head"])
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    ref = [p.detach().clone().requires_grad_(True) for p in head]
    opt = LoraProAdamW(model, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    before = [p.detach().clone() for p in head]
    for t in range(3):
        opt.zero_grad()
        loss_fn(model, 30 + t).backward()
        for p, q in zip(head, ref):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(head, ref):
            # same formula as torch.optim.AdamW (single-tensor path) in fp32; allow 1 ulp-level differences
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(p, b) for p, b in zip(head, before))


def test_bias_and_deepcopy_pairing_is_per_model():
    model = make_model()
    clone = copy.deepcopy(model)
    opt = LoraProAdamW(clone, lr=1e-3)
    own = {id(p) for p in clone.parameters()}
    assert all(id(p) in own for g in opt.param_groups for p in g["params"])


def test_dylora_declares_its_ba_shape_and_lorapro_trains_it():
    """LoRA-Pro pairs every peft-ext tuner whose spec declares ``ba_shape`` (DyLoRA at its full rank)."""
    import peft_ext
    from peft import get_peft_model
    from peft_ext.optim.lorapro import LoraProAdamW, find_lora_pairs
    from peft_ext.tuners.dylora import DyLoraLayer

    assert [s.name for s in peft_ext.list_methods() if s.ba_shape] == ["dylora"]
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
        peft_ext.DyLoraConfig(r=3, lora_alpha=6, target_modules=["0"]),
    )
    pairs = find_lora_pairs(model)
    layer = next(m for m in model.modules() if isinstance(m, DyLoraLayer))
    assert len(pairs) == 1 and pairs[0].A is layer.dylora_down["default"].weight and pairs[0].scaling == 2.0
    opt = LoraProAdamW(model, lr=1e-2)
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    losses = []
    for _ in range(20):
        loss = (model(x) - y).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    layer.set_rank("default", 2, training_only=True)
    model.train()
    with pytest.raises(ValueError, match="full rank"):
        opt.step()


# ---------------------------------------------------------------- (h) δ in step 3 (official_delta)


def test_factor_update_with_delta_matches_regularised_oracle():
    A, B, U = rand_factors(5)
    delta = 0.5  # large on purpose: eigenvalues of BᵀB, AAᵀ are O(10), so the difference is far above round-off
    Ir = torch.eye(R, dtype=D)
    iBB, iAA = torch.linalg.inv(B.T @ B + delta * Ir), torch.linalg.inv(A @ A.T + delta * Ir)
    gA2, gB2 = S * B.T @ U, S * U @ A.T
    X = kron_sylvester(B.T @ B, A @ A.T, -iBB @ gA2 @ A.T / S**2)
    dA = iBB @ gA2 / S**2 + X @ A
    dB = (torch.eye(M, dtype=D) - B @ iBB @ B.T) @ gB2 @ iAA / S**2 - B @ X
    got = factor_updates(A, B, U, S, first=False, delta=delta)
    torch.testing.assert_close(got[0], dA, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], dB, rtol=1e-10, atol=1e-10)
    paper = factor_updates(A, B, U, S, first=False)
    assert (paper[0] - got[0]).abs().max() > 1e-3  # δ really changes the result
    got0 = factor_updates(A, B, U, S, first=True, delta=delta)
    torch.testing.assert_close(got0[1], gB2 @ iAA / S**2, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- (i) the official clipping order


def test_max_grad_norm_scales_the_adjusted_updates_not_the_moments():
    """Official order: Adam moments from the raw gradients; the factor from the raw global norm multiplies the
    adjusted updates. So the clipped run's parameter change is coef × the unclipped one, with identical moments."""
    lr, max_norm = 1e-2, 1e-3
    plain, clipped = make_model(modules_to_save=["head"]), make_model(modules_to_save=["head"])
    opt_p = LoraProAdamW(plain, lr=lr)
    opt_c = LoraProAdamW(clipped, lr=lr, max_grad_norm=max_norm)
    for t in range(2):
        # keep the two on one trajectory: the same parameters, hence the same raw gradients, before each step
        with torch.no_grad():
            for p, q in zip(plain.parameters(), clipped.parameters()):
                q.copy_(p)
        for mdl, o in ((plain, opt_p), (clipped, opt_c)):
            o.zero_grad()
            loss_fn(mdl, 40 + t).backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in clipped.parameters()
                                                     if p.grad is not None]))
        coef = min(1.0, max_norm / (norm.item() + 1e-6))
        assert coef < 0.05  # the clipping is active
        start = {n: p.detach().clone() for n, p in clipped.named_parameters()}
        opt_p.step()
        opt_c.step()
        for (n, p), (_, q) in zip(plain.named_parameters(), clipped.named_parameters()):
            if "lora_" not in n or ("lora_A" in n and t == 0):  # the head: AdamW; A at t=0: does not move (B=0)
                continue
            assert (p - start[n]).abs().max() > 1e-4, n
            # fp32: the same numbers up to one multiplication by coef, then one rounding of the parameter (|p| ≈ 0.25,
            # ulp 3e-8: atol 1e-7); the clipped update itself is ~1e-3, and coef is < 0.05, so an unclipped update fails
            torch.testing.assert_close(q - start[n], coef * (p - start[n]), rtol=1e-4, atol=1e-7, msg=n)
        for pair_p, pair_c in zip(opt_p.pairs, opt_c.pairs):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt_c.state[pair_c.A][key], opt_p.state[pair_p.A][key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        LoraProAdamW(make_model(), lr=1e-3, max_grad_norm=0.0)


# ---------------------------------------------------------------- (j) bf16 resume


def test_bf16_state_dict_round_trip_keeps_fp32_moments():
    def bf16_model(seed):
        return make_model(seed=seed, modules_to_save=["head"]).to(torch.bfloat16)

    def bf16_step(model, opt, seed):
        x, y = batch(seed)
        opt.zero_grad()
        (model(x.bfloat16()).float() - y).pow(2).mean().backward()
        opt.step()

    model = bf16_model(0)
    opt = LoraProAdamW(model, lr=1e-2)
    for t in range(2):
        bf16_step(model, opt, 50 + t)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = bf16_model(7)
    model2.load_state_dict(ckpt["model"])
    opt2 = LoraProAdamW(model2, lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    for p1, p2 in zip((p for g in opt.param_groups for p in g["params"]),
                      (p for g in opt2.param_groups for p in g["params"])):
        assert p2.dtype == torch.bfloat16
        for key in ("exp_avg", "exp_avg_sq"):
            if key in opt.state[p1]:
                assert opt2.state[p2][key].dtype == torch.float32  # torch alone would have cast it to bf16
                assert torch.equal(opt2.state[p2][key], opt.state[p1][key])
    for t in range(2, 4):
        bf16_step(model, opt, 50 + t)
        bf16_step(model2, opt2, 50 + t)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1  # same arithmetic on the same numbers: bit-identical


# ---------------------------------------------------------------- (k) LoRA bias, dropout, several adapters


def test_lora_bias_goes_to_the_adamw_group():
    model = make_model(lora_bias=True)
    opt = LoraProAdamW(model, lr=1e-2)
    layers = lora_layers(model)
    assert len(opt.pairs) == 2
    assert [(pair.A, pair.B) for pair in opt.pairs] == [
        (layer.lora_A["default"].weight, layer.lora_B["default"].weight) for layer in layers
    ]
    biases = [layer.lora_B["default"].bias for layer in layers]
    assert all(b is not None and b.requires_grad for b in biases)
    assert {id(b) for b in biases} == {id(p) for p in opt.param_groups[1]["params"]}
    ref = [b.detach().clone().requires_grad_(True) for b in biases]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.0)
    for t in range(2):
        opt.zero_grad()
        loss_fn(model, 60 + t).backward()
        for b, r in zip(biases, ref):
            r.grad = b.grad.clone()
        opt.step()
        ref_opt.step()
    for b, r in zip(biases, ref):
        torch.testing.assert_close(b.detach(), r.detach(), rtol=1e-6, atol=1e-7)
        assert b.detach().abs().max() > 1e-3  # it did train (zero at init)


def test_dropout_warns_once_naming_module_and_rate():
    model = make_model(lora_dropout=0.1)
    with pytest.warns(UserWarning) as record:
        LoraProAdamW(model, lr=1e-3)
    msgs = [str(w.message) for w in record if "lora_dropout" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "2 LoRA pair(s)" in msgs[0] and "lin0" in msgs[0] and "'default'" in msgs[0] and "0.1" in msgs[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraProAdamW(make_model(), lr=1e-3)  # lora_dropout=0: no warning


def test_several_active_adapters_on_a_layer_raise():
    model = make_model()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["lin1"], lora_dropout=0.0))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"lin1.*\['default', 'other'\]"):
        LoraProAdamW(model, lr=1e-3)
    model.base_model.set_adapter("default")  # one trainable adapter per layer again
    assert len(LoraProAdamW(model, lr=1e-3).pairs) == 2
