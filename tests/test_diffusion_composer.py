"""LoRA-Composer on one diffusers pipeline with N PEFT adapters (https://arxiv.org/abs/2403.11627,
https://github.com/Young98CN/LoRA_Composer): a whole-image box equals the concept's adapter, concept isolation is the
paper's mask, latent re-initialisation copies the best patch, the loss prefers in-box attention, bad input is named."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from peft_ext.diffusion.lora_composer import (  # noqa: E402
    ComposerConcept,
    LoraComposerConfig,
    box_pixels,
    composer_loss,
    isolation_bias,
    lora_composer_generate,
    reinit_latents,
    token_positions,
)
from peft_ext.diffusion.tiny import add_random_lora, tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CROSS_KVO = ["attn2.to_k", "attn2.to_v", "attn2.to_out.0"]  # what LoRA-Composer takes from a concept's adapter


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipe = tiny_pipeline(0)
    add_random_lora(pipe.unet, "dog", seed=1, target_modules=CROSS_KVO)
    add_random_lora(pipe.unet, "cat", seed=2)
    return pipe


def test_whole_image_box_with_one_concept_equals_that_adapter(pipe):
    prompt = "a photo of a dog"
    pipe.unet.set_adapters(["dog"])
    expected = pipe(prompt, num_inference_steps=3, output_type="latent", generator=gen()).images
    pipe.unet.disable_adapters()
    base = pipe(prompt, num_inference_steps=3, output_type="latent", generator=gen()).images
    pipe.unet.enable_adapters()
    before = dict(pipe.unet.attn_processors)
    concept = ComposerConcept("dog", (0, 0, 1, 1), prompt, token_indices=token_positions(pipe.tokenizer, prompt, "dog"))
    # re-initialisation on: with a whole-image box the best patch is the whole latent, i.e. a no-op up to round-off;
    # latent optimisation off: it changes the latent by design
    got = lora_composer_generate(pipe, prompt, [concept], num_inference_steps=3, optimize=False, generator=gen())
    assert (expected - base).abs().max() > 1e-2  # the adapter matters, so the equality below is not vacuous
    # explicit softmax attention vs diffusers' SDPA over 3 CFG steps: ~2e-5 observed on latents of magnitude ~13
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-5)
    assert pipe.unet.active_adapters() == ["dog"]
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_isolation_mask_is_the_papers_on_a_hand_built_layout():
    # 2×2 map, pixels 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1); A = top-left pixel, B = right column
    A, B = (0, 0, 0.5, 0.5), (0, 0.5, 1, 1)
    M = -1e6
    expected = torch.tensor([[0, M, 0, M],   # query in A: keys in B penalised
                             [M, 0, 0, 0],   # query in B: keys in A penalised
                             [0, 0, 0, 0],   # background query: nothing
                             [M, 0, 0, 0]])
    torch.testing.assert_close(isolation_bias([A, B], 2, 2), expected, atol=0, rtol=0)
    # a third box C = top row overlaps A and B; a query inside several boxes sums every box's penalties (official)
    C = (0, 0, 0.5, 1)
    expected3 = torch.tensor([[2 * M, 3 * M, 0, 2 * M],  # pixel 0 in A and C
                              [3 * M, 2 * M, 0, M],      # pixel 1 in B and C
                              [0, 0, 0, 0],
                              [2 * M, M, 0, 0]])         # pixel 3 in B only: keys in A (0) and C (0, 1)
    torch.testing.assert_close(isolation_bias([A, B, C], 2, 2), expected3, atol=0, rtol=0)


def test_reinit_copies_the_best_patch_into_the_box_and_renormalises():
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    maps = torch.zeros(4, 4, 3)
    maps[2:4, 0:2, 1] = 1.0  # token 1 attends to the bottom-left 2×2 cells of a 4×4 map
    box = (0, 0.5, 0.5, 1)  # top-right quarter
    out = reinit_latents(latents, [maps], [box], [[1]])
    copy = latents.clone()
    copy[:, :, 0:4, 4:8] = latents[:, :, 4:8, 0:4]  # map cell = 2 latent pixels
    expected = (copy - copy.mean()) / copy.std() * latents.std() + latents.mean()
    torch.testing.assert_close(out, expected)


def test_loss_prefers_attention_inside_the_box():
    box = (0, 0, 0.5, 0.5)
    x1, y1, x2, y2 = box_pixels(box, 8, 8)
    inside = torch.full((8, 8, 4), 0.01)
    inside[x1:x2, y1:y2, 2] = 1.0
    outside = torch.full((8, 8, 4), 0.01)
    outside[4:8, 4:8, 2] = 1.0
    identity = torch.eye(64)  # self-attention that never leaves its pixel
    leaky = torch.full((64, 64), 1 / 64)
    good = composer_loss([inside], identity, [box], [[2]])
    assert good < composer_loss([outside], identity, [box], [[2]])
    assert good < composer_loss([inside], leaky, [box], [[2]])
    off = LoraComposerConfig(fg_weight=0, fill_weight=0, bg_weight=1.0)
    torch.testing.assert_close(composer_loss([inside], leaky, [box], [[2]], off), torch.tensor(1 / 64))


def test_two_concepts_with_optimisation_run_and_restore_state(pipe):
    prompt = "a dog and a cat"
    pipe.unet.set_adapters(["dog", "cat"])
    grads = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    concepts = [ComposerConcept("dog", (0, 0, 1, 0.5), "a dog", token_indices=[2]),
                ComposerConcept("cat", (0, 0.5, 1, 1), "a cat", token_indices=[2])]
    out = lora_composer_generate(pipe, prompt, concepts, num_inference_steps=2, generator=gen())
    plain = lora_composer_generate(pipe, prompt, concepts, num_inference_steps=2, generator=gen(), optimize=False,
                                   reinit=False)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4  # the optimisation moved the latent
    assert pipe.unet.active_adapters() == ["dog", "cat"]
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == grads


def test_bad_input_names_the_field(pipe):
    with pytest.raises(ValueError, match="box"):
        ComposerConcept("dog", (0.5, 0, 0.2, 1), "a dog")
    with pytest.raises(ValueError, match="top_k_ratio"):
        LoraComposerConfig(top_k_ratio=0)
    with pytest.raises(ValueError, match="ComposerConcept.adapter"):
        lora_composer_generate(pipe, "x", [ComposerConcept("nope", (0, 0, 1, 1), "x")], num_inference_steps=1)
    with pytest.raises(ValueError, match="has no field"):
        lora_composer_generate(pipe, "x", [], num_steps=1)
    with pytest.raises(ValueError, match="loss_resolution"):
        lora_composer_generate(pipe, "x", [ComposerConcept("dog", (0, 0, 1, 1), "x", [1])], num_inference_steps=1,
                               loss_resolution=3)
    with pytest.raises(ValueError, match="does not occur"):
        token_positions(pipe.tokenizer, "a dog", "cat")
