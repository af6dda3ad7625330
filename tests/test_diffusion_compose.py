"""LoRA Merge / Switch / Composite on one tiny offline diffusers pipeline with N PEFT adapters (issue 18)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from peft_ext.diffusion.compose import (  # noqa: E402
    LoraSwitchCallback, composite, composite_forward, merge, patched_forward, save_unet_lora, switch)
from peft_ext.diffusion.tiny import add_random_lora, tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = dict(prompt="a photo", num_inference_steps=4, guidance_scale=3.0, output_type="pt")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = tiny_pipeline(seed=0)
    for k, name in enumerate(["a", "b", "c"]):
        add_random_lora(p.unet, name, seed=10 + k)
    return p


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500),
            torch.randn(2, 16, 32, generator=g))


def test_composite_prediction_is_the_mean_of_single_adapter_predictions(pipe):
    sample, t, ehs = _unet_inputs()
    singles = []
    for name in ["a", "b", "c"]:
        pipe.unet.set_adapters([name])
        singles.append(pipe.unet(sample, t, encoder_hidden_states=ehs, return_dict=False)[0])
    assert not torch.allclose(singles[0], singles[1])  # the adapters really differ
    with patched_forward(pipe.unet, lambda orig: composite_forward(pipe.unet, orig, ["a", "b", "c"])):
        both = pipe.unet(sample, t, encoder_hidden_states=ehs, return_dict=False)[0]
    assert torch.equal(both, torch.stack(singles).mean(dim=0))


def test_composite_pipeline_equals_the_official_loop(pipe):
    """The official loop: per adapter UNet on [uncond; cond], mean of each half, then CFG, then the scheduler step."""
    names, steps, cfg = ["a", "c"], 4, 3.0
    out = composite(pipe, names, prompt="a photo", num_inference_steps=steps, guidance_scale=cfg,
                    output_type="latent", generator=_gen())
    assert out.unet_evals == steps * len(names)

    cond, uncond = pipe.encode_prompt("a photo", "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    pipe.scheduler.set_timesteps(steps)
    latents = pipe.prepare_latents(1, 4, 8, 8, torch.float32, "cpu", _gen())
    for t in pipe.scheduler.timesteps:
        x = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        preds = []
        for name in names:
            pipe.unet.set_adapters([name])
            preds.append(pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0])
        eps_u, eps_c = torch.stack(preds).chunk(2, dim=1)
        eps_u, eps_c = eps_u.mean(0), eps_c.mean(0)
        latents = pipe.scheduler.step(eps_u + cfg * (eps_c - eps_u), t, latents, return_dict=False)[0]
    assert torch.equal(out.images, latents)


def test_switch_activates_the_expected_sequence(pipe):
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(tuple(pipe.unet.active_adapters())))
    try:
        out = switch(pipe, ["a", "b", "c"], switch_step=3, **{**PROMPT, "num_inference_steps": 12})
    finally:
        handle.remove()
    # official condition: after step i with i > 0 and i % 3 == 0 the next adapter becomes active
    expected = ["a"] * 4 + ["b"] * 3 + ["c"] * 3 + ["a"] * 2
    assert out.active == expected
    assert seen == [(name,) for name in expected]  # what the UNet really ran with
    assert out.unet_evals == 12


def test_merge_with_one_adapter_equals_that_adapter(pipe):
    merged = merge(pipe, ["b"], generator=_gen(), **PROMPT)
    pipe.unet.set_adapters(["b"])
    single = pipe(generator=_gen(), **PROMPT).images
    assert torch.equal(merged.images, single)
    assert merged.unet_evals == 4


def test_merge_fused_equals_unfused_and_differs_from_each_adapter(pipe):
    unfused = merge(pipe, ["a", "b"], generator=_gen(), **PROMPT).images
    fused = merge(pipe, ["a", "b"], fuse=True, generator=_gen(), **PROMPT).images
    # fusing W + sum_k B_k A_k reorders float32 sums: agreement to 1e-5 absolute on [0, 1] pixels
    assert torch.allclose(unfused, fused, atol=1e-5)
    after = merge(pipe, ["a", "b"], generator=_gen(), **PROMPT).images  # base weights restored bit-exactly
    assert torch.equal(after, unfused)
    only_a = merge(pipe, ["a"], generator=_gen(), **PROMPT).images
    assert (unfused - only_a).abs().max() > 1e-3


def test_adapters_load_back_with_diffusers_load_lora_weights(pipe, tmp_path):
    save_unet_lora(pipe, "b", tmp_path / "b")
    save_unet_lora(pipe, "c", tmp_path / "c")
    fresh = tiny_pipeline(seed=0)
    fresh.load_lora_weights(tmp_path / "b", adapter_name="b")
    fresh.load_lora_weights(tmp_path / "c", adapter_name="c")
    for name in ["b", "c"]:
        fresh.set_adapters([name])
        pipe.unet.set_adapters([name])
        mine = pipe(generator=_gen(), **PROMPT).images
        theirs = fresh(generator=_gen(), **PROMPT).images
        assert torch.equal(mine, theirs), name
    assert torch.equal(composite(fresh, ["b", "c"], generator=_gen(), **PROMPT).images,
                       composite(pipe, ["b", "c"], generator=_gen(), **PROMPT).images)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["pytorch_lora_weights.safetensors"]


@pytest.mark.parametrize("call, match", [
    (lambda p: composite(p, ["a", "zz"], **PROMPT), "adapters: unknown adapter 'zz'"),
    (lambda p: merge(p, [], **PROMPT), "adapters: expected a non-empty list"),
    (lambda p: merge(p, "a", **PROMPT), "adapters: expected a non-empty list"),
    (lambda p: merge(p, ["a", "a"], **PROMPT), "adapters: each adapter may appear once"),
    (lambda p: merge(p, ["a", "b"], weights=[1.0], **PROMPT), "weights: expected 2 values"),
    (lambda p: switch(p, ["a", "b"], switch_step=0, **PROMPT), "switch_step: expected an integer >= 1"),
    (lambda p: switch(p, ["a"], callback_on_step_end=print, **PROMPT), "callback_on_step_end: set by"),
    (lambda p: LoraSwitchCallback(["a"], switch_step=2.5), "switch_step"),
    (lambda p: save_unet_lora(p, "nope", "/tmp/never"), "adapter_name: unknown adapter 'nope'"),
])
def test_bad_input_names_the_field(pipe, call, match):
    before = pipe.unet.active_adapters()
    with pytest.raises(ValueError, match=match):
        call(pipe)
    assert pipe.unet.active_adapters() == before
    assert "forward" not in pipe.unet.__dict__  # the UNet's forward is never left patched


def test_every_public_name_resolves_lazily_to_its_method_module():
    import peft_ext.diffusion as diffusion

    assert set(diffusion.__all__) <= set(dir(diffusion))
    for name in diffusion.__all__:
        obj = getattr(diffusion, name)
        module = diffusion._EXPORTS[name]
        # the lazy table names the module that defines it (no stale entries pointing at a re-export)
        assert obj.__module__ == f"peft_ext.diffusion.{module}", name
    from peft_ext.diffusion import cmlora  # the submodule, whose generate function is exported as cmlora_generate

    assert diffusion.cmlora_generate is cmlora.cmlora
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffusion.nope  # noqa: B018
