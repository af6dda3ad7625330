"""O3 orthogonal LoRA (https://arxiv.org/abs/2407.10223, code https://github.com/GCYZSL/O3-LLM-UNLEARNING) against hand
computations: the gated branch, the orthogonality loss, snapshots, merging at a fixed gate, the gate scorer."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import randomize_adapter, rel_err, tiny_llama, tiny_mlp
from peft_ext.tuners.o3_lora import (
    O3LoraConfig,
    O3LoraLayer,
    block_key,
    o3_layers,
    orthogonality_loss,
    set_gate_scorer,
    snapshot_request,
    start_new_request,
)

R, ALPHA = 8, 16
TARGETS = ["q_proj", "v_proj", "down_proj"]


def o3_llama(**kwargs):
    model = get_peft_model(tiny_llama(), O3LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, **kwargs))
    randomize_adapter(model)
    return model


def o3_mlp(**kwargs):
    model = get_peft_model(tiny_mlp(), O3LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin0"], **kwargs))
    randomize_adapter(model)
    return model, model.base_model.model.lin0


def named_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, O3LoraLayer)}


def base_logits(model, x):
    with torch.no_grad(), model.disable_adapter():
        return model(input_ids=x).logits


# ---------------------------------------------------------------------------------------------------- the gate
@pytest.mark.parametrize("gate", [0.0, 0, torch.tensor(0.0), torch.zeros(2), torch.zeros(2, 12)])
def test_gate_zero_gives_the_base_output_bit_for_bit(gate, llama_inputs):
    model = o3_llama()
    expected = base_logits(model, llama_inputs)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=llama_inputs).logits, expected)  # the adapter is not trivial
        assert torch.equal(model(input_ids=llama_inputs, ood_weight=gate).logits, expected)


@pytest.mark.parametrize("gate", [1.0, 0.3, 1.2])
def test_scalar_gate_scales_the_lora_branch(gate, mlp_inputs):
    model, layer = o3_mlp()
    A = layer.o3_lora_down["default"].weight
    B = layer.o3_lora_up["default"].weight
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    lin0 = mlp_inputs @ W.T + bias + gate * (ALPHA / R) * (mlp_inputs @ A.T @ B.T)  # y = xWᵀ + w₁·s·xAᵀBᵀ
    net = model.base_model.model
    expected = net.head(net.act(net.lin1(net.act(lin0))))
    with torch.no_grad():
        got = model(mlp_inputs, ood_weight=gate)
    # fp32, 64-wide layers: a different summation order costs ~1e-7 relative.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gate_one_is_plain_peft_lora(llama_inputs):
    o3 = o3_llama()
    lora = get_peft_model(tiny_llama(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    layers = named_layers(o3)
    with torch.no_grad():
        for name, module in lora.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in layers and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(layers[key].o3_lora_down["default"].weight)
                module.lora_B["default"].weight.copy_(layers[key].o3_lora_up["default"].weight)
        got = o3(input_ids=llama_inputs, ood_weight=1.0).logits
        assert torch.equal(o3(input_ids=llama_inputs).logits, got)  # eval default: merge_gate = 1
        assert rel_err(got, lora(input_ids=llama_inputs).logits) <= 1e-6


def test_per_sample_gate_mixes_rows(llama_inputs):
    model = o3_llama()
    base = base_logits(model, llama_inputs)
    with torch.no_grad():
        full = model(input_ids=llama_inputs).logits
        mixed = model(input_ids=llama_inputs, ood_weight=torch.tensor([0.0, 1.0])).logits
        swapped = model(input_ids=llama_inputs, ood_weight=torch.tensor([1, 0])).logits  # integer tensors are fine
    assert torch.equal(mixed[0], base[0]) and torch.equal(swapped[1], base[1])
    # same batch, same kernels; the gated rows only differ by a multiplication by exactly 1.
    torch.testing.assert_close(mixed[1], full[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(swapped[0], full[0], rtol=1e-6, atol=1e-6)


def test_per_sample_and_per_token_gates_on_one_layer(mlp_inputs):
    _, layer = o3_mlp()
    branch = (ALPHA / R) * (mlp_inputs @ layer.o3_lora_down["default"].weight.T @ layer.o3_lora_up["default"].weight.T)
    base = layer.base_layer(mlp_inputs)
    gates = torch.tensor([0.0, 0.25, 1.0, 0.5, 1.2])
    layer.call_inputs = {"ood_weight": gates}
    with torch.no_grad():
        got = layer(mlp_inputs)
    assert torch.equal(got[0], base[0].detach())
    torch.testing.assert_close(got, base + gates[:, None] * branch, rtol=1e-5, atol=1e-6)
    x3 = mlp_inputs.view(1, 5, 64)
    layer.call_inputs = {"ood_weight": gates.view(1, 5)}  # one gate per token
    with torch.no_grad():
        torch.testing.assert_close(layer(x3)[0], got, rtol=0, atol=0)
    layer.call_inputs = {}


def test_one_gate_per_adapter(mlp_inputs):
    model, layer = o3_mlp()
    model.add_adapter("second", O3LoraConfig(r=4, lora_alpha=4, target_modules=["lin0"], init_weights=False))
    model.base_model.set_adapter(["default", "second"])
    base = layer.base_layer(mlp_inputs).detach()
    with torch.no_grad():
        b1 = layer.adapter_forward("default", mlp_inputs)
        b2 = layer.adapter_forward("second", mlp_inputs)
        model(mlp_inputs, ood_weight={"default": 0.0, "second": torch.full((5,), 0.5)})
        torch.testing.assert_close(layer(mlp_inputs), base + 0.5 * b2, rtol=1e-6, atol=1e-6)
        model(mlp_inputs, ood_weight={"second": 0.0})  # an adapter left out of the dict keeps the default gate
        torch.testing.assert_close(layer(mlp_inputs), base + b1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "gate, match",
    [
        (torch.ones(3), r"ood_weight must have shape"),
        (torch.ones(2, 5), r"ood_weight must have shape"),
        (torch.ones(2, dtype=torch.bool), r"ood_weight must be a real-valued tensor"),
        ("high", r"ood_weight must be a number"),
        (True, r"ood_weight must be a number"),
        (-0.5, r"ood_weight must be finite and >= 0"),
        (float("nan"), r"ood_weight must be finite and >= 0"),
        (torch.tensor([0.5, -1.0]), r"ood_weight values must be finite and >= 0"),
        ({"nope": 1.0}, r"ood_weight keys must be adapter names"),
    ],
)
def test_bad_ood_weight_is_a_clear_error(gate, match, llama_inputs):
    model = o3_llama()
    with pytest.raises(ValueError, match=match):
        model(input_ids=llama_inputs, ood_weight=gate)


# ---------------------------------------------------------------------------------------------------- the scorer
def test_gate_scorer_is_used_in_eval_mode_only(llama_inputs):
    model = o3_llama()
    base = base_logits(model, llama_inputs)
    with torch.no_grad():
        full = model(input_ids=llama_inputs).logits
    seen = []

    def scorer(input_ids=None, **kwargs):
        seen.append(input_ids)
        return torch.tensor([0.0, 1.0])

    model.set_gate_scorer(scorer)  # reaches O3LoraModel through PeftModel
    with torch.no_grad():
        got = model(input_ids=llama_inputs).logits
    assert len(seen) == 1 and torch.equal(seen[0], llama_inputs)
    assert torch.equal(got[0], base[0])
    torch.testing.assert_close(got[1], full[1], rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # an explicit ood_weight wins over the scorer
        assert torch.equal(model(input_ids=llama_inputs, ood_weight=0.0).logits, base)
    assert len(seen) == 1
    model.train()
    model(input_ids=llama_inputs)  # training: gate 1, the scorer is not consulted
    assert len(seen) == 1
    model.eval()
    set_gate_scorer(model, lambda **kw: torch.ones(3))
    with pytest.raises(ValueError, match=r"ood_weight must have shape"):
        model(input_ids=llama_inputs)
    set_gate_scorer(model, None)
    with torch.no_grad():
        assert torch.equal(model(input_ids=llama_inputs).logits, full)


def test_gate_scorer_runs_once_per_generate_call_on_the_prompt(llama_inputs):
    model = o3_llama()
    seen = []

    def scorer(input_ids=None, **kwargs):
        seen.append(input_ids.shape)
        return torch.zeros(input_ids.shape[0])

    model.set_gate_scorer(scorer)
    gen = model.generate(input_ids=llama_inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen == [llama_inputs.shape]
    set_gate_scorer(model, None)
    with model.disable_adapter():  # gate 0 on every decoding step: the base model's greedy continuation
        expected = model.generate(input_ids=llama_inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, expected)


# ------------------------------------------------------------------------------------------ orthogonality loss
def oracle(model, snapshots, prev_model_A=None, reduction="block_mean", num_layers=2):
    """Σ_modules Σ_j ‖A_j A_curᵀ‖_F², reduced, from independent copies of the earlier A matrices; block_mean divides
    by every decoder layer of the model (num_layers; the tiny Llama has 2), as the official code."""
    total, names = 0.0, []
    for name, layer in named_layers(model).items():
        A = layer.o3_lora_down["default"].weight.detach().double()
        earlier = [s[name].double() for s in snapshots] + ([prev_model_A[name].double()] if prev_model_A else [])
        total += sum(((P @ A.T) ** 2).sum().item() for P in earlier)
        names.append(name)
    if reduction == "block_mean":
        return total / num_layers
    return total / len(names) if reduction == "module_mean" else total


def current_A(model, adapter="default"):
    return {n: layer.o3_lora_down[adapter].weight.detach().clone() for n, layer in named_layers(model).items()}


@pytest.mark.parametrize("reduction", ["block_mean", "module_mean", "sum"])
def test_orthogonality_loss_matches_the_formula(reduction):
    model = o3_llama(orth_reduction=reduction)
    assert orthogonality_loss(model) is None  # no earlier request yet
    snaps = [current_A(model)]
    snapshot_request(model)
    randomize_adapter(model, seed=2)
    snaps.append(current_A(model))
    snapshot_request(model)
    randomize_adapter(model, seed=3)
    assert model.peft_config["default"].snapshot_ranks == [R, R]
    got = orthogonality_loss(model).item()
    # Llama: 2 blocks x (q, v, down); the block mean is the official reduction (sum per block / number of blocks).
    assert len(named_layers(model)) == 6 and len({block_key(n) for n in named_layers(model)}) == 2
    assert got == pytest.approx(oracle(model, snaps, reduction=reduction), rel=1e-5)


def test_block_mean_divides_by_every_decoder_layer_with_layers_to_transform():
    """The official loss sums the per-layer terms and divides by every decoder layer, adapted or not (the paper is
    silent): adapting only layer 1 of the 2-layer tiny Llama halves the loss against a per-adapted-block mean."""
    model = get_peft_model(
        tiny_llama(),
        O3LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, layers_to_transform=[1], layers_pattern="layers"),
    )
    randomize_adapter(model)
    assert {block_key(n) for n in named_layers(model)} == {"model.layers.1"}
    snaps = [current_A(model)]
    snapshot_request(model)
    randomize_adapter(model, seed=2)
    assert model.base_model.orth_block_count("default") == model.config.num_hidden_layers == 2
    got = orthogonality_loss(model).item()
    summed = oracle(model, snaps, reduction="sum")
    assert got == pytest.approx(summed / 2, rel=1e-5) and got != pytest.approx(summed, rel=1e-3)
    # without a layer count (a plain nn.Module) the adapted blocks are the divisor: lin0 and lin1 are two blocks
    mlp = get_peft_model(tiny_mlp(), O3LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin0", "lin1"]))
    assert mlp.base_model.orth_block_count("default") == 2


def test_orthogonality_loss_is_zero_for_orthogonal_factors():
    model, layer = o3_mlp()
    Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        layer.o3_lora_down["default"].weight.copy_(Q[:R] * 3.0)
        snapshot_request(model)
        layer.o3_lora_down["default"].weight.copy_(Q[R : 2 * R] * 3.0)
    # Exactly orthogonal rows up to fp32 rounding of the QR factor: |entries| ~ 1e-6, squared and summed ≪ 1e-8.
    assert orthogonality_loss(model).item() < 1e-8
    with torch.no_grad():
        layer.o3_lora_down["default"].weight.copy_(Q[R - 1 : 2 * R - 1] * 3.0)  # shares one direction: 9² = 81
    assert orthogonality_loss(model).item() == pytest.approx(81.0, rel=1e-5)


def test_outputs_loss_is_ce_plus_weighted_orthogonality_loss(llama_inputs):
    model = o3_llama(orth_weight=0.25)
    snapshot_request(model)
    randomize_adapter(model, seed=5)
    model.train()
    out = model(input_ids=llama_inputs, labels=llama_inputs)
    logits = out.logits.float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), llama_inputs[:, 1:].reshape(-1))
    o_loss = orthogonality_loss(model)
    assert o_loss.item() > 0.1
    torch.testing.assert_close(out.loss, ce + 0.25 * o_loss, rtol=1e-6, atol=1e-6)
    without = model(input_ids=llama_inputs)  # no labels: no loss at all, nothing added
    assert without.loss is None
    model.eval()
    with torch.no_grad():  # the evaluation loss carries the same term
        torch.testing.assert_close(model(input_ids=llama_inputs, labels=llama_inputs).loss, out.loss.detach())


def test_only_the_current_A_receives_gradient_from_the_orthogonality_loss():
    model, layer = o3_mlp(prev_adapters=["older"])
    model.add_adapter("older", O3LoraConfig(r=4, lora_alpha=4, target_modules=["lin0"], init_weights=False))
    model.set_adapter("default")
    layer.o3_lora_down["older"].weight.requires_grad_(True)  # even a trainable earlier adapter must get nothing
    snapshot_request(model)
    randomize_adapter(model, seed=4)
    model.train()
    loss = orthogonality_loss(model)
    loss.backward()
    A = layer.o3_lora_down["default"].weight
    P = torch.cat([layer.o3_lora_snapshots["default"], layer.o3_lora_down["older"].weight.detach()])
    # block_mean over one module: d/dA ‖P Aᵀ‖² = 2 (P Aᵀ)ᵀ P
    torch.testing.assert_close(A.grad, 2 * (P @ A.detach().T).T @ P, rtol=1e-5, atol=1e-5)
    assert layer.o3_lora_up["default"].weight.grad is None
    assert layer.o3_lora_down["older"].weight.grad is None
    assert not layer.o3_lora_snapshots["default"].requires_grad and layer.o3_lora_snapshots["default"].grad is None
    assert loss.item() == pytest.approx(((P @ A.detach().T) ** 2).sum().item(), rel=1e-5)


def test_prev_adapters_must_exist(llama_inputs):
    model = o3_llama(prev_adapters=["gone"])
    model.train()
    with pytest.raises(ValueError, match=r"O3LoraConfig.prev_adapters of adapter 'default' names 'gone'"):
        model(input_ids=llama_inputs, labels=llama_inputs)
    model.eval()  # an evaluation loss after loading only the latest adapter: a warning, the name is skipped
    with pytest.warns(UserWarning, match=r"names 'gone'.*Skipped in eval mode"), torch.no_grad():
        model(input_ids=llama_inputs, labels=llama_inputs)


# ------------------------------------------------------------------------------------------ requests, save/load
def test_snapshots_are_saved_and_loaded(tmp_path, llama_inputs):
    model = o3_llama()
    snapshot_request(model)
    randomize_adapter(model, seed=7)
    snapshot_request(model)
    randomize_adapter(model, seed=8)
    expected_loss = orthogonality_loss(model).item()
    snaps = {n: layer.o3_lora_snapshots["default"].clone() for n, layer in named_layers(model).items()}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert loaded.peft_config["default"].snapshot_ranks == [R, R]
    for name, layer in named_layers(loaded).items():
        assert torch.equal(layer.o3_lora_snapshots["default"], snaps[name])
    assert orthogonality_loss(loaded).item() == pytest.approx(expected_loss, rel=1e-6)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=llama_inputs).logits, model(input_ids=llama_inputs).logits)


def test_snapshot_from_a_saved_lora_folder(tmp_path):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapter(lora, seed=9)
    lora.save_pretrained(tmp_path)
    lora_A = {n.removeprefix("base_model.model."): m.lora_A["default"].weight.detach() for n, m in lora.named_modules()
              if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    model = o3_llama()
    with pytest.warns(UserWarning, match="zero rows"):  # down_proj was not adapted by that LoRA
        snapshot_request(model, source=tmp_path)
    assert model.peft_config["default"].snapshot_ranks == [4]
    for name, layer in named_layers(model).items():
        rows = layer.o3_lora_snapshots["default"]
        assert torch.equal(rows, lora_A[name]) if name in lora_A else torch.equal(rows, torch.zeros(4, 128))


def test_start_new_request_resume_and_new_adapter(llama_inputs):
    model = o3_llama()
    A1 = current_A(model)
    assert start_new_request(model) == "default"  # official workflow: snapshot, keep training the same LoRA
    # right after the snapshot A_cur equals the snapshot: o_loss = Σ ‖A Aᵀ‖² (large)
    assert orthogonality_loss(model).item() == pytest.approx(oracle(model, [A1]), rel=1e-5)
    randomize_adapter(model, seed=11)
    A2 = current_A(model)
    new = start_new_request(model, mode="new_adapter", new_adapter_name="request3")
    assert new == "request3" and model.active_adapter == "request3"
    assert model.peft_config["request3"].snapshot_ranks == [R, R]
    for name, layer in named_layers(model).items():
        assert torch.equal(layer.o3_lora_snapshots["request3"], torch.cat([A1[name], A2[name]]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".request3." in n for n in trainable)
    with torch.no_grad():  # a fresh adapter (B = 0) starts at the base output
        assert torch.equal(model(input_ids=llama_inputs).logits, base_logits(model, llama_inputs))
    new_A = current_A(model, "request3")
    expected = 0.0
    for name, layer in named_layers(model).items():
        expected += sum(((P.double() @ new_A[name].double().T) ** 2).sum().item() for P in (A1[name], A2[name]))
    assert orthogonality_loss(model).item() == pytest.approx(expected / 2, rel=1e-5)  # 2 Llama blocks


# ---------------------------------------------------------------------------------------------------- merge
def test_merge_uses_the_fixed_gate_and_refuses_per_call_gates(llama_inputs):
    model = o3_llama(merge_gate=0.7)
    with torch.no_grad():
        unmerged = model(input_ids=llama_inputs).logits  # eval mode without ood_weight: merge_gate
        torch.testing.assert_close(unmerged, model(input_ids=llama_inputs, ood_weight=0.7).logits, rtol=0, atol=0)
        model.merge_adapter()
        merged = model(input_ids=llama_inputs).logits
    assert rel_err(merged, unmerged) <= 1e-5
    with pytest.raises(ValueError, match=r"ood_weight cannot be applied.*merged"):
        model(input_ids=llama_inputs, ood_weight=0.0)
    model.set_gate_scorer(lambda **kw: 1.0)
    with pytest.raises(ValueError, match=r"ood_weight from the gate scorer cannot be applied"):
        model(input_ids=llama_inputs)
    model.set_gate_scorer(None)
    model.unmerge_adapter()
    with torch.no_grad():
        assert rel_err(model(input_ids=llama_inputs, ood_weight=0.7).logits, unmerged) <= 1e-5


def test_lora_factors_and_delta_weight():
    _, layer = o3_mlp(merge_gate=0.5)
    A, B, s = layer.lora_factors("default")
    assert s == ALPHA / R and A is layer.o3_lora_down["default"].weight
    torch.testing.assert_close(layer.get_delta_weight("default"), 0.5 * s * B @ A, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"orth_weight": -1.0}, r"O3LoraConfig.orth_weight must be a finite number >= 0"),
        ({"merge_gate": float("inf")}, r"O3LoraConfig.merge_gate must be a finite number >= 0"),
        ({"orth_reduction": "mean"}, r"O3LoraConfig.orth_reduction must be one of"),
        ({"request_mode": "fork"}, r"O3LoraConfig.request_mode must be one of"),
        ({"prev_adapters": [1]}, r"O3LoraConfig.prev_adapters must be a list of adapter names"),
        ({"snapshot_ranks": [0]}, r"O3LoraConfig.snapshot_ranks must be a list of integers >= 1"),
        ({"r": 0}, r"O3LoraConfig.r must be an integer >= 1"),
        ({"lora_alpha": float("inf")}, r"O3LoraConfig.lora_alpha must be a finite number > 0"),
        ({"init_weights": "no"}, r"O3LoraConfig.init_weights must be True or False"),
    ],
)
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        O3LoraConfig(target_modules=["q_proj"], **kwargs)


# ---------------------------------------------------------------------------------------------------- training
def test_gradient_checkpointing_keeps_the_orthogonality_term(llama_inputs):
    model = o3_llama()
    snapshot_request(model)
    model.train()
    plain = model(input_ids=llama_inputs, labels=llama_inputs).loss
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    checkpointed = model(input_ids=llama_inputs, labels=llama_inputs)
    torch.testing.assert_close(checkpointed.loss, plain, rtol=1e-6, atol=1e-6)
    checkpointed.loss.backward()
    assert all(layer.o3_lora_down["default"].weight.grad is not None for layer in o3_layers(model))


def test_single_process_ddp_trains_every_adapter_parameter(tmp_path, llama_inputs):
    """World size 1 on gloo: DDP without find_unused_parameters would fail on the second step if some adapter
    parameter got no gradient; the orthogonality term must reach every A through DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = o3_llama()
        snapshot_request(model)
        model.train()
        ddp = DDP(model)
        for _ in range(2):
            model.zero_grad()
            ddp(input_ids=llama_inputs, labels=llama_inputs).loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
    finally:
        dist.destroy_process_group()


