"""The conformance suite: every registered peft-ext method keeps every promise a peft-ext tuner makes (get_peft_model,
forward/backward, identity at init, save/load in a fresh process, merging, several adapters, quantized bases, TRL's
naming, LoRA export). Parametrised over ``peft_ext.list_methods()``; a new method is covered by registering it.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import (
    LLAMA_TARGETS,
    MLP_TARGETS,
    call_kwargs,
    conformance_config,
    make_config,
    method_params,
    randomize_adapter,
    rel_err,
    tiny_llama,
    tiny_mlp,
)

KINDS = ["llama", "mlp"]
MERGE_TOL = 1e-5  # DESIGN.md: merged vs unmerged forward in fp32, relative


def build(kind):
    """(base model, target modules, forward function) for a model kind; the forward passes per-call inputs on."""
    if kind == "llama":
        return tiny_llama(), LLAMA_TARGETS, lambda m, x, **kw: m(input_ids=x, **kw).logits
    return tiny_mlp(), MLP_TARGETS, lambda m, x, **kw: m(x, **kw)


def inputs_for(kind, llama_inputs, mlp_inputs):
    return llama_inputs if kind == "llama" else mlp_inputs


def adapter_param_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", method_params())
def test_forward_backward_only_adapter_params_train(spec, kind, llama_inputs, mlp_inputs):
    """With the spec's routed call and auxiliary losses on: only adapter parameters get gradients, and with labels
    ``outputs.loss`` is the causal-LM cross entropy plus ``aux_loss()`` (non-zero where conformance_kwargs turn it
    on)."""
    base, targets, fwd = build(kind)
    x = inputs_for(kind, llama_inputs, mlp_inputs)
    model = get_peft_model(base, conformance_config(spec, targets))
    randomize_adapter(model)
    model.train()
    trainable = adapter_param_names(model)
    assert trainable, "the adapter has no trainable parameters"
    assert all(spec.prefix in n for n in trainable), sorted(trainable)
    call = call_kwargs(spec, x.shape if kind == "llama" else x.shape[:-1])
    if kind == "mlp":
        loss = fwd(model, x, **call).float().pow(2).mean()
    else:
        out = model(input_ids=x, labels=x, **call)
        logits = out.logits.float()
        task = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        aux = model.base_model.aux_loss()
        if model.base_model.has_aux_loss and spec.conformance_kwargs:
            assert aux is not None and aux.abs().item() > 1e-6, "the auxiliary loss is off or zero"
        # fp32 cross entropy over 22 tokens, summed in another order than transformers' loss: round-off ~1e-7
        torch.testing.assert_close(out.loss, task + (aux if aux is not None else 0), rtol=1e-5, atol=1e-6)
        loss = out.loss
    loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen parameter {name} received a gradient"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", method_params())
def test_init_leaves_base_output_unchanged(spec, kind, llama_inputs, mlp_inputs):
    base, targets, fwd = build(kind)
    x = inputs_for(kind, llama_inputs, mlp_inputs)
    call = call_kwargs(spec, x.shape if kind == "llama" else x.shape[:-1])
    with torch.no_grad():
        expected = fwd(base, x)
        model = get_peft_model(copy.deepcopy(base), conformance_config(spec, targets))
        got = fwd(model, x, **call)
    if spec.identity_at_init:
        assert torch.equal(got, expected), f"max diff {(got - expected).abs().max().item()}"
    else:
        assert not torch.equal(got, expected)


@pytest.mark.parametrize("spec", method_params())
def test_trl_contract_default_in_parameter_names(spec):
    model = get_peft_model(tiny_llama(), make_config(spec, LLAMA_TARGETS))
    names = adapter_param_names(model)
    assert names and all(".default." in n for n in names), sorted(names)
    assert not any("lora_A" in n or "lora_B" in n for n in names), "names must not match LoRA-only key filters"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", method_params(lambda s: s.mergeable))
def test_merge_unmerge_and_merge_and_unload_match_unmerged(spec, kind, llama_inputs, mlp_inputs):
    base, targets, fwd = build(kind)
    x = inputs_for(kind, llama_inputs, mlp_inputs)
    model = get_peft_model(base, make_config(spec, targets))
    randomize_adapter(model)
    with torch.no_grad():
        unmerged = fwd(model, x)
        model.merge_adapter()
        merged = fwd(model, x)
        model.unmerge_adapter()
        again = fwd(model, x)
        plain = model.merge_and_unload()
        unloaded = fwd(plain, x)
    assert rel_err(merged, unmerged) <= MERGE_TOL
    assert rel_err(again, unmerged) <= MERGE_TOL
    assert rel_err(unloaded, unmerged) <= MERGE_TOL
    assert not any(spec.prefix in n for n, _ in plain.named_parameters())


@pytest.mark.parametrize("spec", method_params(lambda s: not s.mergeable))
def test_unmergeable_method_refuses_to_merge(spec):
    model = get_peft_model(tiny_llama(), make_config(spec, LLAMA_TARGETS))
    with pytest.raises((ValueError, RuntimeError, NotImplementedError), match="merg"):
        model.merge_adapter()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", method_params())
def test_several_adapters_and_disable(spec, kind, llama_inputs, mlp_inputs):
    base, targets, fwd = build(kind)
    x = inputs_for(kind, llama_inputs, mlp_inputs)
    call = call_kwargs(spec, x.shape if kind == "llama" else x.shape[:-1])
    with torch.no_grad():
        base_out = fwd(base, x)
    model = get_peft_model(copy.deepcopy(base), conformance_config(spec, targets))
    randomize_adapter(model, seed=1)
    model.add_adapter("other", conformance_config(spec, targets))
    other_params = [p for n, p in model.named_parameters() if ".other." in n]
    assert other_params and not any(p.requires_grad for p in other_params), "an added adapter must start frozen"
    with torch.no_grad():
        out_default = fwd(model, x, **call)
        model.set_adapter("other")
        assert all(p.requires_grad for p in other_params)
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
        for n, p in model.named_parameters():
            if ".other." in n:
                p.copy_(torch.randn_like(p) * 0.1)
        out_other = fwd(model, x, **call)
        assert not torch.allclose(out_other, out_default)
        with model.disable_adapter():
            assert torch.equal(fwd(model, x, **call), base_out)
        model.set_adapter("default")
        model.delete_adapter("other")
        assert not any(".other." in n for n, _ in model.named_parameters())
        assert torch.equal(fwd(model, x, **call), out_default)


@pytest.mark.parametrize("spec", method_params())
def test_save_load_in_fresh_process_reproduces_logits(spec, tmp_path, llama_inputs):
    """Save in this process; load with PeftModel and AutoPeftModelForCausalLM in a new one that never imports
    peft_ext (the autoload registers it), and call both with the spec's routed inputs. Same CPU, same ops: logits
    must be identical."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()  # records base_model_name_or_path for the Auto class
    model = get_peft_model(base, conformance_config(spec, LLAMA_TARGETS))
    randomize_adapter(model)
    model.save_pretrained(adapter_dir)
    call = call_kwargs(spec, llama_inputs.shape)
    with torch.no_grad():
        expected = model(input_ids=llama_inputs, **call).logits
    torch.save({"x": llama_inputs, "call": call}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import LlamaForCausalLM
        assert "peft_ext" in sys.modules, "the autoload did not register peft-ext"
        saved = torch.load({str(tmp_path / 'inputs.pt')!r})
        x, call = saved["x"], saved["call"]
        base = LlamaForCausalLM.from_pretrained({str(base_dir)!r}).eval()
        a = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        b = AutoPeftModelForCausalLM.from_pretrained({str(adapter_dir)!r}).eval()
        with torch.no_grad():
            out = {{"peft": a(input_ids=x, **call).logits, "auto": b(input_ids=x, **call).logits}}
            torch.save(out, {str(tmp_path / 'out.pt')!r})
        print(json.dumps({{"type": type(a.peft_config["default"]).__name__}}))
        """
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["type"] == spec.config_cls.__name__
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["peft"], expected)
    assert torch.equal(out["auto"], expected)


@pytest.mark.parametrize("spec", method_params())
def test_save_load_mlp_in_process(spec, tmp_path, mlp_inputs):
    model = get_peft_model(tiny_mlp(), conformance_config(spec, MLP_TARGETS))
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    call = call_kwargs(spec, mlp_inputs.shape[:-1])
    with torch.no_grad():
        expected = model(mlp_inputs, **call)
        loaded = PeftModel.from_pretrained(tiny_mlp(), tmp_path)
        assert torch.equal(loaded(mlp_inputs, **call), expected)


@pytest.mark.parametrize("spec", method_params(lambda s: s.lora_convertible))
def test_save_as_lora_serves_the_same_model(spec, tmp_path, llama_inputs):
    """Exported at the adapter's full rank, a plain LoRA reproduces the adapter (ΔW has rank <= r)."""
    from peft.tuners.lora.conversion import save_as_lora

    model = get_peft_model(tiny_llama(), make_config(spec, LLAMA_TARGETS))
    randomize_adapter(model)
    assert model.supports_lora_conversion()
    with torch.no_grad():
        expected = model(input_ids=llama_inputs).logits
    save_as_lora(tmp_path, model, rank=spec.example_kwargs["r"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        got = lora(input_ids=llama_inputs).logits
    # SVD round trip of an exactly rank-r ΔW in fp32: error ~ 1e-6 relative to the logits.
    assert rel_err(got, expected) <= 1e-4


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def quantized_llama(path, bits):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    pytest.importorskip("bitsandbytes")
    if bits == 4:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.float32).eval()


def quantization_bound(target: torch.Tensor, layer, bits: int) -> torch.Tensor:
    """Largest rounding error the quantizer may make on ``target``, elementwise.

    8-bit: row-wise absmax scaling to int8; rounding costs half a step (absmax_row / 254) and bitsandbytes casts the
    weight and its scale to fp16 on the way (relative 2**-11 each), so |error| <= one step, absmax_row / 127. 4-bit
    NF4: block-wise absmax over the
    flattened weight; the widest gap between neighbouring NF4 levels is 0.3038 (between -1 and -0.6962), so
    |error| <= 0.152 * absmax_block. A 1% margin and 1e-6 absolute cover float rounding.
    """
    if bits == 8:
        return target.abs().amax(dim=1, keepdim=True).expand_as(target) / 127 + 1e-6
    blocksize = layer.get_base_layer().weight.quant_state.blocksize
    flat = target.flatten()
    absmax = flat.view(-1, blocksize).abs().amax(dim=1, keepdim=True).expand(-1, blocksize)
    return (0.152 * absmax * 1.01 + 1e-6).reshape(target.shape)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("spec", method_params(lambda s: s.quantizable))
def test_bitsandbytes_base_layers(spec, bits, tiny_llama_dir, llama_inputs):
    model = get_peft_model(quantized_llama(tiny_llama_dir, bits), conformance_config(spec, LLAMA_TARGETS))
    layers = [m for m in model.modules() if isinstance(m, spec.model_cls.tuner_layer_cls)]
    assert layers and all(layer.quantization_backend is not None for layer in layers)
    call = call_kwargs(spec, llama_inputs.shape)
    with torch.no_grad():  # a no-grad eval forward: would repack 4-bit weights on AVX512-BF16 CPUs
        fresh = model(input_ids=llama_inputs, **call).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=llama_inputs, **call).logits, fresh) == spec.identity_at_init
    randomize_adapter(model)
    model.train()
    model(input_ids=llama_inputs, labels=llama_inputs, **call).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:  # includes layer 0: gradients must cross every 4-bit layer above it
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    model.eval()
    if not spec.mergeable:
        return
    before = {id(layer): layer.get_base_weight().clone() for layer in layers}
    deltas = {id(layer): layer.get_delta_weight("default").detach().clone() for layer in layers}
    model.merge_adapter()
    for layer in layers:
        target = before[id(layer)] + deltas[id(layer)]
        err = (layer.get_base_weight() - target).abs()
        assert (err <= quantization_bound(target, layer, bits)).all(), f"merge error {err.max().item()}"
    model.unmerge_adapter()
    for layer in layers:
        target = before[id(layer)]
        err = (layer.get_base_weight() - target).abs()  # two roundings: merge, then unmerge
        assert (err <= 2 * quantization_bound(target + deltas[id(layer)], layer, bits) + 1e-6).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("spec", method_params(lambda s: not s.quantizable))
