"""The official LoRA-GA initialisation (https://arxiv.org/abs/2407.05000, https://github.com/Outsider565/LoRA-GA)
against an oracle written from the paper's formulas with an exact torch.linalg.svd."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import rel_err, tiny_llama, tiny_mlp
from peft_ext.init.lora_ga import (
    LoraGAInit,
    apply_lora_ga_offset,
    estimate_lora_ga_gradients,
    lora_ga_init,
    lora_ga_to_lora,
)

R, ALPHA, GAMMA = 4, 8, 16
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def oracle_svd(G: torch.Tensor):
    """Exact SVD with the sign convention stated by lora_ga: each u_k's largest-|·| entry is positive."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    V = Vh.T
    for k in range(U.shape[1]):
        if U[U[:, k].abs().argmax(), k] < 0:
            U[:, k], V[:, k] = -U[:, k], -V[:, k]
    return U, S, V


def oracle_factors(G, r, s, direction, scale, W=None):
    """A₀, B₀ from the official formulas (no singular values in the factors)."""
    m = G.shape[0]
    U, _, V = oracle_svd(G)
    idx = {
        "ArB2r": (list(range(r)), list(range(r, 2 * r))),
        "A2rBr": (list(range(r, 2 * r)), list(range(r))),
        "ArBr": (list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))),
    }[direction]
    A0, B0 = V[:, idx[0]].T, U[:, idx[1]]
    if scale == "stable":
        c = m ** 0.25 / math.sqrt(GAMMA)
    elif scale == "gd":
        c = 1 / s
    elif scale == "unit":
        c = 1.0
    else:  # weightS: mean of √(σ_i(W)/s) over the top r singular values of W
        c = torch.sqrt(torch.linalg.svdvals(W.double())[:r] / s).mean().item()
    return (A0 * c).float(), (B0 * c).float()


