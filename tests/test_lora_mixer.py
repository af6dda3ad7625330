"""LoRA-Mixer (https://arxiv.org/abs/2507.00029) against hand computations of its routing formulas, and experts loaded
from real PEFT LoRA folders (official code https://github.com/hustcselwb/LoRA-Mixer is README only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import randomize_adapter, rel_err, tiny_llama, tiny_mlp
from peft_ext.tuners._shared.routing import routing_statistics
from peft_ext.tuners.lora_mixer import LoraMixerConfig, LoraMixerLayer, lora_mixer_layers

RANKS, ALPHAS = [2, 3, 4], [4.0, 3.0, 8.0]
# fp32, identical math in a different association order (the experts' scale multiplies inside the fused matmuls):
# rounding differences are ~1e-7 relative per op, far below these bounds.
RTOL, ATOL = 1e-5, 1e-6


def mixer_mlp(**kwargs):
    config = dict(r=RANKS, lora_alpha=ALPHAS, num_experts=3, target_modules=["lin0"], init_weights=False)
    model = get_peft_model(tiny_mlp(), LoraMixerConfig(**{**config, **kwargs}))
    randomize_adapter(model, std=0.2)
    return model, model.base_model.model.lin0


def expert_outputs(layer: LoraMixerLayer, x: torch.Tensor) -> torch.Tensor:
    """Oracle: each expert's s_e·B_e·A_e·x, one expert at a time, ``[E, N, out]``."""
    down, up = layer.lora_mixer_down["default"].weight, layer.lora_mixer_up["default"].weight
    outs, start = [], 0
    for r, a in zip(layer.r["default"], layer.lora_alpha["default"]):
        A, B = down[start : start + r], up[:, start : start + r]
        outs.append((a / r) * (x @ A.T @ B.T))
        start += r
    return torch.stack(outs)


def router_probs(layer, x, temperature=1.0):
    return torch.softmax(x @ layer.lora_mixer_router["default"].weight.T / temperature, dim=-1)


def test_top_k_all_experts_is_the_dense_softmax_mixture(mlp_inputs):
    model, layer = mixer_mlp(top_k=3, temperature=0.7)
    base = layer.base_layer
    with torch.no_grad():
        p = router_probs(layer, mlp_inputs, 0.7)
        expected = base(mlp_inputs) + torch.einsum("ne,eno->no", p, expert_outputs(layer, mlp_inputs))
        got = layer(mlp_inputs)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_top_k_forward_is_the_renormalised_hard_mixture_with_or_without_straight_through(mlp_inputs):
    model, layer = mixer_mlp(top_k=2)
    with torch.no_grad():
        p = router_probs(layer, mlp_inputs)
        top = p.topk(2, dim=-1).indices
        mask = torch.zeros_like(p).scatter(-1, top, 1.0)
        w = mask * p / (mask * p).sum(-1, keepdim=True)
        expected = layer.base_layer(mlp_inputs) + torch.einsum("ne,eno->no", w, expert_outputs(layer, mlp_inputs))
        got_st = layer(mlp_inputs)
        layer.straight_through["default"] = False
        got_plain = layer(mlp_inputs)
    torch.testing.assert_close(got_st, expected, rtol=RTOL, atol=ATOL)
    assert torch.equal(got_st, got_plain), "the straight-through forward must be exactly the hard forward"
    load = routing_statistics(model)["base_model.model.lin0"]["default"]
    torch.testing.assert_close(load, mask.mean(0))  # per-expert load of the last forward, sums to top_k
    assert load.sum().item() == pytest.approx(2.0)


