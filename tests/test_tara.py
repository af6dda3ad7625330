"""TARA on a diffusers UNet through gated_lora (https://arxiv.org/abs/2508.08812, https://github.com/YuqiPeng77/TARA):
an all-zero token mask leaves the cross-attention k/v exactly the base, one concept composed == the single adapter,
the alignment loss equals its formula, DreamBooth-style training trains only the adapter, bad input is named."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from peft_ext.diffusion.tara import (  # noqa: E402
    TaraTrainConfig,
    add_tara,
    alignment_loss,
    cfg_routes,
    compose_tara,
    save_tara,
    tara_config,
    tara_generate,
    tara_layers,
    tara_routes,
    train_tara,
    word_mask,
)
from peft_ext.diffusion.tiny import tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of sks teddy bear"  # MiniLM WordPiece: 'sks' -> 'sk', '##s'; 'teddy bear' -> 2 tokens as well


def randomise_up(unet, adapter, seed=3):
    """Non-zero up-projections so that the adapter changes outputs (a fresh TARA adapter is an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in tara_layers(unet, adapter):
            w = layer.gated_lora_up[adapter].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.3)


@pytest.fixture
def pipe():
    pipe = tiny_pipeline(0)
    add_tara(pipe.unet, tara_config(["teddy"], r=4, lora_alpha=16), adapter_name="teddy")
    randomise_up(pipe.unet, "teddy")
    return pipe


