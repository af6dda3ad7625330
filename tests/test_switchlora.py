"""SwitchLoRA (https://arxiv.org/abs/2406.06564) against hand computations of the paper's formulas and invariants:
output unchanged across switches, banks stay a permutation of the initial candidates, partner Adam state reset and
frozen gradients, the schedule, stock AdamW corrected to per-vector steps, Trainer, save / load with a rewritten W."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

from conftest import randomize_adapter, rel_err, tiny_llama, tiny_mlp
from peft_ext.callbacks.switchlora import SwitchLoraCallback, switch_interval, switch_rate
from peft_ext.optim.switchlora import SwitchLoraAdamW, create_switchlora_optimizer
from peft_ext.tuners.switchlora import SwitchLoraConfig, SwitchLoraLayer, init_bounds, switchlora_layers

R = 8
# fixed_interval with r / interval = 2 exactly: two A-rows and two B-columns per step, no stochastic rounding
FIXED = dict(r=R, switch_interval=4, fixed_interval=True, adam_warm_step=2, init_seed=0)


class Rect(nn.Module):
    """A 48 -> 32 linear layer (m != n, so the init formulas are checked with distinct dimensions)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(48, 32)

    def forward(self, x):
        return self.proj(x)


def mlp_model(**kwargs):
    config = SwitchLoraConfig(target_modules=["lin0", "lin1"], **{**FIXED, **kwargs})
    return get_peft_model(tiny_mlp(), config)


