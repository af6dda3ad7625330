"""NOLA against the paper's formulas (https://arxiv.org/abs/2310.02556): seeded bases, coefficient gradients."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import randomize_adapter, rel_err, tiny_mlp
from peft_ext import NolaConfig
from peft_ext.tuners.nola import a0_matrix, all_bases, basis_chunk, layer_seed
from peft_ext.tuners.nola.layer import STREAM_A, STREAM_B, _RegeneratedCombination

R, K_A, K_B = 4, 40, 24  # k not a multiple of basis_chunk=16 below, so the last chunk is partial


def nola_mlp(cache_bases=True, seed=0, **kwargs):
    config = NolaConfig(
        r=R, lora_alpha=8, num_basis_A=K_A, num_basis_B=K_B, basis_chunk=16, cache_bases=cache_bases,
        basis_seed=seed, target_modules=["lin0", "lin1"], **kwargs,
    )
    model = get_peft_model(tiny_mlp(), config)
    randomize_adapter(model)
    return model, model.base_model.model.lin0


def test_bases_are_uniform_in_range_and_deterministic():
    a = all_bases(123, STREAM_A, K_A, (R, 64), chunk=16)
    b = all_bases(123, STREAM_A, K_A, (R, 64), chunk=16)
    assert a.shape == (K_A, R, 64) and torch.equal(a, b)
    bound = 1 / K_A**0.5
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound  # U(-1, 1)/√k fills its range
    assert abs(a.mean().item()) < 0.02 * bound
    # each chunk regenerates alone; other seeds and streams give other bases
    assert torch.equal(basis_chunk(123, STREAM_A, 1, 16, K_A, (R, 64)), a[16:32])
    assert not torch.equal(all_bases(124, STREAM_A, K_A, (R, 64), 16), a)
    assert not torch.equal(all_bases(123, STREAM_B, K_A, (R, 64), 16), a)


def test_a0_is_kaiming_uniform():
    a0 = a0_matrix(5, R, 64)
    assert a0.abs().max() <= 1 / 64**0.5 and torch.equal(a0, a0_matrix(5, R, 64))


def test_factors_equal_the_papers_linear_combination():
    model, layer = nola_mlp()
    seed = int(layer.nola_seed["default"])
    assert seed == layer_seed(0, "lin0")
    alpha = layer.nola_coef_A["default"].weight
    beta = layer.nola_coef_B["default"].weight
    bases_A = all_bases(seed, STREAM_A, K_A, (R, 64), 16)
    A_expected = a0_matrix(seed, R, 64) + sum(alpha[i] * bases_A[i] for i in range(K_A))
    B_expected = sum(beta[j] * all_bases(seed, STREAM_B, K_B, (64, R), 16)[j] for j in range(K_B))
    A, B = layer.factors("default")
    torch.testing.assert_close(A, A_expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B, B_expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        layer.get_delta_weight("default"), (8 / R) * B_expected @ A_expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache_bases", [True, False])
def test_coefficient_gradients_are_inner_products_with_the_bases(cache_bases, mlp_inputs):
    """∂L/∂αᵢ = ⟨∂L/∂A, R^A_i⟩ and ∂L/∂βⱼ = ⟨∂L/∂B, R^B_j⟩ (the chain rule through A = A0 + Σ αᵢ R^A_i)."""
    model, layer = nola_mlp(cache_bases=cache_bases)
    model.train()
    captured = {}
    orig = layer.factors

    def factors(adapter):
        A, B = orig(adapter)
        A.retain_grad(), B.retain_grad()
        captured["A"], captured["B"] = A, B
        return A, B

    layer.factors = factors
    model(mlp_inputs).pow(2).sum().backward()
    seed = int(layer.nola_seed["default"])
    bases_a = all_bases(seed, STREAM_A, K_A, (R, 64), 16)
    bases_b = all_bases(seed, STREAM_B, K_B, (64, R), 16)
    expect_a = torch.einsum("kri,ri->k", bases_a, captured["A"].grad)
    expect_b = torch.einsum("kor,or->k", bases_b, captured["B"].grad)
    torch.testing.assert_close(layer.nola_coef_A["default"].weight.grad, expect_a, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(layer.nola_coef_B["default"].weight.grad, expect_b, rtol=1e-4, atol=1e-7)


def test_cached_and_regenerated_modes_agree(mlp_inputs):
    outs, grads = [], []
    for cache in (True, False):
        model, layer = nola_mlp(cache_bases=cache)
        model.train()
        out = model(mlp_inputs)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(layer.nola_coef_A["default"].weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_regenerated_combination_passes_gradcheck():
    coef = torch.randn(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: _RegeneratedCombination.apply(c, 9, STREAM_A, (3, 5), 8), (coef,))


def test_global_rng_is_left_alone(mlp_inputs):
    model, _ = nola_mlp(cache_bases=False)
    state = torch.random.get_rng_state()
    model(mlp_inputs).sum().backward()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_seeds_are_saved_and_bases_regenerate_identically(tmp_path, mlp_inputs):
    model, layer = nola_mlp(seed=11)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    seed_keys = [k for k in saved if "nola_seed" in k]
    assert len(seed_keys) == 2 and int(saved[[k for k in seed_keys if "lin0" in k][0]]) == layer_seed(11, "lin0")
    assert not any("bases" in k or "a0" in k.lower() for k in saved), "regenerable tensors must not be saved"
    loaded = PeftModel.from_pretrained(tiny_mlp(), tmp_path)
    A0, B0 = layer.factors("default")
    A1, B1 = loaded.base_model.model.lin0.factors("default")
    assert torch.equal(A0, A1) and torch.equal(B0, B1)


def test_stored_seed_wins_over_config(tmp_path, mlp_inputs):
    """A layer regenerates its bases from the seed in the adapter file, not from what the config would derive."""
    model, layer = nola_mlp(seed=11)
    with torch.no_grad():
        expected = model(mlp_inputs)
    with torch.no_grad():
        layer.nola_seed["default"].fill_(999)
        assert not torch.equal(model(mlp_inputs), expected)  # cache follows the seed
        layer.nola_seed["default"].fill_(layer_seed(11, "lin0"))
        assert torch.equal(model(mlp_inputs), expected)


def test_only_coefficients_train():
    model, _ = nola_mlp()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("nola_coef_" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == 2 * (K_A + K_B)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"r": 0}, "r"), ({"num_basis_A": 0}, "num_basis_A"), ({"num_basis_B": -3}, "num_basis_B"),
     ({"lora_alpha": 0}, "lora_alpha"), ({"basis_seed": -1}, "basis_seed"), ({"basis_chunk": 0}, "basis_chunk")],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"NolaConfig\.{field} must be"):
        NolaConfig(**kwargs)


def test_init_weights_false_is_random_per_adapter_and_lora_sized(mlp_inputs):
    # init_weights=False draws the coefficients from torch's global RNG: two adapters on one layer differ (they share
    # the layer's bases); σ = 1/√in for A and 1/√r for B give factors of a kaiming-uniform LoRA's size, so the merged
    # model matches the unmerged one as closely as a plain LoRA does (fp32: 1e-5 relative)
    model = get_peft_model(tiny_mlp(), NolaConfig(r=4, num_basis_A=32, num_basis_B=32, target_modules=["lin0"],
                                                   init_weights=False))
    model.add_adapter("other", NolaConfig(r=4, num_basis_A=32, num_basis_B=32, target_modules=["lin0"],
                                          init_weights=False))
    layer = model.base_model.model.lin0
    assert not torch.equal(layer.nola_coef_A["default"].weight, layer.nola_coef_A["other"].weight)
    a, b = layer.factors("default")
    a0 = a0_matrix(int(layer.nola_seed["default"]), 4, 64)
    # kaiming-uniform sizes: A - A0 like A0, B of std 1/√(3·r)
    assert 0.2 < (a - a0).std() / a0.std() < 5 and 0.2 < b.std() * (3 * 4) ** 0.5 < 5
    with torch.no_grad():
        unmerged = model(mlp_inputs)
        merged = model.merge_and_unload(safe_merge=True)(mlp_inputs)
    assert rel_err(merged, unmerged) < 1e-5
