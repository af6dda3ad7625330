"""SMoRA against hand computations (paper https://arxiv.org/abs/2501.15103; no public code): the LoRA limit, the
block-gated equivalence with MoLA, the selection-only bias and its update rule, save/load of the bias, merge refusal
and config errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

from conftest import randomize_adapter, tiny_llama, tiny_mlp
from peft_ext.callbacks.smora import SmoraBiasCallback
from peft_ext.tuners.mola import MolaConfig
from peft_ext.tuners.smora import SmoraConfig, SmoraLayer, smora_layers, update_smora_bias

R, ALPHA = 8, 16


def smora_mlp(**kwargs):
    cfg = dict(r=R, lora_alpha=ALPHA, top_k=4, target_modules=["lin0"])
    model = get_peft_model(tiny_mlp(), SmoraConfig(**{**cfg, **kwargs}))
    randomize_adapter(model)
    return model, model.base_model.model.lin0


def parts(layer, adapter="default"):
    return (layer.smora_router[adapter].weight, layer.smora_down[adapter].weight, layer.smora_up[adapter].weight)


def base_out(layer, x):
    return F.linear(x, layer.base_layer.weight, layer.base_layer.bias)


def test_all_ranks_active_with_constant_gate_is_lora(mlp_inputs):
    """k = r and W_g = 0: every gate is σ(0) = 1/2, so SMoRA is LoRA with half the scale."""
    model, layer = smora_mlp(top_k=R)
    Wg, A, B = parts(layer)
    with torch.no_grad():
        Wg.zero_()
        got = layer(mlp_inputs)
    expected = base_out(layer, mlp_inputs) + 0.5 * (ALPHA / R) * (mlp_inputs @ A.T @ B.T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate_fn", ["sigmoid", "softmax"])
def test_forward_equals_the_formula_with_a_selection_only_bias(gate_fn, mlp_inputs):
    model, layer = smora_mlp(gate_fn=gate_fn, top_k=3)
    Wg, A, B = parts(layer)
    bias = torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0])  # forces ranks 1 and 6 into every selection
    layer.smora_bias["default"].copy_(bias)
    logits = mlp_inputs @ Wg.T
    s = torch.sigmoid(logits) if gate_fn == "sigmoid" else torch.softmax(logits, -1)
    chosen = (s + bias).topk(3, dim=-1).indices
    mask = torch.zeros_like(s).scatter(-1, chosen, 1.0)
    assert (mask[:, 1] == 1).all() and (mask[:, 6] == 1).all()
    g = s * mask  # the gate is the score, without the bias (DeepSeek-V3 style)
    expected = base_out(layer, mlp_inputs) + (ALPHA / R) * ((mlp_inputs @ A.T) * g) @ B.T
    with torch.no_grad():
        got = layer(mlp_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.last_load["default"], mask.mean(0))
    assert abs(layer.last_load["default"].sum().item() - 3) < 1e-6


def test_bias_in_gate_and_normalized_gates(mlp_inputs):
    model, layer = smora_mlp(top_k=2, bias_in_gate=True, normalize_gates=True)
    Wg, A, B = parts(layer)
    bias = torch.linspace(-0.2, 0.2, R)
    layer.smora_bias["default"].copy_(bias)
    score = torch.sigmoid(mlp_inputs @ Wg.T) + bias
    mask = torch.zeros_like(score).scatter(-1, score.topk(2, -1).indices, 1.0)
    g = score * mask
    g = g / g.sum(-1, keepdim=True)
    expected = base_out(layer, mlp_inputs) + (ALPHA / R) * ((mlp_inputs @ A.T) * g) @ B.T
    with torch.no_grad():
        torch.testing.assert_close(layer(mlp_inputs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*top_k=1 with renormalize=True")  # E=2, k=1: MoLA's pitfall, on purpose
@pytest.mark.parametrize("E,k", [(4, 2), (2, 1), (4, 4)])
def test_block_gates_equal_mola_with_E_experts_of_rank_r_over_E(E, k):
    """The paper's equivalence: a multi-LoRA MoE with E experts of rank r/E is a rank-r LoRA with block-level
    activation. SMoRA with block_size r/E, softmax scores and normalised gates reproduces MoLA exactly (MoLA's scale
    is α/(r/E), so SMoRA needs α·E)."""
    rank = R // E
    torch.manual_seed(3)
    x = torch.randn(2, 9, 64)
    mola = get_peft_model(tiny_mlp(), MolaConfig(r=rank, lora_alpha=ALPHA, num_experts=E, top_k=k,
                                                 renormalize=True, target_modules=["lin0"]))
    randomize_adapter(mola)
    smora = get_peft_model(tiny_mlp(), SmoraConfig(r=R, lora_alpha=ALPHA * E, top_k=k, block_size=rank,
                                                   gate_fn="softmax", normalize_gates=True, target_modules=["lin0"]))
    m, s = mola.base_model.model.lin0, smora.base_model.model.lin0
    with torch.no_grad():
        s.smora_router["default"].weight.copy_(m.mola_router["default"].weight)
        s.smora_down["default"].weight.copy_(m.mola_experts_down["default"].weight)
        s.smora_up["default"].weight.copy_(m.mola_experts_up["default"].weight)
        torch.testing.assert_close(s(x), m(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.last_load["default"], m.last_load["default"])


def test_router_gets_gradient_even_with_one_active_rank(mlp_inputs):
    model, layer = smora_mlp(top_k=1)
    model.train()
    model(mlp_inputs).pow(2).sum().backward()
    assert layer.smora_router["default"].weight.grad.abs().sum() > 0
    assert "smora_bias" not in " ".join(n for n, _ in model.named_parameters())  # the bias is a buffer, never trained


def cv(load):
    """Coefficient of variation of the per-expert load: 0 for perfect balance."""
    return (load.std() / load.mean()).item()


def test_bias_rule_reduces_imbalance_on_a_skewed_router():
    model, layer = smora_mlp(top_k=2, bias_update_rate=0.01)
    with torch.no_grad():
        layer.smora_router["default"].weight[:2] += 0.05  # with inputs of mean 1, ranks 0 and 1 win most tokens
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(64, 64, generator=gen) + 1 for _ in range(100)]
    held_out = torch.randn(512, 64, generator=gen) + 1
    callback = SmoraBiasCallback(model)
    model.train()

    def load_on_held_out():
        with torch.no_grad():
            model(held_out)
        load = layer.accumulated_load("default").clone()
        layer.reset_load("default")
        return load

    first = load_on_held_out()
    for x in steps:
        with torch.no_grad():
            model(x)
        used = callback.step()
    assert callback.num_updates == len(steps) and len(used) == 1
    last = load_on_held_out()
    assert first[:2].min() > 0.5 and cv(first) > 1.0, first  # the router really is skewed
    # 100 sign steps of 0.01 move b by up to 1, more than the score gap; seeded, measured CV 1.54 -> 0.20
    assert cv(last) < 0.5 * cv(first), (first, last)
    bias = layer.smora_bias["default"]
    assert (bias[:2] < 0).all() and bias[2:].max() > 0  # over-loaded down, under-loaded up


def test_bias_update_is_sign_rule_on_the_accumulated_load_and_resets():
    model, layer = smora_mlp(top_k=2, bias_update_rate=0.1)
    x1, x2 = torch.randn(5, 64), torch.randn(7, 64)
    model.eval()
    with torch.no_grad():
        model(x1)
    assert layer.accumulated_load("default") is None  # eval forwards do not count
    assert update_smora_bias(model) == {}
    model.train()
    masks = []
    for x in (x1, x2):  # two micro-batches of one optimizer step
        with torch.no_grad():
            model(x)
            masks.append(layer.gates("default", x)[1])
    load = torch.cat(masks).mean(0)
    before = layer.smora_bias["default"].clone()
    SmoraBiasCallback(model).on_optimizer_step(None, None, None)
    torch.testing.assert_close(layer.smora_bias["default"], before + 0.1 * torch.sign(load.mean() - load))
    assert layer.load_tokens["default"] == 0  # reset for the next step


def test_bias_update_all_reduces_the_load_when_distributed(monkeypatch):
    """Under torch.distributed the counts of all ranks are summed (one all-reduce) before the sign rule. The fake
    all_reduce adds a second rank's counts that reverse the local imbalance, so the update must follow the sum."""
    import torch.distributed as dist

    model, layer = smora_mlp(top_k=2, bias_update_rate=0.1)
    model.train()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(x)
    local, n_local = layer.load_sum["default"].clone(), layer.load_tokens["default"]
    other = 2 * local.max() - local + torch.arange(R)  # the other rank's counts: the local ranking reversed
    n_other = 10
    calls = []

    def fake_all_reduce(tensor, op=None, **kwargs):
        calls.append((tensor.dtype, op))
        tensor.add_(torch.cat([other, torch.tensor([float(n_other)])]).to(tensor))

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    used = update_smora_bias(model)
    assert calls == [(torch.float64, dist.ReduceOp.SUM)]  # one collective for all layers
    load = (local + other) / (n_local + n_other)
    torch.testing.assert_close(used["base_model.model.lin0.default"], load, rtol=1e-6, atol=0)
    expected = 0.1 * torch.sign(load.mean() - load)
    local_rule = 0.1 * torch.sign(local.mean() - local)
    assert not torch.equal(expected, local_rule)  # a rank-local update would differ
    assert torch.equal(layer.smora_bias["default"], expected)
    assert layer.load_tokens["default"] == 0


