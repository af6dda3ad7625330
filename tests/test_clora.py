"""CLoRA on one diffusers pipeline with N PEFT adapters (https://arxiv.org/abs/2403.19776,
https://github.com/gemlab-vt/clora): one adapter with an all-ones mask is that adapter's latent, the contrastive loss
equals the InfoNCE formula on hand-built maps, fusion follows its formula, bad input is named."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from peft_ext.diffusion.clora import CLoraConfig, clora_generate, contrastive_loss, fuse_latents  # noqa: E402
from peft_ext.diffusion.tiny import add_random_lora, tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline(0)
    add_random_lora(pipe.unet, "cat", seed=1)
    add_random_lora(pipe.unet, "dog", seed=2)
    return pipe


def test_one_adapter_with_an_all_ones_mask_equals_that_adapters_latent(pipe):
    prompt = "a photo of a cat"
    pipe.unet.set_adapters(["cat"])
    expected = pipe(prompt, num_inference_steps=3, output_type="latent", generator=gen()).images
    pipe.unet.disable_adapters()
    base = pipe(prompt, num_inference_steps=3, output_type="latent", generator=gen()).images
    pipe.unet.enable_adapters()
    # one concept: no negatives, so the contrastive loss is 0 and the latent update is a no-op at the default step size
    got = clora_generate(pipe, prompt, ["cat"], [prompt], groups=[[[4], [4]]], masks=[torch.ones(8, 8)],
                         num_inference_steps=3, generator=gen())
    assert (expected - base).abs().max() > 1e-2
    # explicit softmax attention + PEFT's mixed-batch LoRA vs diffusers' SDPA: ~5e-5 observed on latents of ~14
    torch.testing.assert_close(got, expected, atol=3e-4, rtol=1e-5)
    assert pipe.unet.active_adapters() == ["cat"]


def test_contrastive_loss_equals_infonce_on_hand_built_maps():
    maps = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.2], [0.1, 0.8, 0.3], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    tau = 0.5

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    rows = maps.tolist()
    terms = []
    for a in range(5):
        for p in range(5):
            if p != a and labels[p] == labels[a]:
                pos = math.exp(cos(rows[a], rows[p]) / tau)
                neg = sum(math.exp(cos(rows[a], rows[n]) / tau) for n in range(5) if labels[n] != labels[a])
                terms.append(-math.log(pos / (pos + neg)))
    expected = sum(terms) / len(terms)
    torch.testing.assert_close(contrastive_loss(maps, labels, tau), torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert float(contrastive_loss(maps, torch.zeros(5, dtype=torch.long))) == pytest.approx(0.0, abs=1e-6)


def test_fusion_formula():
    base = torch.full((1, 1, 2, 2), 10.0)
    z1, z2 = torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), 3.0)
    m1 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    m2 = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    out = fuse_latents(base, [z1, z2], [m1, m2])
    # pixel (0,0): z1; (0,1): both masks -> mean 2; bottom row: no mask -> base
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 2.0], [10.0, 10.0]]))


def test_two_adapters_update_and_fuse(pipe):
    pipe.unet.set_adapters(["cat", "dog"])
    prompt = "a cat and a dog"
    groups = [[[2], [2], [2]], [[5], [5], [5]]]  # "cat" and "dog" at positions 2 and 5 in all three prompts
    kwargs = dict(num_inference_steps=2, generator=gen())
    out = clora_generate(pipe, prompt, ["cat", "dog"], [prompt, prompt], groups, **kwargs)
    kwargs["generator"] = gen()
    still = clora_generate(pipe, prompt, ["cat", "dog"], [prompt, prompt], groups, step_size=0.0, **kwargs)
    assert torch.isfinite(out).all() and (out - still).abs().max() > 1e-4  # the contrastive update moved the latent
    assert pipe.unet.active_adapters() == ["cat", "dog"]


def test_bad_input_names_the_field(pipe):
    with pytest.raises(ValueError, match="temperature"):
        CLoraConfig(temperature=0)
    with pytest.raises(ValueError, match="refine_steps"):
        CLoraConfig(refine_steps=[-1])
    with pytest.raises(ValueError, match="groups"):
        clora_generate(pipe, "a cat", ["cat"], ["a cat"], groups=[[[2]]], num_inference_steps=1)
    with pytest.raises(ValueError, match="masks"):
        clora_generate(pipe, "a cat", ["cat"], ["a cat"], groups=[[[2], [2]]], masks=[torch.ones(4, 4)],
                       num_inference_steps=1)
    with pytest.raises(ValueError, match="adapters"):
        clora_generate(pipe, "a cat", ["nope"], ["a cat"], groups=[[[2], [2]]], num_inference_steps=1)
