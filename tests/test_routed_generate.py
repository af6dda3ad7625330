"""``generate`` with per-token route inputs (gated LoRA https://arxiv.org/abs/2507.11851, TARA
https://arxiv.org/abs/2508.08812, MM-LoRA https://arxiv.org/abs/2410.13733; LoRA-Mixer
https://arxiv.org/abs/2507.00029): the route given for the prompt covers the prompt, generated tokens take the
documented fill, and beam search / num_return_sequences repeat the route per sample.

The oracle is a token-by-token greedy loop without a KV cache whose every forward gets the full route (prompt route
followed by the fill for each generated position), so nothing in it goes through the per-step fitting."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from conftest import randomize_adapter, tiny_llama
from peft_ext.tuners.gated_lora import GatedLoraConfig, GatedLoraLayer
from peft_ext.tuners.lora_mixer import LoraMixerConfig

NEW = 4  # generated tokens
# fp32 logits of the cached generate vs the uncached oracle: same weights, attention over the same keys in another
# association order; differences are ~1e-6 on logits of size ~1
LOGIT_TOL = dict(rtol=1e-4, atol=1e-5)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def routed_model(config):
    base = tiny_llama()
    base.generation_config.eos_token_id = None  # always generate NEW tokens
    base.generation_config.pad_token_id = 0
    model = get_peft_model(base, config)
    randomize_adapter(model, std=0.3)  # a large adapter: branch choices change the greedy tokens
    return model.eval()


def gated(**kwargs):
    return routed_model(GatedLoraConfig(r=4, lora_alpha=16, branches=["vision", "language"], target_modules=TARGETS,
                                        **kwargs))


def mixer():
    return routed_model(LoraMixerConfig(r=4, lora_alpha=8, num_experts=3, top_k=2, target_modules=TARGETS))


def prompt():
    return torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def with_fill(route, length, fill):
    """The prompt route followed by ``fill`` (or each sample's last entry) up to ``length`` positions."""
    extra = length - route.shape[1]
    column = route[:, -1:] if fill == "last" else torch.full((route.shape[0], 1), fill, dtype=route.dtype)
    return torch.cat([route, column.expand(-1, extra)], dim=1)


def greedy_oracle(model, ids, name, route, fill, steps=NEW):
    """Greedy decoding one token at a time, no cache, the full route on every forward."""
    seq, logits = ids, []
    with torch.no_grad():
        for _ in range(steps):
            full = with_fill(route, seq.shape[1], fill)
            last = model(input_ids=seq, use_cache=False, **{name: full}).logits[:, -1]
            logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, torch.stack(logits, 1)


def generate(model, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


ROUTE = torch.tensor([[0, 0, 1, -1, 1, 1], [0, -1, -1, 1, 0, 0]])
MODALITY = torch.tensor([[True, True, True, False, False, False], [True, False, True, True, False, False]])

CASES = [  # (model factory, input name, prompt route, extra call kwargs, fill the oracle uses)
    pytest.param(gated, "route_ids", ROUTE, {}, -1, id="route_ids-default-base"),
    pytest.param(gated, "route_ids", ROUTE, {"route_fill": 1}, 1, id="route_ids-fill-language"),
    pytest.param(gated, "route_ids", ROUTE, {"route_fill": "last"}, "last", id="route_ids-fill-last"),
    pytest.param(gated, "modality", MODALITY, {}, False, id="modality-default-language"),
    pytest.param(lambda: gated(default_route="vision"), "gate", MODALITY, {}, False, id="gate-default-base"),
    pytest.param(lambda: gated(default_route="vision"), "gate", MODALITY, {"route_fill": True}, True,
                 id="gate-fill-on"),
    pytest.param(mixer, "expert_ids", ROUTE + 1, {}, "last", id="expert_ids-default-last"),
    pytest.param(mixer, "expert_ids", ROUTE + 1, {"route_fill": -1}, -1, id="expert_ids-fill-none"),
    # without a KV cache every step runs the whole grown sequence
    pytest.param(gated, "route_ids", ROUTE, {"use_cache": False, "route_fill": 0}, 0, id="route_ids-no-cache"),
    pytest.param(mixer, "expert_ids", ROUTE + 1, {"use_cache": False}, "last", id="expert_ids-no-cache"),
]


@pytest.mark.parametrize("factory, name, route, extra, fill", CASES)
def test_greedy_generate_equals_token_by_token_forward_with_the_filled_route(factory, name, route, extra, fill):
    model, ids = factory(), prompt()
    expected_seq, expected_logits = greedy_oracle(model, ids, name, route, fill)
    seq, logits = generate(model, ids, **{name: route}, **extra)
    assert torch.equal(seq, expected_seq)
    torch.testing.assert_close(logits, expected_logits, **LOGIT_TOL)


def test_the_fill_decides_the_generated_tokens_route():
    """Guards the oracle test: the fills compared there give different logits at generated positions."""
    model, ids = gated(), prompt()
    _, base_only = generate(model, ids, route_ids=ROUTE)
    _, language = generate(model, ids, route_ids=ROUTE, route_fill=1)
    torch.testing.assert_close(base_only[:, 0], language[:, 0])  # the prompt forward does not see the fill
    assert (base_only[:, 1:] - language[:, 1:]).abs().max() > 1e-2


def layer_routes(model, layer_cls, name):
    """Record the ``name`` input the first tuner layer sees at each forward."""
    layer = next(m for m in model.modules() if isinstance(m, layer_cls))
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(m.call_inputs[name].clone()))
    return seen, handle


@pytest.mark.parametrize("kwargs, repeat", [
    ({"num_beams": 3, "num_return_sequences": 2}, 3),
    ({"num_beams": 1, "num_return_sequences": 2, "do_sample": True}, 2),
])
def test_beam_and_return_sequence_expansion_repeats_the_route_per_sample(kwargs, repeat):
    model, ids = gated(), prompt()
    seen, handle = layer_routes(model, GatedLoraLayer, "route_ids")
    with torch.no_grad():
        torch.manual_seed(0)
        model.generate(input_ids=ids, max_new_tokens=3, route_ids=ROUTE, route_fill="last", **kwargs)
    handle.remove()
    assert torch.equal(seen[0], ROUTE.repeat_interleave(repeat, dim=0))  # the prompt forward, sample by sample
    for step in seen[1:]:  # one generated token per forward: each sample's last prompt entry
        assert torch.equal(step, ROUTE[:, -1:].repeat_interleave(repeat, dim=0))


def test_beam_search_per_token_route_equals_per_sample_route_and_single_sample_calls():
    """Sample 0 routed to branch 0, sample 1 to branch 1 on every position: the per-token route with the 'last' fill,
    the per-sample route [0, 1] and one call per sample with a whole-call route must all decode alike."""
    model, ids = gated(), prompt()
    per_token = torch.tensor([[0] * 6, [1] * 6])
    beams = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": NEW, "do_sample": False}
    with torch.no_grad():
        a = model.generate(input_ids=ids, route_ids=per_token, route_fill="last", **beams)
        b = model.generate(input_ids=ids, route_ids=torch.tensor([0, 1]), **beams)
        singles = [model.generate(input_ids=ids[i : i + 1], route_ids=i, **beams) for i in range(2)]
    assert torch.equal(a, b)
    assert torch.equal(a, torch.cat(singles))
    with torch.no_grad():
        swapped = model.generate(input_ids=ids, route_ids=per_token.flip(0), route_fill="last", **beams)
    assert not torch.equal(a, swapped)  # the branches differ enough to change the beams


def test_forward_continuing_a_cache_takes_the_route_of_its_new_tokens():
    """A plain forward with past_key_values and a route for its own tokens: the route covers those tokens."""
    model, ids = gated(), prompt()
    more = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(1))
    more_route = torch.tensor([[1, 0, -1], [-1, 1, 1]])
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, more], 1), route_ids=torch.cat([ROUTE, more_route], 1),
                     use_cache=False).logits
        cache = model(input_ids=ids, route_ids=ROUTE, use_cache=True).past_key_values
        got = model(input_ids=more, route_ids=more_route, past_key_values=cache).logits
    torch.testing.assert_close(got, full[:, 6:], **LOGIT_TOL)


@pytest.mark.parametrize("route, match", [
    (ROUTE[:, :5], r"route_ids must have shape \(2, 6\)"),  # neither the prompt length nor per sample
    (torch.tensor([0, 1, 1]), r"route_ids must have shape .*one per sample"),
    (ROUTE[:1], r"route_ids must have shape \(2, 6\)"),  # one sample's route for a batch of two
])
def test_generate_with_a_route_that_fits_neither_the_prompt_nor_the_batch_names_the_argument(route, match):
    model, ids = gated(), prompt()
    with pytest.raises(ValueError, match=match):
        model.generate(input_ids=ids, max_new_tokens=2, route_ids=route)


@pytest.mark.parametrize("factory, name, route, fill", [
    (gated, "route_ids", ROUTE, 2),
    (gated, "route_ids", ROUTE, True),
    (gated, "route_ids", ROUTE, "first"),
    (gated, "modality", MODALITY, 1),
    (mixer, "expert_ids", ROUTE + 1, 3),
])
def test_bad_route_fill_names_the_argument(factory, name, route, fill):
    model, ids = factory(), prompt()
    with pytest.raises(ValueError, match="route_fill"):
        model.generate(input_ids=ids, max_new_tokens=2, **{name: route}, route_fill=fill)