def test_straight_through_router_gradient_is_the_soft_path_gradient(mlp_inputs):
    """Forward hard top-1, backward soft: dL/dW_r = d/dW_r <dL/dy, Σ_e p_e o_e> with the experts' outputs fixed;
    the experts themselves get the gradient of the hard forward."""
    model, layer = mixer_mlp(top_k=1, balance_loss_weight=0.0, entropy_loss_weight=0.0)
    model.train()
    torch.manual_seed(5)
    G = torch.randn(mlp_inputs.shape[0], 64)
    (layer(mlp_inputs) * G).sum().backward()  # dL/dy = G
    W_r = layer.lora_mixer_router["default"].weight.detach().clone().requires_grad_(True)
    outs = expert_outputs(layer, mlp_inputs).detach()
    p = torch.softmax(mlp_inputs @ W_r.T, dim=-1)
    (torch.einsum("ne,eno->no", p, outs) * G).sum().backward()
    # max-norm relative error: single entries are sums with cancellation, the tensor as a whole is what must agree
    assert rel_err(layer.lora_mixer_router["default"].weight.grad, W_r.grad) <= 1e-5
    assert W_r.grad.abs().sum() > 0
    # experts: gradient of the hard forward (top-1 renormalised: weight 1 on the chosen expert, 0 elsewhere)
    down = layer.lora_mixer_down["default"].weight.detach().clone().requires_grad_(True)
    up = layer.lora_mixer_up["default"].weight.detach().clone().requires_grad_(True)
    hard = F.one_hot(p.argmax(-1), 3).float()
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(RANKS))
    scale = torch.tensor([a / r for a, r in zip(ALPHAS, RANKS)])
    (((mlp_inputs @ down.T) * (hard * scale)[:, owner]) @ up.T * G).sum().backward()
    assert rel_err(layer.lora_mixer_up["default"].weight.grad, up.grad) <= 1e-5
    assert rel_err(layer.lora_mixer_down["default"].weight.grad, down.grad) <= 1e-5


def test_without_straight_through_top1_router_gets_no_task_gradient(mlp_inputs):
    model, layer = mixer_mlp(top_k=1, balance_loss_weight=0.0, entropy_loss_weight=0.0)
    model.train()
    router = layer.lora_mixer_router["default"].weight
    layer(mlp_inputs).pow(2).sum().backward()
    soft = router.grad.clone()
    router.grad = None
    layer.straight_through["default"] = False
    layer(mlp_inputs).pow(2).sum().backward()
    # renormalised top-1 weight p/p is identically 1: only float rounding (~1e-7 relative) reaches the router
    assert router.grad.abs().max() <= 1e-5 * soft.abs().max()


def test_frozen_experts_only_the_router_trains(llama_inputs):
    config = LoraMixerConfig(r=4, num_experts=3, top_k=2, freeze_experts=True, init_weights=False,
                             target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(), config)
    model.set_adapter("default")  # PEFT marks the active adapter trainable here; the experts must stay frozen
    model.train()
    model(input_ids=llama_inputs, labels=llama_inputs).loss.backward()
    layers = lora_mixer_layers(model)
    assert len(layers) == 4
    for layer in layers:
        for name in ("lora_mixer_down", "lora_mixer_up"):
            weight = getattr(layer, name)["default"].weight
            assert not weight.requires_grad and weight.grad is None
        router = layer.lora_mixer_router["default"].weight
        assert router.requires_grad and router.grad is not None and router.grad.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_mixer_router" in n for n in trainable)


