"""Gated LoRA (MTP https://arxiv.org/abs/2507.11851, TARA https://arxiv.org/abs/2508.08812, MM-LoRA
https://arxiv.org/abs/2410.13733, RegionBLIP https://arxiv.org/abs/2308.02299) against hand computations."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import randomize_adapter, rel_err, tiny_llama, tiny_mlp
from peft_ext.tuners.gated_lora import GatedLoraConfig, GatedLoraLayer, gated_lora_layers, save_branch_as_lora

ALPHA = 16
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32, two small matmuls of width <= 64


def mlp_model(**kwargs):
    kwargs = {"r": 4, "lora_alpha": ALPHA, "target_modules": ["lin0"], **kwargs}
    model = get_peft_model(tiny_mlp(), GatedLoraConfig(**kwargs))
    randomize_adapter(model)
    return model, model.base_model.model.lin0


def branch_out(layer, x, b, adapter="default"):
    """Independent oracle: base + (α/r_b)·x A_bᵀ B_bᵀ for branch b, from the stacked weights."""
    ranks = layer.ranks[adapter]
    start = sum(ranks[:b])
    A = layer.gated_lora_down[adapter].weight[start : start + ranks[b]]
    B = layer.gated_lora_up[adapter].weight[:, start : start + ranks[b]]
    base = x @ layer.base_layer.weight.T + layer.base_layer.bias
    return base + (ALPHA / ranks[b]) * (x @ A.T @ B.T)


def base_out(layer, x):
    return x @ layer.base_layer.weight.T + layer.base_layer.bias


def run(model, x, **route):
    with torch.no_grad():
        return model(x, **route)


def layer_out(model, layer, x, **route):
    """The layer's output inside a real PeftModel call with these route inputs."""
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
    try:
        run(model, x, **route)
    finally:
        handle.remove()
    return seen["y"]


def test_gate_zero_is_bit_identical_to_base_even_with_non_finite_branch(mlp_inputs):
    model, layer = mlp_model(branches=["default"])
    with torch.no_grad():
        layer.gated_lora_up["default"].weight[0, 0] = float("inf")  # 0·inf would be NaN if we multiplied by the gate
        expected = tiny_mlp()(mlp_inputs)
    off = torch.full((mlp_inputs.shape[0],), -1)
    got = run(model, mlp_inputs, route_ids=off)
    assert torch.isfinite(got).all()
    assert torch.equal(got, expected)
    assert torch.equal(run(model, mlp_inputs), expected)  # no route input, no default_route: base only
    assert torch.equal(run(model, mlp_inputs, gate=torch.zeros(mlp_inputs.shape[0], dtype=torch.bool)), expected)


def test_gate_one_is_the_plain_lora_formula(mlp_inputs):
    model, layer = mlp_model(branches=["default"])
    on = torch.zeros(mlp_inputs.shape[0], dtype=torch.long)
    torch.testing.assert_close(
        layer_out(model, layer, mlp_inputs, route_ids=on), branch_out(layer, mlp_inputs, 0), **TOL)
    gated = layer_out(model, layer, mlp_inputs, gate=torch.ones(mlp_inputs.shape[0], dtype=torch.bool))
    torch.testing.assert_close(gated, branch_out(layer, mlp_inputs, 0), **TOL)


def test_mixed_routes_select_rows(mlp_inputs):
    model, layer = mlp_model(branches=["a", "b", "c"], r={"a": 2, "b": 3, "c": 4})
    route = torch.tensor([0, -1, 2, 1, -1])
    got = layer_out(model, layer, mlp_inputs, route_ids=route)
    base = base_out(layer, mlp_inputs)
    for i, b in enumerate(route.tolist()):
        if b < 0:
            assert torch.equal(got[i], layer.base_layer(mlp_inputs)[i])  # the same batched GEMM, row for row
        else:
            torch.testing.assert_close(got[i], branch_out(layer, mlp_inputs, b)[i], **TOL)
    assert not torch.allclose(got[0], base[0])