def inputs(n=16, d=64, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- config and init
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"num_candidates": 4}, "num_candidates"),
        ({"switch_interval": 9, "adam_warm_step": 5}, "switch_interval"),
        ({"switch_rate_base": 0.0}, "switch_rate_base"),
        ({"switch_rate_base": 1.5}, "switch_rate_base"),
        ({"adam_warm_step": -1}, "adam_warm_step"),
        ({"switch_descent_rate": 0}, "switch_descent_rate"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"init_seed": 1.5}, "init_seed"),
        ({"bank_device": "nowhere"}, "bank_device"),
        ({"fixed_interval": "no"}, "fixed_interval"),
        ({"reset_optimizer_state": "no"}, "reset_optimizer_state"),
        ({"init_weights": "no"}, "init_weights"),
        ({"compensate_init": 1}, "compensate_init"),
        ({"origin_lora_init": "yes"}, "origin_lora_init"),
        ({"switch_interval": float("inf")}, "switch_interval"),
        ({"switch_interval": float("nan")}, "switch_interval"),
        ({"switch_descent_rate": float("inf")}, "switch_descent_rate"),
        ({"lora_alpha": float("inf")}, "lora_alpha"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SwitchLoraConfig\.{field} must be"):
        SwitchLoraConfig(**{"r": R, **kwargs})


def test_init_follows_the_paper_bounds_and_official_layout():
    W0 = Rect().proj.weight.detach().clone()
    model = get_peft_model(Rect(), SwitchLoraConfig(r=R, target_modules=["proj"], init_seed=0))
    layer = model.base_model.model.proj
    m, n = 32, 48
    gain = math.sqrt(1 / 3)
    bound_a = math.sqrt(3) * ((math.sqrt(m) * R) / n**1.5) ** 0.25 * math.sqrt(gain)
    bound_b = math.sqrt(3) * (R / math.sqrt(m * n)) ** 0.25 * math.sqrt(gain)
    assert init_bounds(n, m, R) == pytest.approx((bound_a, bound_b), rel=1e-12)
    bank, A, B = layer.switchlora_bank["default"], *layer.lora_factors("default")[:2]
    N = min(m, n)  # the paper's default number of candidates
    assert bank.a.shape == (N, n) and bank.b.shape == (N, m)
    assert bank.a.abs().max() <= bound_a and bank.b.abs().max() <= bound_b
    # uniform on ±bound: std = bound/√3 (N·n = 1536 draws: 5% relative is > 3 standard errors of the std estimate)
    assert bank.a.std().item() == pytest.approx(bound_a / math.sqrt(3), rel=0.05)
    # A = the last r A-candidates; B = the last r B-candidates rotated by r//2 (the official cursor offset)
    assert torch.equal(A, bank.a[N - R:])
    rotated = [N - R + (i - R // 2) % R for i in range(R)]
    assert torch.equal(B, bank.b[rotated].T)
    assert layer.switchlora_track["default"].cursor.tolist() == [0, R // 2]
    assert B.abs().sum() > 0  # B is non-zero ...
    # ... and, as the official layer2lora, W absorbs the start: W' = W − s·B·A (one float32 rounding per entry)
    s = 1.0 / R
    torch.testing.assert_close(layer.base_layer.weight, W0 - s * B.detach() @ A.detach(), rtol=0, atol=1e-7)
    assert layer.base_weight_mutated() and layer.init_compensated["default"]


def test_compensated_start_is_the_base_and_disable_gives_the_rewritten_weight():
    x = inputs(d=48)
    base = Rect()
    W0, bias = base.proj.weight.detach().clone(), base.proj.bias.detach().clone()
    with torch.no_grad():
        expected = base(x)
    model = get_peft_model(Rect(), SwitchLoraConfig(r=R, target_modules=["proj"], init_seed=0))
    layer = model.base_model.model.proj
    A, B, s = layer.lora_factors("default")
    with torch.no_grad():
        got = model(x)
        # x(W − sBA)ᵀ + s·xAᵀBᵀ = xWᵀ up to float32 rounding: the two O(1) terms cancel to ~1e-7 relative; 1e-6
        # leaves room for the 48-term sums (measured ~2e-7)
        assert not torch.equal(got, expected) and rel_err(got, expected) <= 1e-6
        with model.disable_adapter():  # documented: the rewritten W − s·B₀A₀, not the original base
            rewritten = F.linear(x, W0 - s * B @ A, bias)
            assert rel_err(model(x), rewritten) <= 1e-6 and rel_err(model(x), expected) > 1e-2
        model.merge_adapter()  # merging puts s·B·A back: the merged weight is the original W up to rounding
        torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-7)
        model.unmerge_adapter()
    plain = get_peft_model(Rect(), SwitchLoraConfig(r=R, target_modules=["proj"], init_seed=0, compensate_init=False))
    player = plain.base_model.model.proj
    assert torch.equal(player.base_layer.weight, W0) and not player.base_weight_mutated()
    with torch.no_grad():
        assert rel_err(plain(x), expected) > 1e-2  # uncompensated: starts at W + s·B·A


def test_origin_lora_init_is_the_identity(mlp_inputs):
    base = tiny_mlp()
    with torch.no_grad():
        expected = base(mlp_inputs)
    model = get_peft_model(tiny_mlp(), SwitchLoraConfig(r=R, target_modules=["lin0"], origin_lora_init=True))
    layer = model.base_model.model.lin0
    assert layer.switchlora_bank["default"].b.abs().sum() == 0
    assert layer.switchlora_down["default"].weight.abs().max() <= 1 / math.sqrt(64)  # kaiming-uniform bound 1/√n
    with torch.no_grad():
        assert torch.equal(model(mlp_inputs), expected)


def test_init_weights_false_is_a_random_uncompensated_start(mlp_inputs):
    # the contract of every peft-ext method (and of PEFT's generic tests): init_weights=False is a random non-zero
    # adapter; SwitchLoRA's is the paper's init with W left alone (no compensation even with compensate_init=True),
    # so the model starts at W + s·B·A, and two adapters drawn from torch's global RNG differ
    base = tiny_mlp()
    model = get_peft_model(tiny_mlp(), SwitchLoraConfig(r=R, target_modules=["lin0"], init_weights=False))
    model.add_adapter("other", SwitchLoraConfig(r=R, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    assert torch.equal(layer.base_layer.weight, base.lin0.weight) and not layer.base_weight_mutated()
    with torch.no_grad():
        first = model(mlp_inputs)
        model.set_adapter("other")
        second = model(mlp_inputs)
        assert rel_err(first, base(mlp_inputs)) > 1e-3 and rel_err(second, first) > 1e-3


def test_init_seed_is_reproducible_and_differs_per_layer():
    a, b = mlp_model(), mlp_model()
    la, lb = switchlora_layers(a), switchlora_layers(b)
    assert all(torch.equal(x.switchlora_bank["default"].a, y.switchlora_bank["default"].a) for x, y in zip(la, lb))
    assert not torch.equal(la[0].switchlora_bank["default"].a, la[1].switchlora_bank["default"].a)


# ----------------------------------------------------------------------------------------------- switching
def rows_permutation_of(current: torch.Tensor, initial: torch.Tensor) -> bool:
    """Whether the rows of ``current`` are exactly the rows of ``initial`` in some order."""
    if current.shape != initial.shape:
        return False
    same = (current[:, None, :] == initial[None, :, :]).all(-1)
    return bool((same.sum(0) == 1).all() and (same.sum(1) == 1).all())


def vector_sets(layer):
    """(bank rows not in use ∪ rows of A, bank rows not in use ∪ columns of B)."""
    bank, track = layer.switchlora_bank["default"], layer.switchlora_track["default"]
    A, B, _ = layer.lora_factors("default")
    keep_a = torch.ones(bank.a.shape[0], dtype=torch.bool)
    keep_a[track.slot_a] = False
    keep_b = torch.ones(bank.b.shape[0], dtype=torch.bool)
    keep_b[track.slot_b] = False
    return torch.cat([bank.a[keep_a], A]), torch.cat([bank.b[keep_b], B.T])


@pytest.mark.parametrize("num", [1, 3])
def test_switch_keeps_the_output_and_the_candidate_set(num):
    model = mlp_model()
    layer = model.base_model.model.lin0
    x = inputs()
    initial_a = layer.switchlora_bank["default"].a.clone()
    initial_b = layer.switchlora_bank["default"].b.clone()
    W0 = layer.base_layer.weight.clone()
    with torch.no_grad():
        before = layer(x)
    for _ in range(5):  # 5·num > r//2 for num = 3: the cursors wrap around
        layer.freeze_gradients("default")  # count frozen steps off so that switching stays available
        layer.freeze_gradients("default")
        k = min(num, layer.available_switches("default"))
        assert k == num
        layer.switch("default", k)
        with torch.no_grad():
            after = layer(x)
        # fp32: W += s·B(a − c)ᵀ cancels the branch change up to rounding of O(10) terms of size ~1 (≈ 1e-6)
        assert rel_err(after, before) <= 2e-6
        set_a, set_b = vector_sets(layer)
        assert rows_permutation_of(set_a, initial_a) and rows_permutation_of(set_b, initial_b)
    assert not torch.equal(layer.base_layer.weight, W0)  # W absorbed the switches
    assert int(layer.switchlora_track["default"].switched) == 2 * 5 * num


def test_bfloat16_base_keeps_float32_banks_and_the_candidate_set_exact():
    """PEFT's device move casts adapter buffers to a bfloat16 base's dtype; the banks must stay float32 (like the
    float32 A and B PEFT's autocast_adapter_dtype gives), or every switched-out trained vector is rounded to
    bfloat16."""
    model = get_peft_model(tiny_mlp().to(torch.bfloat16), SwitchLoraConfig(target_modules=["lin0", "lin1"], **FIXED))
    layer = model.base_model.model.lin0
    bank = layer.switchlora_bank["default"]
    A, B, _ = layer.lora_factors("default")
    assert bank.a.dtype == bank.b.dtype == A.dtype == B.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    randomize_adapter(model)  # "trained" A and B: float32 values that bfloat16 cannot represent
    initial_a, initial_b = (t.clone() for t in vector_sets(layer))
    for _ in range(6):  # 12 switches of each kind with r = 8: the cursors wrap and vectors return from the banks
        layer.freeze_gradients("default")
        layer.freeze_gradients("default")
        layer.switch("default", 2)
        set_a, set_b = vector_sets(layer)
        assert rows_permutation_of(set_a, initial_a) and rows_permutation_of(set_b, initial_b)


def test_switch_compensation_matches_the_paper_formula():
    model = mlp_model()
    layer = model.base_model.model.lin0
    track, bank = layer.switchlora_track["default"], layer.switchlora_bank["default"]
    A0, B0 = (t.detach().clone() for t in layer.lora_factors("default")[:2])
    W0 = layer.base_layer.weight.detach().clone()
    N, s = bank.a.shape[0], 1.0 / R
    rows_a, cols_b = layer.switch("default", 2)
    assert rows_a.tolist() == [0, 1] and cols_b.tolist() == [R // 2, R // 2 + 1]
    # A-rows 0, 1 take candidates 0, 1 (after the last selected slot N-1); B-columns r/2, r/2+1 take 0, 1 as well
    c_a, c_b = bank.a[[0, 1]], bank.b[[0, 1]]
    A1 = A0.clone()
    A1[[0, 1]] = c_a
    expected = W0 + s * B0[:, [0, 1]] @ (A0[[0, 1]] - c_a)
    expected = expected + s * (B0[:, [4, 5]] - c_b.T) @ A1[[4, 5]]
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)
    assert torch.equal(layer.switchlora_down["default"].weight, A1)
    # switched-out vectors went back into their own slots
    assert torch.equal(bank.a[[N - R, N - R + 1]], A0[[0, 1]])
    assert track.slot_a[:2].tolist() == [0, 1] and track.frozen_b[:2].tolist() == [2, 2]
    assert track.frozen_a[[4, 5]].tolist() == [2, 2]


def test_available_switches_respect_frozen_vectors_and_bank_size():
    layer = mlp_model().base_model.model.lin0
    assert layer.available_switches("default") == R // 2  # cursors r/2 apart, nothing frozen
    layer.switch("default", 3)
    # the A cursor (3) may advance up to the A-rows frozen behind the B cursor (7): positions 4..6 are frozen
    assert layer.available_switches("default") == (7 - 3 - 3) % R
    small = get_peft_model(tiny_mlp(), SwitchLoraConfig(target_modules=["lin0"], **{**FIXED, "num_candidates": R + 1}))
    assert small.base_model.model.lin0.available_switches("default") == 1  # only N − r = 1 spare candidate


def test_switching_a_merged_adapter_is_refused():
    model = mlp_model()
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged"):
        model.base_model.model.lin0.switch("default", 1)


# ----------------------------------------------------------------------------------------------- schedule
def test_schedule_values():
    T = 1000
    Td = 0.1 * T
    assert switch_interval(0, T) == pytest.approx(40 / 0.3 ** (1 / Td))
    assert switch_interval(int(Td) - 1, T) == pytest.approx(40 / 0.3)  # (t+1)/T_d = 1
    assert switch_interval(2 * int(Td) - 1, T) == pytest.approx(40 / 0.09)
    assert switch_interval(123, T, interval=10, fixed=True) == 10
    assert switch_rate(10**9, 1.0) == 1e-8  # the official floor


def test_stochastic_rounding_of_the_number_of_switches():
    model = mlp_model(fixed_interval=False, switch_interval=40)
    cb = SwitchLoraCallback(model, seed=3)
    pairs = cb._pairs()
    exact = R / switch_interval(50, 1000)
    assert set(cb.replace_counts(pairs, 50, 1000)) <= {math.floor(exact), math.ceil(exact)}
    # over many steps (same interval via fixed_interval) the mean is r/interval: 4000 Bernoulli draws, 4σ ≈ 0.03
    fixed = mlp_model(fixed_interval=True, switch_interval=12)
    cb = SwitchLoraCallback(fixed, seed=3)
    pairs = cb._pairs()
    counts = torch.tensor([cb.replace_counts(pairs, t, 1000) for t in range(2000)], dtype=torch.float64)
    assert set(counts.unique().tolist()) <= {0.0, 1.0}
    assert counts.mean().item() == pytest.approx(R / 12, abs=0.03)
    # a function of (seed, step) only
    assert cb.replace_counts(pairs, 77, 1000) == SwitchLoraCallback(fixed, seed=3).replace_counts(pairs, 77, 1000)


# ----------------------------------------------------------------------------------------------- optimizer state
def train(model, optimizer, steps, x, cb=None, start=0, max_steps=100):
    cb = cb or SwitchLoraCallback(model, seed=0)
    model.train()
    for t in range(start, start + steps):
        model(x).pow(2).mean().backward()
        cb.step(optimizer, t, max_steps)
        optimizer.step()
        optimizer.zero_grad()
    return cb


def adapter_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_partner_state_reset_and_frozen_gradients_with_stock_adamw():
    model = mlp_model()
    layer = model.base_model.model.lin0
    A, B, _ = layer.lora_factors("default")
    opt = torch.optim.AdamW(adapter_params(model), lr=1e-2, weight_decay=0.0)
    x = inputs()
    cb = train(model, opt, 3, x, max_steps=100)  # 3 steps: cursors at 6 / (4 + 6) % 8 = 2
    model(x).pow(2).mean().backward()
    B_before = B.detach().clone()
    cb.step(opt, 3, 100)  # switches A-rows 6, 7 (partners: B-columns 6, 7) and B-columns 2, 3 (partners: A-rows 2, 3)
    sa, sb = opt.state[A], opt.state[B]
    assert torch.equal(sb["exp_avg"][:, [6, 7]], torch.zeros(64, 2))
    assert torch.equal(sb["exp_avg_sq"][:, [6, 7]], torch.zeros(64, 2))
    assert torch.equal(sa["exp_avg"][[2, 3]], torch.zeros(2, 64))
    assert sa["exp_avg"][[4, 5]].abs().min() > 0  # rows 4, 5 (reset at step 0, thawed at step 2) keep theirs
    assert sb["switchlora_step"][0, [6, 7]].tolist() == [0, 0] and sb["switchlora_step"][0, 0].item() == 3
    # gradients of every frozen vector are zero: partners just reset and those reset at the previous step
    assert torch.equal(B.grad[:, [4, 5, 6, 7]], torch.zeros(64, 4))
    assert torch.equal(A.grad[[0, 1, 2, 3]], torch.zeros(4, 64))
    opt.step()
    assert torch.equal(B[:, [6, 7]], B_before[:, [6, 7]])  # frozen and zero moments: no update (no weight decay)
    assert sb["switchlora_step"][0, [6, 7]].tolist() == [1, 1] and sb["step"].item() == 4


def test_switchlora_adamw_has_per_vector_steps_and_matches_the_formula():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3, 4))
    opt = SwitchLoraAdamW([{"params": [p], "vector_dim": 0}], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    g1, g2 = torch.randn(3, 4), torch.randn(3, 4)
    p.grad = g1
    opt.step()
    state = opt.state[p]
    assert state["step"].shape == (3, 1)
    state["exp_avg"][1] = 0
    state["exp_avg_sq"][1] = 0
    state["step"][1] = 0  # row 1 restarts
    before = p.detach().clone()
    p.grad = g2
    opt.step()
    for row, k in [(0, 2), (1, 1), (2, 2)]:
        m = 0.1 * g2[row] + (0.9 * 0.1 * g1[row] if k == 2 else 0)
        v = 0.01 * g2[row] ** 2 + (0.99 * 0.01 * g1[row] ** 2 if k == 2 else 0)
        update = (m / (1 - 0.9**k)) / ((v / (1 - 0.99**k)).sqrt() + 1e-8)
        expected = before[row] * (1 - 0.1 * 0.1) - 0.1 * update
        # O(1) values in fp32: a few ulps (~1e-7 each) of rounding between the two orders of operations
        torch.testing.assert_close(p[row].detach(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="vector_dim"):
        SwitchLoraAdamW([{"params": [nn.Parameter(torch.zeros(2, 2))], "vector_dim": 2}])


def test_switchlora_adamw_zeroes_the_per_vector_steps_of_the_partners():
    model = mlp_model()
    layer = model.base_model.model.lin0
    A, B, _ = layer.lora_factors("default")
    opt = create_switchlora_optimizer(model, lr=1e-2)
    x = inputs()
    cb = train(model, opt, 3, x, max_steps=100)  # cursors: A at 6, B at (4 + 6) % 8 = 2
    sa, sb = opt.state[A], opt.state[B]
    assert sa["step"].shape == (R, 1) and sb["step"].shape == (1, R)
    steps_a, steps_b = sa["step"].clone(), sb["step"].clone()
    model(x).pow(2).mean().backward()
    cb.step(opt, 3, 100)  # switches A-rows 6, 7 (partners: B-columns 6, 7) and B-columns 2, 3 (partners: A-rows 2, 3)
    assert sb["step"][0, [6, 7]].tolist() == [0, 0] and sa["step"][[2, 3], 0].tolist() == [0, 0]
    others_b, others_a = [0, 1, 2, 3, 4, 5], [0, 1, 4, 5, 6, 7]
    assert torch.equal(sb["step"][0, others_b], steps_b[0, others_b])  # the other vectors keep their counts
    assert torch.equal(sa["step"][others_a, 0], steps_a[others_a, 0])
    assert steps_b.max().item() == 3 and steps_b.min().item() < 3  # earlier switches reset some counts already
    assert torch.equal(sb["exp_avg"][:, [6, 7]], torch.zeros(64, 2)) and torch.equal(sa["exp_avg"][[2, 3]],
                                                                                     torch.zeros(2, 64))


def test_stock_adamw_is_corrected_to_per_vector_steps():
    """Stock AdamW + the callback's correction == SwitchLoraAdamW (the official per-vector-step optimizer); without
    the correction the reset vectors' first updates are ~3x larger. The two runs go in lockstep and are re-synchronised
    after every step (model state copied from the native run), so each comparison measures one update: free-running,
    tiny rounding differences grow through the training dynamics (Adam normalises gradients near zero)."""
    x = inputs()

    def worst_step_difference(correct: bool) -> float:
        models = [mlp_model(), mlp_model()]
        opts = [create_switchlora_optimizer(models[0], lr=1e-2),
                torch.optim.AdamW(adapter_params(models[1]), lr=1e-2, weight_decay=0.0)]
        cbs = [SwitchLoraCallback(m, seed=0) for m in models]
        if not correct:
            cbs[1]._correct_bias = lambda optimizer: None
        worst = 0.0
        for t in range(8):  # partners reset from step 0 on thaw after adam_warm_step = 2 steps: corrections from t = 2
            for model, opt, cb in zip(models, opts, cbs):
                model(x).pow(2).mean().backward()
                cb.step(opt, t, 100)
                opt.step()
                opt.zero_grad()
            native, stock = (torch.cat([p.detach().flatten() for p in adapter_params(m)]) for m in models)
            worst = max(worst, (native - stock).abs().max().item())
            with torch.no_grad():  # W, A, B, banks: identical again, so the next gradients are identical
                for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
                    b.copy_(a)
        return worst

    # one update of lr 1e-2 on |p| <= ~1: the two formula orders differ by a few float32 ulps of p (~6e-8 each)
    assert worst_step_difference(correct=True) <= 1e-6
    assert worst_step_difference(correct=False) >= 1e-3


def test_unsupported_optimizer_and_missing_arguments_are_errors():
    model = mlp_model()
    x = inputs()
    model(x).pow(2).mean().backward()
    cb = SwitchLoraCallback(model)
    with pytest.raises(TypeError, match="SGD"):
        cb.step(torch.optim.SGD(adapter_params(model), lr=0.1), 0, 10)
    with pytest.raises(ValueError, match="optimizer"):
        cb.step(None, 0, 10)
    sched = mlp_model(fixed_interval=False)
    with pytest.raises(ValueError, match="max_steps"):
        SwitchLoraCallback(sched).step(torch.optim.AdamW(adapter_params(sched)), 0)
    with pytest.raises(ValueError, match="no SwitchLoRA layers"):
        SwitchLoraCallback(tiny_mlp()).step(None, 0, 10)
    # without state resets no optimizer is needed
    free = mlp_model(reset_optimizer_state=False)
    free(x).pow(2).mean().backward()
    assert SwitchLoraCallback(free).step(None, 0, 10) == 2 * 2 * 2  # 2 layers × (2 A-rows + 2 B-columns)


# ----------------------------------------------------------------------------------------------- integration
def test_trainer_run_switches_and_trains(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), SwitchLoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **FIXED))
    W0 = {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, SwitchLoraLayer)}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (16, 12), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    cb = SwitchLoraCallback(seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    counts = model.base_model.switch_counts()
    assert sum(counts.values()) > 0 and all(c % 2 == 0 for c in counts.values())
    assert cb.model is not None
    changed = [n for n, m in model.named_modules() if isinstance(m, SwitchLoraLayer)
               and not torch.equal(m.base_layer.weight, W0[n])]
    assert changed and all(counts[n.removeprefix("base_model.model.")] > 0 for n in changed)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    # the Trainer's (accelerate-wrapped, stock) AdamW got per-vector step counts: reset vectors count fewer steps
    inner = trainer.optimizer.optimizer
    A = switchlora_layers(model)[0].lora_factors("default")[0]
    ages, t = inner.state[A]["switchlora_step"], float(inner.state[A]["step"])
    assert t == 4 and ages.max().item() == t and ages.min().item() < t


def test_save_load_after_switches_reproduces_logits(tmp_path, llama_inputs):
    from safetensors.torch import load_file

    plain = get_peft_model(tiny_llama(), SwitchLoraConfig(target_modules=["q_proj", "v_proj"], compensate_init=False,
                                                          **FIXED))
    plain.save_pretrained(tmp_path / "plain")
    stored = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert not any(k.endswith("base_layer.weight") for k in stored)  # uncompensated, nothing switched: W not stored
    model = get_peft_model(tiny_llama(), SwitchLoraConfig(target_modules=["q_proj", "v_proj"], **FIXED))
    model.save_pretrained(tmp_path / "fresh")
    fresh = load_file(tmp_path / "fresh" / "adapter_model.safetensors")
    assert sum(k.endswith("base_layer.weight") for k in fresh) == 4  # compensated: W rewritten from step 0
    with torch.no_grad():
        start = model(input_ids=llama_inputs).logits
        assert torch.equal(PeftModel.from_pretrained(tiny_llama(), tmp_path / "fresh")(input_ids=llama_inputs).logits,
                           start)
        # the compensated start is the base model up to float32 rounding (~1e-7 relative per layer, 4 layers)
        assert rel_err(start, tiny_llama()(input_ids=llama_inputs).logits) <= 1e-5
    opt = torch.optim.AdamW(adapter_params(model), lr=1e-2)
    model.train()
    cb = SwitchLoraCallback(model)
    for t in range(3):
        model(input_ids=llama_inputs, labels=llama_inputs).loss.backward()
        cb.step(opt, t, 100)
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=llama_inputs).logits
    model.save_pretrained(tmp_path / "trained")
    saved = load_file(tmp_path / "trained" / "adapter_model.safetensors")
    base_keys = sorted(k for k in saved if k.endswith("base_layer.weight"))
    assert len(base_keys) == 4  # the four switched layers store their rewritten W
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "trained")  # onto the ORIGINAL base
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=llama_inputs).logits, expected)
    # the switching state is restored, so training can resume where it stopped
    for a, b in zip(switchlora_layers(model), switchlora_layers(loaded)):
        assert torch.equal(a.switchlora_bank["default"].a, b.switchlora_bank["default"].a)
        assert torch.equal(a.switchlora_track["default"].cursor, b.switchlora_track["default"].cursor)
        assert torch.equal(a.switchlora_track["default"].frozen_b, b.switchlora_track["default"].frozen_b)


def test_merge_after_switches_and_documented_exceptions(llama_inputs):
    model = mlp_model()
    randomize_adapter(model)
    opt = torch.optim.AdamW(adapter_params(model), lr=1e-2)
    x = inputs()
    train(model, opt, 2, x)
    model.eval()
    base_out = tiny_mlp()(x)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        assert rel_err(model(x), unmerged) <= 1e-5
        model.unmerge_adapter()
        with model.disable_adapter():  # documented: the rewritten W, not the original base
            assert not torch.allclose(model(x), base_out)
    assert not model.base_model.model.lin0.supports_lora_conversion()


def test_quantized_base_is_refused(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(ValueError, match="quantized"):
        get_peft_model(base, SwitchLoraConfig(r=R, target_modules=["q_proj"]))
