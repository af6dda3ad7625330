"""Prompt-aware LoRA (WavLLM, https://arxiv.org/abs/2404.00656) against hand computations of the prompt pass, the
adapter and the scaled LoRA."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import randomize_adapter, rel_err, tiny_llama
from peft_ext.tuners.prompt_aware_lora import (
    PromptAwareLoraConfig,
    PromptAwareLoraLayer,
    prompt_aware_lora_layers,
    set_stage,
)

TARGETS = ["q_proj", "v_proj"]
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32, small widths


def pa_model(seed=1, **kwargs):
    """A prompt-aware LoRA on the tiny Llama with random weights; the heads' bias is set to 1 so that
    c = clamp(ReLU(head(p)), 3) stays inside (0, 3) and no rank is cut off by the ReLU or the clamp."""
    kwargs = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS, **kwargs}
    model = get_peft_model(tiny_llama(), PromptAwareLoraConfig(**kwargs))
    randomize_adapter(model, seed=seed)
    with torch.no_grad():
        for layer in prompt_aware_lora_layers(model):
            for head in layer.prompt_aware_lora_head.values():
                head.bias.fill_(1.0)
    return model


def prompt_mask():
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 2:7] = True  # a prompt in the middle of the input
    mask[1, 0:3] = True
    return mask


def oracle_pooled(model, ids, mask):
    """p from an independent computation: the plain base Llama run on each sample's prompt tokens alone, the last
    decoder layer's output, then fc2(GELU(fc1(H))), softmax_T of the score, weighted sum."""
    base = tiny_llama()
    pool = model.base_model.prompt_aware_lora_pool["default"]
    out = []
    for b in range(ids.shape[0]):
        seen = {}
        handle = base.model.layers[-1].register_forward_hook(
            lambda m, a, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            base(ids[b][mask[b]].unsqueeze(0))
        handle.remove()
        h = seen["h"][0]
        s = F.linear(F.gelu(F.linear(h, pool.fc1.weight, pool.fc1.bias)), pool.fc2.weight, pool.fc2.bias)
        a = torch.softmax(s @ pool.score.weight[0], dim=0)
        out.append((a[:, None] * s).sum(0))
    return torch.stack(out)


def test_fixed_scale_equals_plain_lora(llama_inputs):
    """c ≡ α/r: with no_prompt='fixed' (no prompt_mask) and in stage 1 the adapter is PEFT's LoRA."""
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for kwargs in ({"no_prompt": "fixed"}, {"stage": 1}):
        model = pa_model(**kwargs)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, PromptAwareLoraLayer)}
        with torch.no_grad():
            for name, module in lora.named_modules():
                if name in layers:
                    module.lora_A["default"].weight.copy_(layers[name].prompt_aware_lora_down["default"].weight)
                    module.lora_B["default"].weight.copy_(layers[name].prompt_aware_lora_up["default"].weight)
            assert rel_err(model(llama_inputs).logits, lora(llama_inputs).logits) <= 1e-6