DDP_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from peft import get_peft_model
    from peft_ext.tuners.smora import SmoraConfig, update_smora_bias

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 16)),
                           SmoraConfig(r=8, top_k=2, bias_update_rate=0.1, target_modules=["0"]))
    layer = model.base_model.model[0]
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(40, 16, generator=gen) * 3 for _ in range(2)]  # rank i trains on xs[i]
    model.train()
    with torch.no_grad():
        model(xs[rank])
        masks = [layer.gates("default", x)[1] for x in xs]
    update_smora_bias(model)
    torch.save({"bias": layer.smora_bias["default"].clone(), "masks": masks}, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
    """
)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="no gloo backend"
)
def test_two_gloo_ranks_apply_the_same_bias_update_from_the_global_load(tmp_path):
    """Two CPU processes under torchrun (~10 s): each sees a different batch, both end with the bias of the summed
    load; each rank's own load would give different updates."""
    script = tmp_path / "smora_ddp_worker.py"
    script.write_text(DDP_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    masks = ranks[0]["masks"]
    assert all(torch.equal(a, b) for a, b in zip(masks, ranks[1]["masks"]))  # same model on both ranks
    load = torch.cat(masks).mean(0)
    expected = 0.1 * torch.sign(load.mean() - load)
    for i, rank in enumerate(ranks):
        assert torch.equal(rank["bias"], expected), i
        own = masks[i].mean(0)
        assert not torch.equal(0.1 * torch.sign(own.mean() - own), expected)  # the rank-local rule would drift


def test_callback_runs_under_trainer_events_and_takes_the_model_from_the_trainer():
    from transformers import TrainerControl, TrainerState

    model, layer = smora_mlp(top_k=2, bias_update_rate=0.5)
    callback = SmoraBiasCallback(seed=0)
    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    model.train()
    model(torch.randn(16, 64)).sum().backward()
    callback.on_optimizer_step(None, TrainerState(), TrainerControl(), model=model)
    assert callback.num_updates == 1 and layer.smora_bias["default"].abs().sum() > 0
    with pytest.raises(ValueError, match="SmoraBiasCallback.rate"):
        SmoraBiasCallback(rate=-1)
    with pytest.raises(ValueError, match="needs the model"):
        SmoraBiasCallback().step()


def test_bias_is_saved_and_reloaded(tmp_path, llama_inputs):
    model = get_peft_model(tiny_llama(), SmoraConfig(r=R, top_k=3, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    for i, layer in enumerate(smora_layers(model)):
        layer.smora_bias["default"].copy_(torch.linspace(-1, 1, R) * (i + 1))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=llama_inputs).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for a, b in zip(smora_layers(model), smora_layers(loaded)):
        assert torch.equal(a.smora_bias["default"], b.smora_bias["default"])
        assert b.smora_bias["default"].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=llama_inputs).logits, expected)


def test_merging_is_refused_with_a_clear_error():
    model = get_peft_model(tiny_llama(), SmoraConfig(r=R, top_k=2, target_modules=["q_proj"]))
    layer = smora_layers(model)[0]
    assert isinstance(layer, SmoraLayer) and not layer.supports_lora_conversion()
    for call in (model.merge_adapter, model.merge_and_unload, lambda: layer.get_delta_weight("default")):
        with pytest.raises(ValueError, match="cannot be merged.*subset of ranks"):
            call()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"r": 0}, "r"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 9}, "top_k"),
        ({"block_size": 3}, "block_size"),
        ({"block_size": 4, "top_k": 3}, "top_k"),
        ({"gate_fn": "relu"}, "gate_fn"),
        ({"normalize_gates": 1}, "normalize_gates"),
        ({"bias_update_rate": -1e-3}, "bias_update_rate"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SmoraConfig\.{field} must be"):
        SmoraConfig(**{"r": R, "target_modules": ["q_proj"], **kwargs})
