"""CMLoRA (issue 18): the official formulas on fixed inputs, the schedule with and without the official quirks, and the
non-uniform caching on a tiny offline pipeline (deep-block evaluations counted independently by a hook)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from peft_ext.diffusion.cmlora import (  # noqa: E402
    CMLoRAConfig, DeepFeatureCache, cmlora, cmlora_schedule, dominant_weights, frequency_metric,
    lora_frequency_metrics, order_by_frequency, refresh_steps)
from peft_ext.diffusion.compose import composite  # noqa: E402
from peft_ext.diffusion.tiny import add_random_lora, tiny_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKER = np.array([[(-1.0) ** (i + j) for j in range(4)] for i in range(4)])


def test_frequency_metric_on_hand_computed_spectra():
    # 4x4 checkerboard: the only Fourier coefficient is 16 at (2, 2), which fftshift moves to the corner (0, 0), at
    # offset (-2, -2) from the centre: radius sqrt(8) -> bin 2, which holds 7 pixels (4 <= y^2 + x^2 < 9). Radial
    # profile [0, 0, 16/7], normalised [0, 0, 1].
    assert frequency_metric(CHECKER, min_radius=2) == pytest.approx(1.0, abs=1e-12)
    assert frequency_metric(CHECKER, min_radius=0) == pytest.approx(1 / 3, abs=1e-12)
    # + constant 3: DC coefficient 48 at the centre -> profile [48, 0, 16/7] / 48 = [1, 0, 1/21]; radii >= 1: 1/42
    assert frequency_metric(CHECKER + 3.0, min_radius=1) == pytest.approx(1 / 42, abs=1e-12)
    # (C, H, W) input: channel mean first (2*checker and 0 average to the checkerboard)
    stacked = torch.tensor(np.stack([2 * CHECKER, 0 * CHECKER]))
    assert frequency_metric(stacked, min_radius=2) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="min_radius: 3 is outside 0..2"):
        frequency_metric(CHECKER, min_radius=3)
    with pytest.raises(ValueError, match="x: expected an image or latent"):
        frequency_metric(np.zeros(5))


def test_order_by_frequency_and_dominant_weights():
    high, low = order_by_frequency({"bg": 0.2, "style": 0.9, "char": 0.7, "cloth": 0.68}, threshold=0.68)
    assert high == ["style", "char", "cloth"] and low == ["bg"]
    # c = N - 0.5, w_non = N / (c + N - 1), w_dom = c * w_non
    assert dominant_weights(2) == pytest.approx((1.2, 0.8))
    assert dominant_weights(3) == pytest.approx((5 / 3, 2 / 3))
    assert dominant_weights(5) == pytest.approx((4.5 * 5 / 8.5, 5 / 8.5))
    for n in (2, 3, 5):
        w_dom, w_non = dominant_weights(n)
        assert w_dom + (n - 1) * w_non == pytest.approx(n)  # the weights average to 1


def test_refresh_steps_are_the_official_schedule():
    steps = refresh_steps(220, 0)  # int(0.375 * 220) = 82, int(0.875 * 220) = 192
    assert steps == list(range(0, 82, 2)) + list(range(82, 192, 3)) + list(range(192, 220, 2))
    assert len(steps) == 41 + 37 + 14 and steps[40:43] == [80, 82, 85] and steps[77:79] == [190, 192]
    assert refresh_steps(10, 1) == list(range(10))
    assert refresh_steps(10, 3) == [0, 3, 6, 9]


def test_schedule_dominant_rotation_shift_and_the_copy_bug():
    # 2 high + 1 low adapters, 10 steps, refresh every 2 steps, shift after step 5 (worked by hand from the official
    # loop: at a refresh the adapter indicator % 2 (+1 once shifted) is cleared, then indicator += 1)
    paper = cmlora_schedule(10, 2, 1, CMLoRAConfig(cache_interval=2, shift_step=5))
    assert [p.dominant for p in paper] == [0, 0, 1, 1, 0, 0, 2, 2, 1, 1]
    assert [p.refreshed for p in paper] == [0, None, 1, None, 0, None, 2, None, 1, None]
    assert paper[6].weights == pytest.approx((2 / 3, 2 / 3, 5 / 3))
    faithful = cmlora_schedule(10, 2, 1, CMLoRAConfig(cache_interval=2, shift_step=5, faithful_quirks=True))
    assert [p.dominant for p in faithful] == [0, 0, 1, 1, 0, 0, 2, 2, 1, 1]  # the rotation still shifts ...
    assert [p.refreshed for p in faithful] == [0, None, 1, None, 0, None, None, None, None, None]  # ... caches never
    # shift_step: paper mode scales 120/220 to the step count, faithful mode takes 120 literally
    assert CMLoRAConfig().resolved_shift_step(220) == 120 and CMLoRAConfig().resolved_shift_step(10) == 5
    assert [p.dominant for p in cmlora_schedule(10, 2, 1, CMLoRAConfig(cache_interval=2, faithful_quirks=True))] \
        == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    # no low-frequency adapter: no shift; equal weights when dominant=False
    plain = cmlora_schedule(6, 3, 0, CMLoRAConfig(cache_interval=3, shift_step=0, dominant=False))
    assert [p.dominant for p in plain] == [0, 0, 0, 1, 1, 1] and plain[0].weights == (1.0, 1.0, 1.0)
    # quirk 1: the official decay c -= 0.5**k (applied before the step's weights) is dead code; decay_dominant applies
    # it: N=2, c = 1.5 - 1 = 0.5 at step 0 -> (w_dom, w_non) = (0.5 * 2 / 1.5, 2 / 1.5)
    decayed = cmlora_schedule(4, 2, 0, CMLoRAConfig(cache_interval=2, decay_dominant=True))
    assert decayed[0].weights == pytest.approx((2 / 3, 4 / 3))
    assert cmlora_schedule(4, 2, 0, CMLoRAConfig(cache_interval=2))[3].weights == pytest.approx((0.8, 1.2))


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = tiny_pipeline(seed=0)
    for k, name in enumerate(["a", "b", "c"]):
        add_random_lora(p.unet, name, seed=20 + k)
    return p


KW = dict(prompt="a photo", guidance_scale=3.0, output_type="latent")


def _gen():
    return torch.Generator().manual_seed(0)


def test_caching_off_and_equal_weights_is_composite(pipe):
    config = CMLoRAConfig(use_cache=False, dominant=False)
    ours = cmlora(pipe, ["a", "b"], ["c"], config, num_inference_steps=5, generator=_gen(), **KW)
    ref = composite(pipe, ["a", "b", "c"], num_inference_steps=5, generator=_gen(), **KW)
    assert torch.equal(ours.images, ref.images)
    assert ours.deep_evals == ours.unet_evals == 15


def _count_deep_runs(unet):
    """An independent counter: forward calls of a layer inside the mid block (it runs only when the deep part does)."""
    counter = {"n": 0}

    def hook(module, args):
        counter["n"] += 1

    return counter, unet.mid_block.resnets[0].register_forward_pre_hook(hook)


@pytest.mark.parametrize("high, low, config, expected", [
    # refresh at 0, 3, 6, 9: step 0 fills both caches (2), each later refresh recomputes only the dominant (1 each)
    (["a", "b"], [], CMLoRAConfig(cache_interval=3), 2 + 3),
    # refresh every 2 steps with a shift after step 3: paper mode refreshes the shifted dominant (the low adapter)
    (["a"], ["c"], CMLoRAConfig(cache_interval=2, shift_step=3), 2 + 4),
    # faithful: after the shift the copy assignment refreshes nothing
    (["a"], ["c"], CMLoRAConfig(cache_interval=2, shift_step=3, faithful_quirks=True), 2 + 1),
    # faithful quirk 3: c = 0 never reuses (quick_replicate = c > 1): every adapter runs fully at every step
    (["a", "b"], [], CMLoRAConfig(cache_interval=0, faithful_quirks=True), 2 * 10),
    # paper mode c = 0: refresh steps int(3.75)=3 -> [0, 2], [3, 6] ... : 0, 2, 3, 6, 8 -> 2 + 4
    (["a", "b"], [], CMLoRAConfig(cache_interval=0), 2 + 4),
])
def test_deep_block_evaluations_match_the_schedule(pipe, high, low, config, expected):
    assert refresh_steps(10, 0) == [0, 2, 3, 6, 8]
    counter, handle = _count_deep_runs(pipe.unet)
    try:
        out = cmlora(pipe, high, low, config, num_inference_steps=10, generator=_gen(), **KW)
    finally:
        handle.remove()
    n = len(high) + len(low)
    assert counter["n"] == out.deep_evals == expected
    assert out.unet_evals == 10 * n  # the shallow blocks always run
    assert len(out.active) == 10 and torch.isfinite(out.images).all()


def test_reuse_skips_the_deep_blocks(pipe):
    """Reusing features recorded on the same inputs gives the full output exactly; on other inputs it differs from a
    full pass (the deep blocks did not run) but keeps the shallow blocks' response to the input."""
    unet = pipe.unet
    unet.set_adapters(["a"])
    g = torch.Generator().manual_seed(3)
    x, x2, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32)
    cache = DeepFeatureCache(unet, depth=1)
    with cache.installed():
        def call(inp):
            return lambda: unet(inp, 10, encoder_hidden_states=ehs, return_dict=False)[0]

        full, feats = cache.run(call(x), None, record=True)
        again, _ = cache.run(call(x), feats, record=True)
        stale, _ = cache.run(call(x2), feats, record=True)
        fresh, _ = cache.run(call(x2), None, record=False)
    assert torch.equal(full, again)
    assert not torch.allclose(stale, fresh) and not torch.allclose(stale, full)
    assert cache.deep_evals == 2
    assert "forward" not in unet.mid_block.__dict__