def test_init_scale_starts_at_alpha_over_r(llama_inputs):
    """init_scale=True: c = α/r for every prompt, so a stage switch does not move the output."""
    config = PromptAwareLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_scale=True)
    model = get_peft_model(tiny_llama(), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_down." in name or "_up." in name or "pool" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    with torch.no_grad():
        prompted = model(llama_inputs, prompt_mask=prompt_mask()).logits
        set_stage(model, 1)
        assert rel_err(model(llama_inputs).logits, prompted) <= 1e-6


def test_prompt_pass_matches_oracle_and_runs_without_lora(llama_inputs):
    model = pa_model()
    mask = prompt_mask()
    model(llama_inputs, prompt_mask=mask)
    layer = prompt_aware_lora_layers(model)[0]
    p = layer.prompt_vec["default"]
    torch.testing.assert_close(p, oracle_pooled(model, llama_inputs, mask), rtol=1e-4, atol=1e-5)
    # the prompt pass carries no LoRA: p has no autograd path to any A or B
    lora_params = [m.prompt_aware_lora_down["default"].weight for m in prompt_aware_lora_layers(model)]
    lora_params += [m.prompt_aware_lora_up["default"].weight for m in prompt_aware_lora_layers(model)]
    grads = torch.autograd.grad(p.sum(), lora_params, allow_unused=True)
    assert all(g is None for g in grads)


def test_layer_output_is_the_scaled_lora_formula(llama_inputs):
    model = pa_model()
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.v_proj"))
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    with torch.no_grad():
        model(llama_inputs, prompt_mask=prompt_mask())
    handle.remove()
    p = layer.prompt_vec["default"]
    head = layer.prompt_aware_lora_head["default"]
    c = torch.clamp(torch.relu(p @ head.weight.T + head.bias), max=3.0)  # [batch, r]
    A, B = layer.prompt_aware_lora_down["default"].weight, layer.prompt_aware_lora_up["default"].weight
    x = seen["x"]
    expected = x @ layer.base_layer.weight.T + ((x @ A.T) * c[:, None, :]) @ B.T
    torch.testing.assert_close(seen["y"], expected, **TOL)


def test_output_mode_scales_output_channels_and_refuses_gqa(llama_inputs):
    with pytest.raises(ValueError, match="scale_mode='output'"):
        pa_model(scale_mode="output", target_modules=["v_proj"])  # GQA: v_proj is 32 wide, d = 64
    model = pa_model(scale_mode="output", target_modules=["q_proj", "o_proj"])
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.1.self_attn.o_proj"))
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    with torch.no_grad():
        model(llama_inputs, prompt_mask=prompt_mask())
    handle.remove()
    c = torch.clamp(torch.relu(layer.prompt_vec["default"]), max=3.0)  # [batch, d]
    A, B = layer.prompt_aware_lora_down["default"].weight, layer.prompt_aware_lora_up["default"].weight
    x = seen["x"]
    expected = x @ layer.base_layer.weight.T + (x @ A.T @ B.T) * c[:, None, :]
    torch.testing.assert_close(seen["y"], expected, **TOL)


def test_adapter_and_lora_get_gradients_and_stage_freezing(llama_inputs):
    model = pa_model()
    model.train()
    model(llama_inputs, labels=llama_inputs, prompt_mask=prompt_mask()).loss.backward()
    pool = model.base_model.prompt_aware_lora_pool["default"]
    for name, p in list(pool.named_parameters()) + [
        (n, p) for n, p in model.named_parameters() if "prompt_aware_lora_head" in n or "prompt_aware_lora_down" in n
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = pa_model(freeze_lora_in_stage2=True)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and not any("_down." in n or "_up." in n for n in trainable)
    stage1 = pa_model(stage=1)
    trainable = {n for n, p in stage1.named_parameters() if p.requires_grad}
    assert trainable and not any("head" in n or "pool" in n for n in trainable)
    set_stage(stage1, 2)
    assert stage1.peft_config["default"].stage == 2
    assert all(p.requires_grad for p in stage1.base_model.prompt_aware_lora_pool["default"].parameters())


def test_generate_computes_the_scale_once_from_the_prompt(llama_inputs):
    model = pa_model()
    mask = prompt_mask()
    with torch.no_grad():
        model(llama_inputs, prompt_mask=mask)
        p = prompt_aware_lora_layers(model)[0].prompt_vec["default"].clone()
        out = model.generate(input_ids=llama_inputs, prompt_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 15)
    assert torch.equal(prompt_aware_lora_layers(model)[0].prompt_vec["default"], p)


def test_kv_cache_continuation_keeps_the_scale(llama_inputs):
    model = pa_model()
    with torch.no_grad():
        full = model(llama_inputs, prompt_mask=prompt_mask()).logits
        first = model(llama_inputs[:, :10], prompt_mask=prompt_mask()[:, :10], use_cache=True)
        p = prompt_aware_lora_layers(model)[0].prompt_vec["default"].clone()
        second = model(llama_inputs[:, 10:], past_key_values=first.past_key_values, use_cache=True)
    assert torch.equal(prompt_aware_lora_layers(model)[0].prompt_vec["default"], p)
    torch.testing.assert_close(second.logits, full[:, 10:], rtol=1e-4, atol=1e-5)


def test_prompt_mask_errors_name_the_argument(llama_inputs):
    model = pa_model()
    with pytest.raises(ValueError, match=r"prompt_mask must have shape \(2, 12\)"):
        model(llama_inputs, prompt_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="prompt_mask must be a bool"):
        model(llama_inputs, prompt_mask=torch.ones(2, 12))
    with pytest.raises(ValueError, match="at least one prompt token"):
        model(llama_inputs, prompt_mask=torch.zeros(2, 12, dtype=torch.bool))


def test_default_refuses_a_stage_2_call_without_prompt_mask(llama_inputs):
    """no_prompt='error' (default): no silent pooling over the whole input, in training or in eval."""
    model = pa_model()
    assert model.peft_config["default"].no_prompt == "error"
    model.train()
    with pytest.raises(ValueError, match=r"no prompt_mask=.*'fixed'.*'whole_input'"):
        model(llama_inputs, labels=llama_inputs)
    model.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="prompt_mask="):
        model(llama_inputs)
    set_stage(model, 1)  # stage 1 is plain LoRA: nothing to pool, no error
    with torch.no_grad():
        model(llama_inputs)


def future_changed(ids, start):
    """``ids`` with every token from position ``start`` on replaced (each one differs from the original)."""
    changed = ids.clone()
    changed[:, start:] = (ids[:, start:] + 1 + torch.arange(ids.shape[1] - start)) % 128
    assert (changed[:, start:] != ids[:, start:]).all()
    return changed


@pytest.mark.parametrize("cut", [4, 8])
def test_with_a_prompt_mask_future_tokens_never_change_earlier_logits(llama_inputs, cut):
    """The default path (prompt_mask on the leading instruction tokens 0..2) is causal: the logits of positions before
    ``cut`` do not move when the tokens from ``cut`` on change. 'whole_input' (opt-in) moves them: the label leak."""
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, :3] = True
    changed = future_changed(llama_inputs, cut)
    model = pa_model()
    model.train()  # dropout is 0, so train mode is deterministic; the path a training step takes
    with torch.no_grad():
        before = model(llama_inputs, prompt_mask=mask).logits
        after = model(changed, prompt_mask=mask).logits
    torch.testing.assert_close(after[:, :cut], before[:, :cut], rtol=0, atol=1e-6)
    assert (after[:, cut:] - before[:, cut:]).abs().max() > 1e-3  # the change is real

    leaky = pa_model(no_prompt="whole_input")
    with torch.no_grad():
        leak = (leaky(changed).logits[:, :cut] - leaky(llama_inputs).logits[:, :cut]).abs().max()
    assert leak > 1e-4, leak  # documented non-causality, 100x the tolerance above