def test_unselected_branches_get_zero_gradient(mlp_inputs):
    model, layer = mlp_model(branches=["a", "b", "c"])
    model.train()
    model(mlp_inputs, route_ids=torch.tensor([0, 2, 2, -1, 0])).pow(2).sum().backward()
    gA, gB = layer.gated_lora_down["default"].weight.grad, layer.gated_lora_up["default"].weight.grad
    for b, used in enumerate([True, False, True]):
        rows = slice(4 * b, 4 * b + 4)
        assert (gA[rows].abs().sum() > 0) == used and (gB[:, rows].abs().sum() > 0) == used, f"branch {b}"


def test_per_call_branch_name_and_per_sample_ids_regionblip(mlp_inputs):
    model, layer = mlp_model(branches=["image", "image_region", "pointcloud", "pointcloud_region"])
    by_name = layer_out(model, layer, mlp_inputs, route_ids="pointcloud")
    torch.testing.assert_close(by_name, branch_out(layer, mlp_inputs, 2), **TOL)
    by_scalar = layer_out(model, layer, mlp_inputs, route_ids=torch.tensor(2))
    assert torch.equal(by_scalar, layer_out(model, layer, mlp_inputs, route_ids=torch.full((5,), 2)))
    torch.testing.assert_close(by_scalar, by_name, **TOL)
    with pytest.raises(ValueError, match="route_ids.*'video'"):
        run(model, mlp_inputs, route_ids="video")


def test_mm_lora_all_text_mask_equals_language_branch_alone(mlp_inputs):
    model, layer = mlp_model(branches=["vision", "language"], r=8, rank_ratio=[1, 3])
    assert layer.ranks["default"] == [2, 6]
    text = torch.zeros(mlp_inputs.shape[0], dtype=torch.bool)
    got = layer_out(model, layer, mlp_inputs, modality=text)
    torch.testing.assert_close(got, branch_out(layer, mlp_inputs, 1), **TOL)
    # the same as an adapter holding only the language branch's weights
    lang, lang_layer = mlp_model(branches=["language"], r=6)
    with torch.no_grad():
        lang_layer.gated_lora_down["default"].weight.copy_(layer.gated_lora_down["default"].weight[2:])
        lang_layer.gated_lora_up["default"].weight.copy_(layer.gated_lora_up["default"].weight[:, 2:])
    # zeroed vision columns join the GEMM's sums, so equal up to fp32 summation order
    torch.testing.assert_close(got, layer_out(lang, lang_layer, mlp_inputs, gate=~text), **TOL)
    mixed = layer_out(model, layer, mlp_inputs, modality=torch.tensor([1, 0, 1, 0, 0]))
    torch.testing.assert_close(mixed[0], branch_out(layer, mlp_inputs, 0)[0], **TOL)
    torch.testing.assert_close(mixed[1], branch_out(layer, mlp_inputs, 1)[1], **TOL)


def test_mode_sum_applies_every_branch_to_every_token(mlp_inputs):
    model, layer = mlp_model(branches=["vision", "language"], mode="sum")
    expected = branch_out(layer, mlp_inputs, 0) + branch_out(layer, mlp_inputs, 1) - base_out(layer, mlp_inputs)
    got = layer_out(model, layer, mlp_inputs, modality=torch.tensor([1, 0, 1, 0, 0]))  # ignored in sum mode
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(layer_out(model, layer, mlp_inputs), expected, **TOL)
    with torch.no_grad():  # sum mode is mergeable: ΔW = Σ_b s_b B_b A_b
        before = model(mlp_inputs)
        model.merge_adapter()
        assert rel_err(model(mlp_inputs), before) <= 1e-5