def test_aux_losses_equal_oracles_and_join_outputs_loss(llama_inputs):
    lam_bal, lam_ent, k, E, tau = 0.3, 0.2, 2, 3, 1.5
    config = LoraMixerConfig(r=4, num_experts=E, top_k=k, temperature=tau, balance_loss_weight=lam_bal,
                             entropy_loss_weight=lam_ent, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(), config)
    randomize_adapter(model, std=0.3)
    model.train()
    inputs = {}
    for layer in lora_mixer_layers(model):
        layer.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0].detach()))
    out = model(input_ids=llama_inputs, labels=llama_inputs)
    expected = 0.0
    for layer, x in inputs.items():
        p = router_probs(layer, x.reshape(-1, 64), tau)
        mask = torch.zeros_like(p).scatter(-1, p.topk(k, dim=-1).indices, 1.0)
        balance = E * (mask.mean(0) * p.mean(0)).sum()
        entropy = -(p * p.log()).sum(-1).mean()
        expected = expected + lam_bal * balance + lam_ent * entropy
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), llama_inputs[:, 1:].reshape(-1))
    torch.testing.assert_close(model.base_model.aux_loss(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, ce + expected, rtol=1e-5, atol=1e-6)
    # weight 0 disables each term
    for layer in lora_mixer_layers(model):
        layer.balance_loss_weight["default"] = 0.0
        layer.entropy_loss_weight["default"] = 0.0
    out0 = model(input_ids=llama_inputs, labels=llama_inputs)
    assert model.base_model.aux_loss() is None
    torch.testing.assert_close(out0.loss, ce, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- experts from LoRA folders
LORA_SPECS = [  # different ranks and alphas; one uses rank_pattern, one rsLoRA, one adapts k_proj too
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "k_proj"], rank_pattern={"v_proj": 6}),
    dict(r=3, lora_alpha=9, target_modules=["q_proj", "v_proj"], use_rslora=True),
]


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    paths = []
    for i, spec in enumerate(LORA_SPECS):
        model = get_peft_model(tiny_llama(), LoraConfig(**spec))
        randomize_adapter(model, seed=10 + i, std=0.2)
        model.save_pretrained(root / f"lora{i}")
        paths.append(str(root / f"lora{i}"))
    return paths


def lora_logits(path, x):
    """The source LoRA's logits, restricted to the modules the mixer adapts (lora1 also adapts k_proj)."""
    model = PeftModel.from_pretrained(tiny_llama(), path)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("k_proj") and hasattr(module, "lora_B"):
                module.lora_B["default"].weight.zero_()
        return model(input_ids=x).logits


def mixer_from(paths, **kwargs):
    with pytest.warns(UserWarning, match="not target"):  # lora1 also adapts k_proj, which the mixer leaves out
        return get_peft_model(tiny_llama(), LoraMixerConfig(expert_adapters=list(paths),
                                                             target_modules=["q_proj", "v_proj"], **kwargs))


def test_one_hot_route_reproduces_each_source_lora(lora_folders, llama_inputs):
    model = mixer_from(lora_folders)
    config = model.peft_config["default"]
    assert config.num_experts == 3 and config.freeze_experts is True
    assert config.r == [2, 4, 3] and config.lora_alpha[:2] == [4.0, 2.0]
    assert config.lora_alpha[2] == pytest.approx(9 * 3**0.5)  # rsLoRA α/√r stored as (α·√r)/r
    assert all(v == [2, 6, 3] for v in config.rank_pattern.values()) and len(config.rank_pattern) == 2  # v_proj x 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_mixer_router" in n
    }
    refs = [lora_logits(path, llama_inputs) for path in lora_folders]
    with torch.no_grad():
        for e, ref in enumerate(refs):
            got = model(input_ids=llama_inputs, expert_ids=torch.full(llama_inputs.shape, e))
            assert rel_err(got.logits, ref) <= 1e-5, e
        per_sample = model(input_ids=llama_inputs, expert_ids=torch.tensor([0, 2])).logits
        assert rel_err(per_sample[0], refs[0][0]) <= 1e-5 and rel_err(per_sample[1], refs[2][1]) <= 1e-5
        none = model(input_ids=llama_inputs, expert_ids=torch.full(llama_inputs.shape, -1)).logits
        with model.disable_adapter():
            assert torch.equal(none, model(input_ids=llama_inputs).logits)  # -1: no expert, the exact base output


