"""MoLA against hand computations and independent oracles (paper https://arxiv.org/abs/2402.08562, official code
https://github.com/GCYZSL/MoLA): plain-LoRA and dense-mixture limits, the fused forward against a per-expert loop,
the balance loss, per-layer expert allocation, load statistics, merge refusal, save/load and config errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

from conftest import randomize_adapter, rel_err, tiny_llama, tiny_mlp
from peft_ext.tuners._shared.routing import routing_statistics
from peft_ext.tuners.mola import MolaConfig, MolaLayer, experts_per_layer, layer_index_of, mola_layers

R, ALPHA = 4, 8


def mola_mlp(**kwargs):
    cfg = dict(r=R, lora_alpha=ALPHA, num_experts=4, top_k=2, target_modules=["lin0"])
    model = get_peft_model(tiny_mlp(), MolaConfig(**{**cfg, **kwargs}))
    randomize_adapter(model)
    return model, model.base_model.model.lin0


def weights_of(layer, adapter="default"):
    return (
        layer.mola_router[adapter].weight,
        layer.mola_experts_down[adapter].weight,
        layer.mola_experts_up[adapter].weight,
    )


def loop_oracle(x, Wr, A, B, E, k, r, scale, renormalize=True):
    """The official code's algorithm (Linear_MoE.forward): a Python loop over experts, each applied to the tokens that
    selected it, weighted by the (renormalised) top-k softmax probability, accumulated with index_add_."""
    x2 = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(x2 @ Wr.T, dim=-1, dtype=torch.float)
    top_p, top_i = probs.topk(k, dim=-1)
    if renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros(x2.shape[0], B.shape[0])
    for e in range(E):
        tok, slot = torch.where(top_i == e)
        if tok.numel() == 0:
            continue
        y = (x2[tok] @ A[e * r : (e + 1) * r].T) @ B[:, e * r : (e + 1) * r].T * scale
        out.index_add_(0, tok, y * top_p[tok, slot, None])
    return out.reshape(*x.shape[:-1], -1)


def base_out(layer, x):
    return F.linear(x, layer.base_layer.weight, layer.base_layer.bias)


def test_one_expert_top1_equals_plain_lora(mlp_inputs):
    model, layer = mola_mlp(num_experts=1, top_k=1)
    _, A, B = weights_of(layer)
    expected = base_out(layer, mlp_inputs) + (ALPHA / R) * (mlp_inputs @ A.T @ B.T)
    with torch.no_grad():
        got = layer(mlp_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # fp32, same ops up to summation order


@pytest.mark.parametrize("E", [2, 4])
def test_top_k_equal_to_experts_is_the_dense_softmax_mixture(E, mlp_inputs):
    model, layer = mola_mlp(num_experts=E, top_k=E)
    Wr, A, B = weights_of(layer)
    p = torch.softmax(mlp_inputs @ Wr.T, dim=-1)
    mix = sum(p[:, e : e + 1] * (mlp_inputs @ A[e * R : (e + 1) * R].T @ B[:, e * R : (e + 1) * R].T) for e in range(E))
    expected = base_out(layer, mlp_inputs) + (ALPHA / R) * mix
    with torch.no_grad():
        got = layer(mlp_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (6, 3), (4, 1)])
def test_fused_forward_and_gradients_equal_the_per_expert_loop(E, k):
    model, layer = mola_mlp(num_experts=E, top_k=k)
    torch.manual_seed(7)
    x = torch.randn(3, 10, 64)
    Wr, A, B = weights_of(layer)
    renorm = layer.renormalize["default"]
    assert renorm == (k >= 2)  # renormalize=None: official for k >= 2, raw probability for k = 1
    got = layer(x)
    expected = base_out(layer, x) + loop_oracle(x, Wr, A, B, E, k, R, ALPHA / R, renorm)
    assert_same_sums(got, expected)
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), [Wr, A, B])
    ref = torch.autograd.grad((expected * g).sum(), [Wr, A, B])
    for a, b in zip(grads, ref):
        assert_same_sums(a, b)


def assert_same_sums(got, expected, ulps=16):
    """The fused path and the loop compute the same fp32 sums in different orders (gathered matmuls vs per-expert
    index_add_, and CPU kernels pick their blocking by instruction set), so they differ by a few units in the last
    place of the largest summands. An entry near zero by cancellation keeps that absolute error, so the absolute
    tolerance scales with the tensor's largest entry: 16 ulps of it (this machine: <= 3 ulps; CI once measured
    1.43e-6 on outputs of magnitude ~2, i.e. ~6 ulps, against a fixed atol of 1e-6). A wrong expert, weight or
    scale is off by orders of magnitude more."""
    atol = ulps * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)


def test_router_gets_gradient_for_k_at_least_2_and_the_top1_pitfall(mlp_inputs):
    norms = {}
    for k, renorm in [(2, None), (1, None), (1, True)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, layer = mola_mlp(num_experts=4, top_k=k, renormalize=renorm)
        model.train()
        model(mlp_inputs).pow(2).sum().backward()
        norms[(k, renorm)] = layer.mola_router["default"].weight.grad.norm().item()
    assert norms[(2, None)] > 1e-3 and norms[(1, None)] > 1e-3
    # top-1 renormalised: every weight is p/p = 1, so the task loss does not depend on the router; what is left is
    # the float rounding of p/p (~1e-7 relative)
    assert norms[(1, True)] < 1e-5 * norms[(1, None)], norms


def test_top1_with_renormalize_warns():
    with pytest.warns(UserWarning, match="no .*gradient"):
        MolaConfig(num_experts=4, top_k=1, renormalize=True, target_modules=["lin0"])


def test_last_load_sums_to_k_and_routing_statistics(llama_inputs):
    model = get_peft_model(tiny_llama(), MolaConfig(r=R, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    with torch.no_grad():
        model(input_ids=llama_inputs)
    stats = routing_statistics(model)
    assert len(stats) == 4  # 2 decoder layers x q, v
    for per_adapter in stats.values():
        load = per_adapter["default"]
        assert load.shape == (4,) and not load.requires_grad
        assert abs(load.sum().item() - 2) < 1e-6 and (load >= 0).all()
    # the load is what the router chose: recompute it for one layer
    layer = mola_layers(model)[0]
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=llama_inputs)
    handle.remove()
    logits = captured["x"] @ layer.mola_router["default"].weight.T
    top = logits.topk(2, dim=-1).indices.reshape(-1)
    expected = torch.bincount(top, minlength=4).float() / (llama_inputs.numel())
    torch.testing.assert_close(layer.last_load["default"], expected)


def _router_inputs(model, x):
    captured = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, layer=layer: captured.__setitem__(layer, a[0]))
        for layer in mola_layers(model)
    ]
    with torch.no_grad():
        model(input_ids=x)
    for h in handles:
        h.remove()
    return captured


def balance_oracle(model, x, per_layer=True):
    """Independent re-computation of MoLA's balance loss from captured layer inputs: per decoder layer the router
    logits of its modules are concatenated (official load_balancing_loss_func), f_e = share of routing slots that
    picked e (sums to 1), P̄_e = mean softmax probability, loss = E·Σ f_e P̄_e, summed over layers."""
    groups = {}
    for layer, inp in _router_inputs(model, x).items():
        logits = inp.reshape(-1, inp.shape[-1]) @ layer.mola_router["default"].weight.T
        key = layer.layer_index["default"] if per_layer else id(layer)
        groups.setdefault(key, []).append((logits, layer.top_k["default"]))
    total = 0.0
    for items in groups.values():
        logits = torch.cat([lg for lg, _ in items]).double()
        k = items[0][1]
        E = logits.shape[-1]
        p = torch.softmax(logits, dim=-1)
        picks = p.topk(k, dim=-1).indices.reshape(-1)
        f = torch.bincount(picks, minlength=E).double() / picks.numel()
        total += E * (f * p.mean(0)).sum().item()
    return total


@pytest.mark.parametrize("scope", ["layer", "module"])
def test_balance_loss_matches_oracle_and_is_added_to_outputs_loss(scope, llama_inputs):
    weight = 0.05
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = MolaConfig(r=R, num_experts="3,5", top_k=2, target_modules=targets, balance_loss_weight=weight,
                        balance_loss_scope=scope)
    model = get_peft_model(tiny_llama(), config)
    randomize_adapter(model)
    expected = weight * balance_oracle(model, llama_inputs, per_layer=scope == "layer")
    with_aux = model(input_ids=llama_inputs, labels=llama_inputs).loss
    aux = model.base_model.aux_loss()
    assert aux is not None and aux.requires_grad
    assert abs(aux.item() - expected) <= 1e-6 * max(1.0, expected)
    for layer in mola_layers(model):
        layer.balance_loss_weight["default"] = 0.0  # weight 0 disables the loss
    without = model(input_ids=llama_inputs, labels=llama_inputs).loss
    assert model.base_model.aux_loss() is None
    # the aux term is ~0.1; the two cross-entropies agree to fp32 rounding (~1e-6 on a loss of ~5)
    assert abs((with_aux - without).item() - expected) <= 1e-5
    # no labels: nothing is added, but aux_loss() is still readable for logging
    for layer in mola_layers(model):
        layer.balance_loss_weight["default"] = weight
    model(input_ids=llama_inputs)
    assert abs(model.base_model.aux_loss().item() - expected) <= 1e-6 * max(1.0, expected)


def test_balance_loss_reaches_the_router_and_is_not_recorded_without_grad(llama_inputs):
    model = get_peft_model(tiny_llama(), MolaConfig(r=R, num_experts=4, top_k=2, target_modules=["q_proj"],
                                                    balance_loss_weight=1.0))
    randomize_adapter(model)
    model(input_ids=llama_inputs)
    model.base_model.aux_loss().backward()
    layer = mola_layers(model)[-1]  # the last decoder layer: no router above it sees its experts' output
    assert layer.mola_router["default"].weight.grad.abs().sum() > 0
    assert layer.mola_experts_up["default"].weight.grad is None  # the loss depends on the router only
    with torch.no_grad():
        model(input_ids=llama_inputs)
    assert model.base_model.aux_loss() is None  # stale statistics of the earlier forward are ignored


def deep_llama(num_layers=8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_depth_pattern_and_per_layer_lists_set_the_experts_of_each_layer():
    model = get_peft_model(deep_llama(8), MolaConfig(r=2, num_experts="2,4,6,8", top_k=2,
                                                      target_modules=["q_proj", "down_proj"]))
    assert experts_per_layer(model) == {0: 2, 1: 2, 2: 4, 3: 4, 4: 6, 5: 6, 6: 8, 7: 8}
    for layer in mola_layers(model):
        E = layer.num_experts["default"]
        assert layer.mola_router["default"].weight.shape == (E, layer.in_features)
        assert layer.mola_experts_down["default"].weight.shape == (E * 2, layer.in_features)
        assert layer.mola_experts_up["default"].weight.shape == (layer.out_features, E * 2)
    per_layer = [1, 2, 3, 4, 5, 6, 7, 8]
    top_k = "1,2"
    config = MolaConfig(r=2, num_experts=per_layer, top_k=top_k, target_modules=["v_proj"])
    model = get_peft_model(deep_llama(8), config)
    assert experts_per_layer(model) == dict(enumerate(per_layer))
    assert {layer.layer_index["default"]: layer.top_k["default"] for layer in mola_layers(model)} == {
        0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2}
    # 5 layers, 4 groups: layer i gets pattern[i * 4 // 5]
    model = get_peft_model(deep_llama(5), MolaConfig(r=2, num_experts="2,4,6,8", top_k=1, target_modules=["q_proj"]))
    assert experts_per_layer(model) == {0: 2, 1: 2, 2: 4, 3: 6, 4: 8}


def test_layer_index_parsing():
    assert layer_index_of("model.layers.3.self_attn.q_proj") == 3
    assert layer_index_of("model.layers.3.mlp.experts.5.up_proj") == 3
    assert layer_index_of("model.layers.3.mlp.experts.5.up_proj", "experts") == 5
    assert layer_index_of("0.lin") == 0
    assert layer_index_of("lin0") is None


def test_per_layer_settings_errors_name_the_field():
    with pytest.raises(ValueError, match=r"num_experts.*one entry per layer \(8 layers\)"):
        get_peft_model(deep_llama(8), MolaConfig(num_experts=[2, 4], top_k=1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="MolaConfig.num_experts.*numbered layer list"):
        get_peft_model(tiny_mlp(), MolaConfig(num_experts="2,4", top_k=1, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="MolaConfig.top_k.*at most num_experts in every layer"):
        get_peft_model(deep_llama(4), MolaConfig(num_experts="1,4", top_k=2, target_modules=["q_proj"]))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": "2,x"}, "num_experts"),
        ({"num_experts": [2, 0]}, "num_experts"),
        ({"num_experts": True}, "num_experts"),
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"r": 0}, "r"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"renormalize": "yes"}, "renormalize"),
        ({"balance_loss_weight": -0.1}, "balance_loss_weight"),
        ({"balance_loss_scope": "model"}, "balance_loss_scope"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"MolaConfig\.{field} must be"):
        MolaConfig(target_modules=["q_proj"], **kwargs)


def test_merging_is_refused_with_a_clear_error(llama_inputs):
    model = get_peft_model(tiny_llama(), MolaConfig(r=R, num_experts=2, top_k=1, target_modules=["q_proj"]))
    layer = mola_layers(model)[0]
    assert not layer.supports_lora_conversion()
    for call in (model.merge_adapter, model.merge_and_unload, lambda: layer.get_delta_weight("default")):
        with pytest.raises(ValueError, match="cannot be merged.*routes every token"):
            call()


def test_save_load_with_a_depth_pattern(tmp_path, llama_inputs):
    from transformers import LlamaForCausalLM

    deep_llama(4).save_pretrained(tmp_path / "base")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(),
                           MolaConfig(r=R, num_experts="2,3,4,5", top_k="1,2", target_modules=["q_proj", "up_proj"]))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=llama_inputs).logits
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter")
    assert loaded.peft_config["default"].num_experts == "2,3,4,5"
    assert experts_per_layer(loaded) == {0: 2, 1: 3, 2: 4, 3: 5}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=llama_inputs).logits, expected)


def test_identity_at_init_and_adapter_changes_output(mlp_inputs):
    model = get_peft_model(tiny_mlp(), MolaConfig(r=R, num_experts=3, top_k=2, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        assert torch.equal(model(mlp_inputs), tiny_mlp()(mlp_inputs))
    randomize_adapter(model)
    with torch.no_grad():
        assert rel_err(model(mlp_inputs), tiny_mlp()(mlp_inputs)) > 1e-3
    assert all(isinstance(m, MolaLayer) for m in mola_layers(model)) and len(mola_layers(model)) == 2


def test_deepcopy_after_a_training_forward_with_balance_loss(llama_inputs):
    import copy

    model = get_peft_model(tiny_llama(), MolaConfig(r=R, num_experts=4, top_k=2, target_modules=["q_proj"],
                                                    balance_loss_weight=0.01))
    randomize_adapter(model)
    model(input_ids=llama_inputs, labels=llama_inputs)
    clone = copy.deepcopy(model)  # e.g. a frozen reference model made after some training
    assert model.base_model.aux_loss() is not None and clone.base_model.aux_loss() is None
    with torch.no_grad():
        assert torch.equal(clone(input_ids=llama_inputs).logits, model(input_ids=llama_inputs).logits)