def kv_outputs(unet, run):
    """(input, output, base output) of every cross-attention to_k / to_v during ``run()``."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((args[0], out, mod.base_layer(args[0]))))
             for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_all_zero_token_mask_contributes_nothing_to_kv(pipe):
    unet = pipe.unet
    text = torch.randn(2, 16, 32)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])

    def run(routes):
        with tara_routes(unet, routes), torch.no_grad():
            unet(x, t, encoder_hidden_states=text)

    none = kv_outputs(unet, lambda: run(torch.full((2, 16), -1)))
    assert len(none) == 8  # 4 cross-attention layers × (to_k, to_v)
    assert all(torch.equal(out, base) for _, out, base in none)  # bit-identical to the base
    routes = torch.full((2, 16), -1)
    routes[1, 4] = 0
    some = kv_outputs(unet, lambda: run(routes))
    for _, out, base in some:
        assert torch.equal(out[0], base[0]) and torch.equal(out[1, :4], base[1, :4])  # unrouted tokens untouched
        assert (out[1, 4] - base[1, 4]).abs().max() > 1e-3  # the routed token gets the concept's delta


def test_one_concept_multi_tara_equals_tara(pipe, tmp_path):
    kwargs = dict(num_inference_steps=2, output_type="latent")
    single = tara_generate(pipe, PROMPT, ["sks"], generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.unet.disable_adapters()
    base = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.unet.enable_adapters()
    save_tara(pipe.unet, tmp_path / "teddy", "teddy")
    compose_tara(pipe.unet, [tmp_path / "teddy"], adapter_name="multi")
    assert pipe.unet.active_adapters() == ["multi"]
    multi = tara_generate(pipe, PROMPT, ["sks"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (single - base).abs().max() > 1e-3
    torch.testing.assert_close(multi, single, atol=1e-6, rtol=1e-6)  # same weights, same ops: equal up to round-off


def test_two_concepts_composed_route_each_kv_token_to_its_own_concept(pipe):
    unet = pipe.unet
    add_tara(unet, tara_config(["car"], r=4, lora_alpha=16), adapter_name="car")
    randomise_up(unet, "car", seed=5)
    text, x, t = torch.randn(1, 16, 32), torch.randn(1, 4, 8, 8), torch.tensor([300])
    routes = torch.full((1, 16), -1)
    routes[0, 4] = 0

    def run(r):
        with tara_routes(unet, r), torch.no_grad():
            unet(x, t, encoder_hidden_states=text)

    alone = kv_outputs(unet, lambda: run(routes))  # 'car' alone (the last added adapter is active), token 4 routed
    # the single-concept adapters stay on the UNet (one branch each): only the active composed adapter is routed
    compose_tara(unet, ["teddy", "car"], adapter_name="both")
    routes[0, 4] = 1  # branch 1 of the composed adapter = 'car'
    both = kv_outputs(unet, lambda: run(routes))
    for (_, a, base), (_, b, _) in zip(alone, both):
        torch.testing.assert_close(b[0, 4], a[0, 4], atol=1e-5, rtol=1e-5)  # same delta, summed in another order
        assert torch.equal(b[0, :4], base[0, :4])  # unrouted tokens: the base k/v exactly
    assert (alone[0][1][0, 4] - alone[0][2][0, 4]).abs().max() > 1e-3  # the concept's delta is not zero


def test_alignment_loss_equals_the_formula_on_random_tensors(pipe):
    unet = pipe.unet
    torch.manual_seed(0)
    text = torch.randn(2, 16, 32)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    routes = torch.full((2, 16), -1)
    routes[0, 3], routes[0, 4], routes[1, 7] = 0, 0, 0
    cls = torch.zeros(2, 16, dtype=torch.bool)
    cls[0, 5], cls[0, 6], cls[1, 8] = True, True, True
    hooks, seen = [], []
    for n, m in unet.named_modules():
        if n.endswith("attn2.to_k"):
            hooks.append(m.register_forward_hook(lambda mod, args, out: seen.append((args[0], mod))))
    with tara_routes(unet, routes, cls):
        unet(x, t, encoder_hidden_states=text)
        got = alignment_loss(unet)
    for h in hooks:
        h.remove()
    terms = []
    for inp, mod in seen:  # (base + B A x · α/r)[rare tokens, in order] vs base[class tokens, in order]
        base = inp @ mod.base_layer.weight.T
        delta = inp @ mod.gated_lora_down["teddy"].weight.T @ mod.gated_lora_up["teddy"].weight.T * (16 / 4)
        terms.append(((base + delta)[routes >= 0] - base[cls]).abs().mean())
    expected = 1.0 * torch.stack(terms).mean()  # alignment_loss_weight 1.0, averaged over the to_k layers
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-7)


def test_train_tara_trains_only_the_adapter_and_records_the_alignment_loss():
    pipe = tiny_pipeline(0)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    history = train_tara(pipe, images, prompt=PROMPT, rare_word="sks", class_word="teddy bear", r=4, steps=4,
                         learning_rate=1e-2)
    assert all(v > 0 for v in history["align"]) and len(history["loss"]) == 4
    after = {n.replace(".base_layer", ""): p.detach() for n, p in pipe.unet.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before)  # the base UNet is frozen
    trained = [n for n, p in after.items() if "gated_lora_up" in n and p.abs().sum() > 0]  # up starts at 0
    assert any(".attn2.to_k." in n for n in trained) and any(".attn1." in n for n in trained)


def test_cfg_routes_follow_the_batch_doubling(pipe):
    tok = pipe.tokenizer
    own = cfg_routes(tok, PROMPT, ["sks"], negative_prompt="blurry")
    assert own.shape == (2, 16) and int((own[0] >= 0).sum()) == 0 and own[1].tolist()[4:6] == [0, 0]
    copy = cfg_routes(tok, PROMPT, ["sks"], uncond_routes="copy")
    assert torch.equal(copy[0], copy[1])
    assert cfg_routes(tok, PROMPT, ["sks"], do_cfg=False, num_images_per_prompt=3).shape == (3, 16)
    assert word_mask(tok, [PROMPT, "sks and sks"], "sks").sum(1).tolist() == [2, 4]


def test_bad_input_names_the_field(pipe):
    with pytest.raises(ValueError, match="class_word"):
        train_tara(pipe, torch.zeros(1, 3, 8, 8), prompt="a photo of sks dog", rare_word="sks", class_word="dog",
                   steps=1)
    with pytest.raises(ValueError, match="steps"):
        TaraTrainConfig(steps=0)
    with pytest.raises(ValueError, match="route_ids"):
        with tara_routes(pipe.unet, torch.full((2, 16), 3)):
            pass
    with pytest.raises(ValueError, match="align_mask"):
        with tara_routes(pipe.unet, torch.full((2, 16), -1), torch.ones(2, 16, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="uncond_routes"):
        cfg_routes(pipe.tokenizer, PROMPT, ["sks"], uncond_routes="both")
    with pytest.raises(ValueError, match="sources"):
        compose_tara(pipe.unet, [])
    with pytest.raises(ValueError, match="concept name 'teddy' occurs twice"):
        compose_tara(pipe.unet, ["teddy", "teddy"])


def test_train_tara_script_writes_an_adapter_that_loads_back(tmp_path):
    """scripts/train_tara.py (the DreamBooth-style command): photos folder -> TARA adapter folder; the folder loads
    into a fresh pipeline with load_tara and carries the trained weights (up != 0 after training from up = 0)."""
    import importlib.util
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from peft_ext.diffusion.tara import load_tara, tara_state

    spec = importlib.util.spec_from_file_location(
        "train_tara", Path(__file__).resolve().parents[1] / "scripts" / "train_tara.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # not square and larger than the pipeline: exercises the centre crop and resize
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    out = tmp_path / "tara_dog"
    # the tiny tokenizer splits "sks" and "teddy bear" into 2 tokens each, as the alignment loss needs
    words = ["--prompt", "a photo of sks teddy bear", "--rare-word", "sks", "--class-word", "teddy bear"]
    assert script.main(["--tiny", "--images", str(photos), "--out", str(out), "--steps", "2", "--r", "2",
                        "--learning-rate", "0.01", *words]) == 0
    pipe = tiny_pipeline(seed=0)
    load_tara(pipe.unet, out, adapter_name="tara")
    _, weights = tara_state(pipe.unet, "tara")
    assert weights and any(float(up.abs().sum()) > 0 for _, up in weights.values())
    with pytest.raises(SystemExit, match="no .png"):
        script.main(["--tiny", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="rare_word"):
        script.main(["--tiny", "--images", str(photos), "--out", str(tmp_path / "y"), "--rare-word", "zzq"])
    assert not (tmp_path / "y").exists()