def test_saved_mixer_loads_without_the_source_folders(lora_folders, tmp_path, llama_inputs):
    copies = []
    for i, path in enumerate(lora_folders):
        copies.append(str(tmp_path / f"copy{i}"))
        shutil.copytree(path, copies[-1])
    model = mixer_from(copies, top_k=2)
    randomize_adapter(model, seed=3, std=0.5)  # a trained router
    model.save_pretrained(tmp_path / "mixer")
    with torch.no_grad():
        expected = model(input_ids=llama_inputs).logits
        forced = model(input_ids=llama_inputs, expert_ids=torch.ones(llama_inputs.shape, dtype=torch.long)).logits
    for path in copies:
        shutil.rmtree(path)
    saved = json.loads((tmp_path / "mixer" / "adapter_config.json").read_text())
    assert saved["r"] == [2, 4, 3] and saved["expert_adapters"] == copies
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "mixer")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=llama_inputs).logits, expected)
        assert torch.equal(
            loaded(input_ids=llama_inputs, expert_ids=torch.ones(llama_inputs.shape, dtype=torch.long)).logits, forced
        )
    with pytest.raises(ValueError, match="expert_adapters"):  # a new mixer from the same config does need them
        get_peft_model(tiny_llama(), LoraMixerConfig(expert_adapters=copies, target_modules=["q_proj"]))


def test_bad_expert_folders_are_clear_errors(lora_folders, tmp_path):
    with pytest.raises(ValueError, match=r"expert_adapters.*not a folder"):
        get_peft_model(tiny_llama(), LoraMixerConfig(expert_adapters=[str(tmp_path / "missing")]))
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"expert_adapters.*target_modules"):  # lora0 has no k_proj
        get_peft_model(base, LoraMixerConfig(expert_adapters=lora_folders[:2], target_modules=["k_proj"]))
    assert not lora_mixer_layers(base)  # the folders are checked before any module is replaced
    dora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        get_peft_model(tiny_llama(), LoraMixerConfig(expert_adapters=[str(tmp_path / "dora")],
                                                     target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="num_experts"):
        LoraMixerConfig(expert_adapters=lora_folders, num_experts=2)


def test_merge_and_conversion_refused_with_a_clear_error():
    model = get_peft_model(tiny_llama(), LoraMixerConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merg"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="merg"):
        model.merge_and_unload()
    layer = lora_mixer_layers(model)[0]
    with pytest.raises(ValueError, match="merg"):
        layer.get_delta_weight("default")
    assert not layer.supports_lora_conversion()


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.zeros(2, 11, dtype=torch.long), r"expert_ids must have shape"),
        (torch.zeros(2, 12), r"expert_ids must be an integer tensor"),
        (torch.full((2, 12), 3), r"expert_ids must lie in -1\.\.2"),
        ([0, 1], r"expert_ids must be a torch.Tensor"),
    ],
)
def test_wrong_expert_ids_name_the_argument(ids, match, llama_inputs):
    model = get_peft_model(tiny_llama(), LoraMixerConfig(num_experts=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=match):
        model(input_ids=llama_inputs, expert_ids=ids)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"num_experts": 3, "r": [4, 4]}, "r"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"temperature": 0}, "temperature"),
        ({"balance_loss_weight": -0.1}, "balance_loss_weight"),
        ({"expert_adapters": "some/folder"}, "expert_adapters"),
        ({"num_experts": 0}, "num_experts"),
        ({"rank_pattern": {"q_proj": [1, 2]}}, "rank_pattern"),
        ({"straight_through": "yes"}, "straight_through"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraMixerConfig\.{field}"):
        LoraMixerConfig(**kwargs)


def test_default_targets_are_the_attention_projections():
    model = get_peft_model(tiny_llama(), LoraMixerConfig())
    assert model.peft_config["default"].target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert model.peft_config["default"].num_experts == 4


@pytest.mark.parametrize("name", ["lora_mixer.yaml", "lora_mixer_frozen.yaml"])
def test_presets_build(name):
    from peft_ext.presets import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / name)  # never reads the placeholder folders
    assert isinstance(config, LoraMixerConfig) and config.top_k <= config.num_experts
    assert config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