def test_lora_frequency_metrics_measure_each_adapter_alone(pipe):
    metrics = lora_frequency_metrics(pipe, ["a", "b"], min_radius=2, num_inference_steps=3, generator=_gen(),
                                     prompt="a photo", guidance_scale=1.0)
    pipe.unet.set_adapters(["b"])
    latent = pipe(num_inference_steps=3, generator=_gen(), prompt="a photo", guidance_scale=1.0,
                  output_type="latent").images[0]
    assert metrics["b"] == frequency_metric(latent, min_radius=2)
    assert metrics["a"] != metrics["b"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache_interval=-1), "CMLoRAConfig.cache_interval"),
    (dict(cache_interval=1.5), "CMLoRAConfig.cache_interval"),
    (dict(cache_depth=0), "CMLoRAConfig.cache_depth"),
    (dict(shift_step=-2), "CMLoRAConfig.shift_step"),
])
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CMLoRAConfig(**kwargs)


def test_bad_call_names_the_field(pipe):
    with pytest.raises(ValueError, match="high \\+ low: unknown adapter 'zz'"):
        cmlora(pipe, ["a"], ["zz"], num_inference_steps=2, **KW)
    with pytest.raises(ValueError, match="num_inference_steps: required"):
        cmlora(pipe, ["a"], **KW)
    with pytest.raises(ValueError, match="cache_depth: expected 1..1"):
        cmlora(pipe, ["a"], config=CMLoRAConfig(cache_depth=2), num_inference_steps=2, **KW)
    assert "forward" not in pipe.unet.__dict__