def train_briefly(tmp_path, orth_weight):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = o3_llama(orth_weight=orth_weight)
    start_new_request(model)  # A_cur == snapshot: the orthogonality loss starts large
    start = orthogonality_loss(model).item()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (16, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / str(orth_weight)), per_device_train_batch_size=8, max_steps=15,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    return model, start, orthogonality_loss(model).item(), result.training_loss


def test_trainer_run_reduces_the_orthogonality_loss(tmp_path):
    """A plain transformers.Trainer with labels trains the orthogonality term: 15 Adam steps at lr 1e-2 take it from
    ~23.5 to ~3.6 with orth_weight=1, while CE alone (orth_weight=0) leaves it near its start (~24.9)."""
    model, start, end, training_loss = train_briefly(tmp_path, 1.0)
    _, start0, end0, training_loss0 = train_briefly(tmp_path, 0.0)
    assert start == pytest.approx(start0)
    assert end < 0.5 * start, (start, end)
    assert end0 > 0.8 * start0, (start0, end0)
    assert training_loss > training_loss0  # the reported loss includes the orthogonality term
    assert all(torch.isfinite(layer.o3_lora_snapshots["default"]).all() for layer in o3_layers(model))


def test_per_sample_gate_follows_beam_expansion_in_generate():
    """``generate(num_beams=2, num_return_sequences=2)`` repeats each sample; a ``[batch]`` ``ood_weight`` is repeated
    with it, so the sample gated to 0 generates exactly what the base model generates and the other does not."""
    from conftest import tiny_llama

    model = get_peft_model(tiny_llama(), O3LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 5))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, num_beams=2,
                  num_return_sequences=2, pad_token_id=0)
    out = model.generate(ood_weight=torch.tensor([0.0, 1.0]), **kwargs)
    with model.disable_adapter():
        base = model.generate(**kwargs)
    assert out.shape == base.shape == (4, 9)
    assert torch.equal(out[:2], base[:2])
    assert not torch.equal(out[2:], base[2:])