def low_rank_gradient(m: int, n: int, rank: int, seed: int = 0) -> torch.Tensor:
    """G = Σ σ_k u_k v_kᵀ with well separated σ_k (10, 9, …) and rank ≤ q = 4r, so the randomised range finder
    captures range(G) exactly and the randomised SVD equals the exact one up to rounding."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, rank, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen))
    return U @ torch.diag(torch.arange(10.0, 10.0 - rank, -1)) @ V.T


def mlp_lora():
    return get_peft_model(tiny_mlp(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin0", "lin1"]))


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("scale", ["stable", "gd", "unit"])
def test_init_equals_paper_formula_on_a_fixed_gradient(direction, scale):
    model = mlp_lora()
    grads = {"lin0": low_rank_gradient(64, 64, 10, seed=1), "lin1": low_rank_gradient(64, 64, 12, seed=2)}
    W_old = {k: model.get_submodule(f"base_model.model.{k}").base_layer.weight.detach().clone() for k in grads}
    init = lora_ga_init(model, grads=grads, direction=direction, scale=scale, gamma=GAMMA)
    for key, G in grads.items():
        layer = model.get_submodule(f"base_model.model.{key}")
        s = layer.scaling["default"]
        A0, B0 = oracle_factors(G, R, s, direction, scale)
        torch.testing.assert_close(layer.lora_A["default"].weight, A0, rtol=0, atol=1e-5)  # fp32 randomised SVD
        torch.testing.assert_close(layer.lora_B["default"].weight, B0, rtol=0, atol=1e-5)
        # W_new + s·B₀A₀ == W_old: the output is unchanged at initialisation
        W_new = layer.base_layer.weight
        restored = W_new + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(restored, W_old[key], rtol=0, atol=1e-6)
        assert init.scaling[f"base_model.model.{key}"] == s


def test_weight_s_scale_with_exact_svd():
    model = mlp_lora()
    G = low_rank_gradient(64, 64, 10)
    W = model.get_submodule("base_model.model.lin0").base_layer.weight.detach().clone()
    lora_ga_init(model, grads={"lin0": G, "lin1": G}, scale="weightS", svd="full")
    layer = model.get_submodule("base_model.model.lin0")
    A0, B0 = oracle_factors(G, R, layer.scaling["default"], "ArB2r", "weightS", W=W)
    torch.testing.assert_close(layer.lora_A["default"].weight, A0, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight, B0, rtol=0, atol=1e-5)


def test_stable_init_does_not_depend_on_gradient_norm():
    G = {"lin0": low_rank_gradient(64, 64, 10), "lin1": low_rank_gradient(64, 64, 12, seed=3)}
    small, large = mlp_lora(), mlp_lora()
    a = lora_ga_init(small, grads=G)
    b = lora_ga_init(large, grads={k: 10 * v for k, v in G.items()})
    for name in a.factors:
        for x, y in zip(a.factors[name], b.factors[name]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    # s·‖B₀A₀‖_F = s·(√m/γ)·√r: fixed by the shapes, not by ‖G‖
    A0, B0 = a.factors["base_model.model.lin0"]
    assert (2.0 * (B0 @ A0)).norm().item() == pytest.approx(2.0 * math.sqrt(64) / GAMMA * math.sqrt(R), rel=1e-5)


def test_random_direction_is_deterministic_and_disjoint():
    G = {"lin0": low_rank_gradient(64, 64, 10), "lin1": low_rank_gradient(64, 64, 12)}
    first = lora_ga_init(mlp_lora(), grads=G, direction="random", seed=5)
    second = lora_ga_init(mlp_lora(), grads=G, direction="random", seed=5)
    A0, B0 = first.factors["base_model.model.lin0"]
    assert torch.equal(A0, second.factors["base_model.model.lin0"][0])
    U, _, V = oracle_svd(G["lin0"])
    c = 64 ** 0.25 / math.sqrt(GAMMA)
    a_idx = (V[:, : 2 * R].T.float() * c @ A0.T).abs().argmax(dim=0)  # which singular vector each row of A₀ is
    b_idx = ((U[:, : 2 * R].float() * c).T @ B0).abs().argmax(dim=0)
    assert sorted(a_idx.tolist() + b_idx.tolist()) == list(range(2 * R))  # A and B split the first 2r


def test_gradient_estimate_is_the_mean_base_gradient(llama_inputs):
    model = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=LLAMA_TARGETS))
    ids2 = torch.flip(llama_inputs, dims=[1])
    batches = [{"input_ids": llama_inputs, "labels": llama_inputs}, {"input_ids": ids2, "labels": ids2}]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = estimate_lora_ga_gradients(model, batches)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    ref = tiny_llama()
    total = None
    for batch in batches:
        ref.zero_grad()
        ref(**batch).loss.backward()
        g = ref.model.layers[1].self_attn.q_proj.weight.grad.clone()
        total = g if total is None else total + g
    got = grads["base_model.model.model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(got, total / 2, rtol=1e-5, atol=1e-7)


def test_conversion_reproduces_trained_model_on_original_base(tmp_path, llama_inputs):
    original = tiny_llama()
    model = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=LLAMA_TARGETS))
    batches = [{"input_ids": llama_inputs, "labels": llama_inputs}] * 2
    init = lora_ga_init(model, batches)
    with torch.no_grad():
        assert rel_err(model(input_ids=llama_inputs).logits, original(input_ids=llama_inputs).logits) <= 1e-5
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(input_ids=llama_inputs, labels=llama_inputs).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=llama_inputs).logits
        assert rel_err(trained, original(input_ids=llama_inputs).logits) > 1e-3  # training moved the model

    config, state = lora_ga_to_lora(model, init, save_directory=tmp_path / "lora")
    assert config.r == 2 * R and config.lora_alpha == 2 * ALPHA
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2 * R, 64)
    converted = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    with torch.no_grad():
        assert rel_err(converted(input_ids=llama_inputs).logits, trained) <= 1e-5

    # Resume: original base + saved init + saved adapter weights reproduce the trained model too.
    init.save(tmp_path / "init.safetensors")
    model.save_pretrained(tmp_path / "ga")
    resumed = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=LLAMA_TARGETS))
    apply_lora_ga_offset(resumed, LoraGAInit.load(tmp_path / "init.safetensors"))
    resumed.load_adapter(tmp_path / "ga", adapter_name="default")
    with torch.no_grad():
        assert rel_err(resumed.eval()(input_ids=llama_inputs).logits, trained) <= 1e-5


def test_rslora_conversion_keeps_the_scale():
    model = get_peft_model(tiny_mlp(), LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, target_modules=["lin0"]))
    init = lora_ga_init(model, grads={"lin0": low_rank_gradient(64, 64, 10)})
    config, _ = lora_ga_to_lora(model, init)
    assert config.lora_alpha / math.sqrt(config.r) == pytest.approx(ALPHA / math.sqrt(R))


def test_rejects_what_it_cannot_initialise():
    G = {"lin0": low_rank_gradient(64, 64, 10)}
    with pytest.raises(ValueError, match="direction"):
        lora_ga_init(mlp_lora(), grads=G, direction="BrAr")
    with pytest.raises(ValueError, match="exactly one"):
        lora_ga_init(mlp_lora())
    with pytest.raises(ValueError, match=r"no gradient for the LoRA layer\(s\) \['base_model.model.lin1'\]"):
        lora_ga_init(mlp_lora(), grads=G)
    with pytest.raises(ValueError, match="not LoRA layers"):
        lora_ga_init(mlp_lora(), grads={**G, "lin1": G["lin0"], "head": G["lin0"]})
    dora = get_peft_model(tiny_mlp(), LoraConfig(r=R, target_modules=["lin0"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        lora_ga_init(dora, grads=G)
    model = get_peft_model(tiny_mlp(), LoraConfig(r=R, rank_pattern={"lin1": 40}, target_modules=["lin0", "lin1"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="2r"):  # lin1: r=40 > 64/2; lin0 is fine but must stay untouched
        lora_ga_init(model, grads={"lin0": G["lin0"], "lin1": G["lin0"]})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_rejects_quantized_base():
    bnb = pytest.importorskip("bitsandbytes")
    net = tiny_mlp()
    q = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    q.load_state_dict(net.lin0.state_dict())
    net.lin0 = q
    model = get_peft_model(net, LoraConfig(r=R, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="quantized"):
        lora_ga_init(model, grads={"lin0": low_rank_gradient(64, 64, 10)})