def test_merge_refused_in_stage_2_allowed_in_stage_1(llama_inputs):
    model = pa_model()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    set_stage(model, 1)
    with torch.no_grad():
        before = model(llama_inputs).logits
        merged = model.merge_and_unload()
        assert rel_err(merged(llama_inputs).logits, before) <= 1e-5


def test_save_load_reproduces_prompted_logits_and_stage(tmp_path, llama_inputs):
    model = pa_model()
    mask = prompt_mask()
    with torch.no_grad():
        expected = model(llama_inputs, prompt_mask=mask).logits
    model.save_pretrained(tmp_path / "s2")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "s2")
    with torch.no_grad():
        assert torch.equal(loaded(llama_inputs, prompt_mask=mask).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference: pooler frozen too
    set_stage(model, 1)
    model.save_pretrained(tmp_path / "s1")
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path / "s1").peft_config["default"].stage == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [({"scale_mode": "width"}, "scale_mode"), ({"stage": 3}, "stage"), ({"clamp": 0}, "clamp"),
     ({"no_prompt": "none"}, "no_prompt"), ({"hidden_size": 0}, "hidden_size"),
     ({"freeze_lora_in_stage2": "yes"}, "freeze_lora_in_stage2"), ({"init_scale": 3}, "init_scale"),
     ({"clamp": float("inf")}, "clamp"), ({"lora_alpha": float("inf")}, "lora_alpha")],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"PromptAwareLoraConfig.{field} must be"):
        PromptAwareLoraConfig(**kwargs)


def test_an_adapter_loads_into_its_own_pooler_under_any_name(tmp_path, llama_inputs):
    # the pooler's keys carry no adapter name in the file (as every PEFT adapter weight), so loading the file as
    # "other" fills other's pooler and leaves default's alone; a file of peft-ext 0.1.0 (name kept in the pooler keys)
    # still loads
    from safetensors.torch import load_file, save_file

    saved = pa_model(seed=1)
    saved.save_pretrained(tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    assert any(k.startswith("base_model.prompt_aware_lora_pool.fc1.") for k in keys)
    model = pa_model(seed=2)
    default_before = {k: v.clone() for k, v in model.base_model.prompt_aware_lora_pool["default"].state_dict().items()}
    result = model.load_adapter(tmp_path / "a", adapter_name="other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    pools = model.base_model.prompt_aware_lora_pool
    expected = saved.base_model.prompt_aware_lora_pool["default"].state_dict()
    assert all(torch.equal(pools["other"].state_dict()[k], v) for k, v in expected.items())
    assert all(torch.equal(pools["default"].state_dict()[k], v) for k, v in default_before.items())
    legacy = {k.replace("prompt_aware_lora_pool.", "prompt_aware_lora_pool.default."): v
              for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    save_file(legacy, tmp_path / "a" / "adapter_model.safetensors")
    old = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    assert all(torch.equal(old.base_model.prompt_aware_lora_pool["default"].state_dict()[k], v)
               for k, v in expected.items())


def test_generic_models_called_without_input_ids_pool_the_call():
    # a model called with its own keyword (PEFT's MLP: model(X=...)) gets the same prompt pass: the same call without
    # LoRA, pooled over all rows; the result is the LoRA scaled by what the pooler gives for those rows
    from conftest import tiny_mlp

    class Keyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = tiny_mlp()

        def forward(self, X):
            return self.mlp(X)

    torch.manual_seed(0)
    x = torch.randn(5, 64)
    cfg = dict(r=4, lora_alpha=8, target_modules=["lin1"], no_prompt="whole_input")
    model = get_peft_model(Keyword(), PromptAwareLoraConfig(**cfg))
    randomize_adapter(model)
    positional = get_peft_model(Keyword(), PromptAwareLoraConfig(**cfg))
    positional.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = model(X=x)
        assert torch.equal(out, positional(x))  # the keyword call and the positional call agree
        with model.disable_adapter():
            assert rel_err(out, model(X=x)) > 1e-3  # and the LoRA is applied