def test_route_input_errors_name_the_argument_through_peft_model(llama_inputs):
    model = get_peft_model(tiny_llama(), GatedLoraConfig(r=4, branches=["a", "b"], target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"route_ids must have shape \(2, 12\)"):
        model(llama_inputs, route_ids=torch.zeros(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="route_ids must be an integer tensor"):
        model(llama_inputs, route_ids=torch.zeros(2, 12))
    with pytest.raises(ValueError, match="route_ids must hold -1"):
        model(llama_inputs, route_ids=torch.full((2, 12), 2))
    with pytest.raises(ValueError, match="modality must be a bool"):
        model(llama_inputs, modality=torch.zeros(2, 12))
    with pytest.raises(ValueError, match="gate= switches on the default_route"):
        model(llama_inputs, gate=torch.ones(2, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="only one of"):
        model(llama_inputs, route_ids=torch.zeros(2, 12, dtype=torch.long),
              modality=torch.ones(2, 12, dtype=torch.bool))


def test_token_routes_through_a_llama(llama_inputs):
    base = tiny_llama()
    model = get_peft_model(tiny_llama(), GatedLoraConfig(r=4, branches=["mtp"], target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    with torch.no_grad():
        expected = base(llama_inputs).logits
        assert torch.equal(model(llama_inputs, route_ids=torch.full((2, 12), -1)).logits, expected)
        # MTP: gate only the last 4 positions; causal attention keeps the first 8 positions' logits exact
        gate = torch.zeros(2, 12, dtype=torch.bool)
        gate[:, 8:] = True
        got = model(llama_inputs, gate=gate).logits
    assert torch.equal(got[:, :8], expected[:, :8])
    assert not torch.allclose(got[:, 8:], expected[:, 8:])


def tara_alignment_oracle(model, ids, route, align):
    """TARA's token alignment loss from the k_proj inputs and weights (hand computation)."""
    inputs = []
    layers = [m for n, m in model.named_modules() if isinstance(m, GatedLoraLayer) and n.endswith("k_proj")]
    handles = [layer.register_forward_hook(lambda m, a, out: inputs.append(a[0].detach())) for layer in layers]
    with torch.no_grad():
        model(ids, route_ids=route)
    for h in handles:
        h.remove()
    terms = []
    for layer, x in zip(layers, inputs):
        W = layer.base_layer.weight
        A, B = layer.gated_lora_down["default"].weight, layer.gated_lora_up["default"].weight
        base = x @ W.T
        total = base + (ALPHA / 4) * (x @ A.T @ B.T)
        terms.append((total[route >= 0] - base[align]).abs().mean())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_tara_alignment_loss_matches_oracle_and_is_added_to_the_loss(weight, llama_inputs):
    config = GatedLoraConfig(
        r=4, lora_alpha=ALPHA, branches=["concept"], target_modules=["q_proj", "k_proj", "v_proj"],
        gated_modules=["k_proj", "v_proj"], alignment_loss_weight=weight, alignment_modules=["k_proj"],
    )
    model = get_peft_model(tiny_llama(), config)
    randomize_adapter(model)
    route = torch.full((2, 12), -1)
    route[0, 3], route[1, 5] = 0, 0  # the rare token <sks>
    align = torch.zeros(2, 12, dtype=torch.bool)
    align[0, 4], align[1, 6] = True, True  # the class word
    plain = model(llama_inputs, labels=llama_inputs, route_ids=route).loss
    with_align = model(llama_inputs, labels=llama_inputs, route_ids=route, align_mask=align)
    expected = weight * tara_alignment_oracle(model, llama_inputs, route, align)
    torch.testing.assert_close((with_align.loss - plain).detach(), expected, rtol=1e-4, atol=1e-6)
    if weight:
        with_align.loss.backward()  # the alignment term trains the k_proj branch
        k = next(m for n, m in model.named_modules() if isinstance(m, GatedLoraLayer) and n.endswith("k_proj"))
        assert k.gated_lora_up["default"].weight.grad.abs().sum() > 0
        bad = align.clone()
        bad[0, 0] = True
        with pytest.raises(ValueError, match="align_mask marks 3 tokens"):
            model(llama_inputs, labels=llama_inputs, route_ids=route, align_mask=bad)


def test_ungated_modules_apply_the_branch_to_every_token(llama_inputs):
    config = GatedLoraConfig(r=4, branches=["concept"], target_modules=["q_proj", "k_proj"], gated_modules=["k_proj"])
    model = get_peft_model(tiny_llama(), config)
    randomize_adapter(model)
    layers = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, GatedLoraLayer)}
    assert layers["q_proj"].gated["default"] is False and layers["k_proj"].gated["default"] is True
    with torch.no_grad():
        off = model(llama_inputs, route_ids=torch.full((2, 12), -1)).logits
        with model.disable_adapter():
            base = model(llama_inputs).logits
    assert not torch.allclose(off, base)  # q_proj's plain LoRA is on whatever the route


def test_merge_single_default_branch_and_refuse_routed(llama_inputs):
    model = get_peft_model(tiny_llama(), GatedLoraConfig(r=4, default_route="default", target_modules=["q_proj"]))
    randomize_adapter(model)
    with torch.no_grad():
        unmerged = model(llama_inputs).logits
        model.merge_adapter()
        assert rel_err(model(llama_inputs).logits, unmerged) <= 1e-5
        with pytest.raises(ValueError, match="merged"):
            model(llama_inputs, route_ids=torch.full((2, 12), -1))
        model.unmerge_adapter()
    routed = get_peft_model(tiny_llama(), GatedLoraConfig(r=4, branches=["a", "b"], target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot be merged"):
        routed.merge_adapter()
    assert not routed.supports_lora_conversion()


def test_save_branch_as_lora_drops_the_gate(tmp_path, llama_inputs):
    model = get_peft_model(tiny_llama(), GatedLoraConfig(r=4, branches=["a", "b"], target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    with pytest.warns(UserWarning, match="gate of branch 'b' is dropped"):
        save_branch_as_lora(model, tmp_path, "b")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        expected = model(llama_inputs, route_ids=torch.ones(2, 12, dtype=torch.long)).logits
        got = lora(llama_inputs).logits
    assert rel_err(got, expected) <= 1e-4  # SVD round trip of an exactly rank-4 ΔW in fp32
    assert all(not layer._export_branch for layer in gated_lora_layers(model))


def test_save_load_keeps_branches_and_routes(tmp_path, llama_inputs):
    config = GatedLoraConfig(r={"a": 2, "b": 6}, branches=["a", "b"], default_route="b", target_modules=["q_proj"])
    model = get_peft_model(tiny_llama(), config)
    randomize_adapter(model)
    route = torch.randint(-1, 2, (2, 12))
    with torch.no_grad():
        expected = model(llama_inputs, route_ids=route).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(llama_inputs, route_ids=route).logits, expected)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"branches": []}, "branches"),
        ({"branches": ["a", "a"]}, "branches"),
        ({"r": {"a": 2}, "branches": ["a", "b"]}, "r"),
        ({"rank_ratio": [1.0], "branches": ["a", "b"]}, "rank_ratio"),
        ({"mode": "mix"}, "mode"),
        ({"default_route": "x"}, "default_route"),
        ({"alignment_loss_weight": -1}, "alignment_loss_weight"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"GatedLoraConfig.{field} must be"):
        GatedLoraConfig(**kwargs)


def test_training_forward_without_route_input_or_default_route_names_both_ways_out(llama_inputs):
    """Issue 20: a bare config in training has no branch on for any token; it must say so at the forward, not let
    autograd fail at backward ("does not require grad")."""
    model = get_peft_model(tiny_llama(), GatedLoraConfig(r=4, branches=["a", "b"], target_modules=["q_proj"]))
    model.train()
    with pytest.raises(ValueError) as info:
        model(llama_inputs, labels=llama_inputs)
    message = str(info.value)
    for part in ("gated_lora", "'default'", "route_ids=", "modality=", "gate=", "default_route", "['a', 'b']"):
        assert part in message, part
    # the ways out train: a route input with the call, or default_route
    out = model(llama_inputs, labels=llama_inputs, route_ids=torch.zeros(2, 12, dtype=torch.long))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "gated_lora_up" in n)
    with_default = get_peft_model(tiny_llama(), GatedLoraConfig(r=4, default_route="default",
                                                                  target_modules=["q_proj"]))
    with_default.train()
    with_default(llama_inputs, labels=llama_inputs).loss.backward()
    # not a training forward: eval mode, no_grad (e.g. generate in train mode), disable_adapter() -> the base model
    with torch.no_grad():
        expected = tiny_llama()(llama_inputs).logits
        assert torch.equal(model(llama_inputs).logits, expected)
    with model.disable_adapter():
        assert torch.equal(model(llama_inputs).logits.detach(), expected)
    model.eval()
    assert torch.equal(model(llama_inputs).logits.detach(), expected)
    # ungated layers (gated_modules) apply the branch to every token, so the adapter trains without route inputs
    partial = get_peft_model(
        tiny_llama(), GatedLoraConfig(r=4, target_modules=["q_proj", "k_proj"], gated_modules=["k_proj"])
    )
    partial.train()
    partial(llama_inputs, labels=llama_inputs).loss.backward()
