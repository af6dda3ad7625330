"""Block-LoRA (https://arxiv.org/abs/2501.16720, no public code) against hand computations of its definition."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import randomize_adapter, rel_err, tiny_llama, tiny_mlp
from peft_ext.tuners.block_lora import BlockLoraConfig, BlockLoraLayer, block_lora_layers

R, N, ALPHA = 8, 4, 16


def block_mlp(seed: int = 5, **kwargs):
    kwargs = {"r": R, "n_blocks": N, "lora_alpha": ALPHA, "target_modules": ["lin0"], **kwargs}
    base = tiny_mlp()
    torch.manual_seed(seed)
    model = get_peft_model(base, BlockLoraConfig(**kwargs))
    return model, model.base_model.model.lin0


def test_fused_forward_equals_block_loop_and_unfused_lora_definition(mlp_inputs):
    model, layer = block_mlp()
    randomize_adapter(model)
    A_s = layer.block_lora_down["default"].weight  # (r/n, in)
    B = layer.block_lora_up["default"].weight  # (out, r) = [B_1 ... B_n]
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    s, rb, x = ALPHA / R, R // N, mlp_inputs
    loop = sum(s * (x @ A_s.T) @ B[:, i * rb:(i + 1) * rb].T for i in range(N))  # Σ_i s·x A_sᵀ B_iᵀ
    A_full = torch.cat([A_s] * N, dim=0)  # the unfused definition: rank-r LoRA whose A-blocks are all A_s
    unfused = s * (x @ A_full.T) @ B.T
    with torch.no_grad():
        fused = layer(x) - (x @ W.T + bias)
    # fp32, three summation orders of the same products over r <= 8 terms: agreement to ~1e-7 of the values
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    assert fused.abs().max() > 1e-3  # the branch is not trivially zero


def test_equals_peft_lora_of_rank_r_over_n_with_summed_blocks(llama_inputs):
    targets = ["q_proj", "v_proj", "down_proj"]
    block = get_peft_model(tiny_llama(), BlockLoraConfig(r=R, n_blocks=N, lora_alpha=ALPHA, target_modules=targets))
    randomize_adapter(block)
    # LoRA(r/n) has scale α'/(r/n); α' = α/n gives Block-LoRA's α/r
    lora = get_peft_model(tiny_llama(), LoraConfig(r=R // N, lora_alpha=ALPHA / N, target_modules=targets))
    layers = {n: m for n, m in block.named_modules() if isinstance(m, BlockLoraLayer)}
    with torch.no_grad():
        for name, module in lora.named_modules():
            if name in layers:
                module.lora_A["default"].weight.copy_(layers[name].block_lora_down["default"].weight)
                module.lora_B["default"].weight.copy_(layers[name].blocks("default").sum(0))
        got, expected = block(input_ids=llama_inputs).logits, lora(input_ids=llama_inputs).logits
    assert len(layers) == 6
    assert rel_err(got, expected) <= 1e-6  # same matmuls up to the order of the block sum


def test_delta_weight_and_merge(mlp_inputs):
    model, layer = block_mlp()
    randomize_adapter(model)
    A_s, blocks = layer.block_lora_down["default"].weight, layer.blocks("default")
    expected = (ALPHA / R) * blocks.sum(0) @ A_s
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, rtol=1e-6, atol=1e-7)
    assert torch.linalg.matrix_rank(expected).item() == R // N  # ΔW has rank r/n, not r
    with torch.no_grad():
        unmerged = model(mlp_inputs)
        model.merge_adapter()
        merged = model(mlp_inputs)
        model.unmerge_adapter()
        again = model(mlp_inputs)
    assert rel_err(merged, unmerged) <= 1e-5 and rel_err(again, unmerged) <= 1e-5


def test_parameter_count_and_identical_block_gradients(mlp_inputs):
    model, layer = block_mlp()
    randomize_adapter(model)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_params == (R // N) * 64 + R * 64  # shared A_s (r/n × in) + n blocks (out × r/n)
    model.train()
    model(mlp_inputs).pow(2).sum().backward()
    grad = layer.block_lora_up["default"].weight.grad.view(64, N, R // N)
    assert grad.abs().sum() > 0
    for i in range(1, N):  # every B_i gets exactly the gradient of B' = Σ B_i
        assert torch.equal(grad[:, i], grad[:, 0])


def _train(model, steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 64, generator=gen), torch.randn(16, 4, generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    model.eval()


def test_init_B_zeros_blocks_stay_identical_through_training(mlp_inputs):
    model, layer = block_mlp(init_B="zeros")
    with torch.no_grad():
        assert torch.equal(model(mlp_inputs), tiny_mlp()(mlp_inputs))  # ΔW = 0 at init
    _train(model)
    blocks = layer.blocks("default")
    assert blocks.abs().sum() > 0
    for i in range(1, N):  # the documented pitfall: zero-initialised blocks never separate
        assert torch.equal(blocks[i], blocks[0])


def test_init_B_zero_sum_starts_at_identity_but_trains_like_zeros(mlp_inputs):
    zeros, zl = block_mlp(init_B="zeros")
    zero_sum, sl = block_mlp(init_B="zero_sum")
    assert torch.equal(zl.block_lora_down["default"].weight, sl.block_lora_down["default"].weight)  # same A_s
    blocks = sl.blocks("default")
    assert torch.equal(blocks.sum(0), torch.zeros_like(blocks[0]))  # exactly zero in float32
    assert not torch.equal(blocks[0], blocks[1])
    with torch.no_grad():
        assert torch.equal(zero_sum(mlp_inputs), tiny_mlp()(mlp_inputs))  # identity at init
    _train(zeros)
    _train(zero_sum)
    dz, ds = zl.get_delta_weight("default"), sl.get_delta_weight("default")
    assert dz.abs().max() > 1e-3
    # Same gradients, same Adam states: only the rounding of B_i(0) + update differs (~1e-7 relative per step),
    # carried through 5 AdamW steps.
    assert rel_err(ds, dz) <= 1e-5  # measured ~3e-7
    assert not torch.equal(sl.blocks("default")[0], sl.blocks("default")[1])  # blocks still differ


def test_init_weights_false_gives_random_non_zero_blocks(mlp_inputs):
    model, layer = block_mlp(init_weights=False)
    assert layer.get_delta_weight("default").abs().max() > 0
    assert len(block_lora_layers(model)) == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 6, "n_blocks": 4}, r"BlockLoraConfig\.n_blocks must be a divisor of r=6; got 4"),
        ({"n_blocks": 0}, r"BlockLoraConfig\.n_blocks must be an integer >= 1"),
        ({"r": 0}, r"BlockLoraConfig\.r must be an integer >= 1"),
        ({"init_B": "ones"}, r"BlockLoraConfig\.init_B must be one of \('zeros', 'zero_sum'\); got 'ones'"),
        ({"lora_dropout": 1.0}, r"BlockLoraConfig\.lora_dropout must be a number in \[0, 1\)"),
        ({"lora_alpha": 0}, r"BlockLoraConfig\.lora_alpha must be a number > 0"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockLoraConfig(**kwargs)