def test_unquantizable_method_refuses_bitsandbytes_bases(spec, bits, tiny_llama_dir):
    """Methods that rewrite the base weight while training (quantizable=False) refuse 4-bit and 8-bit bases."""
    with pytest.raises(ValueError, match="quantized"):
        get_peft_model(quantized_llama(tiny_llama_dir, bits), make_config(spec, LLAMA_TARGETS))


@pytest.mark.parametrize("spec", method_params())
def test_trl_dpo_copies_the_adapter_into_a_frozen_reference(spec, tmp_path):
    """TRL's DPOTrainer, given a pre-wrapped PeftModel and no ref_model, adds a "ref" adapter and copies every
    ``.default.`` parameter into it; the reference must start equal to the adapter and stay fixed while it trains."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from conftest import tiny_llama_config
    from peft_ext.data import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token = tokenizer.sep_token
    config = tiny_llama_config()
    config.vocab_size, config.pad_token_id = tokenizer.vocab_size, tokenizer.pad_token_id
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), make_config(spec, ["q_proj", "v_proj"]))
    randomize_adapter(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    data = Dataset.from_dict({"prompt": ["the movie was"] * 8, "chosen": [" great"] * 8, "rejected": [" awful"] * 8})
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", max_length=16, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    ref = {n.replace(".ref.", ".default."): p for n, p in model.named_parameters() if ".ref." in n}
    assert set(ref) == set(start) and all(torch.equal(ref[n], start[n]) for n in start)
    trainer.train()
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[n], start[n]) for n in start), "the adapter did not train"
    assert all(torch.equal(ref[n], start[n]) and not ref[n].requires_grad for n in start), "the reference moved"
