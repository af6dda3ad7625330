"""ICM-LoRA (peft_ext.generation.icm): adapter flattening, the CVAE's conditional path, generated folders that load in
PEFT, ICM-Fusion's one-task case, and one-line errors on bad input. Tiny sizes: a random 2-layer Llama with LoRA r=2
on q_proj / v_proj (896 numbers per adapter), a CVAE with 2 conv layers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from peft_ext.generation import (
    AdapterLayout,
    IcmLoraConfig,
    IcmLoraGenerator,
    LoraCVAE,
    denormalize_adapter,
    fuse_conditions,
    icm_fusion,
    normalize_adapter,
    save_lora_folder,
    train_lora_cvae,
)

TARGETS = ["q_proj", "v_proj"]
# A CVAE small enough to train in about a second: 2 stride-2 conv layers, padding to a multiple of 64.
TINY = dict(channels=(4, 8), divide_slice_length=64, latent_dim=8, batch_size=2, learning_rate=1e-2, seed=0)


def lora_config(r: int = 2):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)


def saved_keys_state_dict(r: int = 2, seed: int = 0, pattern: dict = None, noise: float = 0.05) -> dict:
    """A LoRA state dict under PEFT's saved key names: ``pattern`` (or random values) plus seeded noise."""
    from peft import get_peft_model, get_peft_model_state_dict

    sd = get_peft_model_state_dict(get_peft_model(tiny_llama(), lora_config(r)))
    gen = torch.Generator().manual_seed(seed)
    if pattern is None:
        return {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in sd.items()}
    return {k: pattern[k] + noise * torch.randn(v.shape, generator=gen) * pattern[k].std() for k, v in sd.items()}


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------ flatten / unflatten


def test_flatten_unflatten_round_trip_is_exact():
    sd = {"b.lora_B.weight": torch.randn(5, 2), "a.lora_A.weight": torch.randn(2, 7), "head.bias": torch.randn(3),
          "scalar": torch.randn(())}
    layout = AdapterLayout.from_state_dict(sd)
    vector = layout.flatten(sd)
    assert vector.shape == (layout.length,) == (10 + 14 + 3 + 1,)
    padded = torch.cat([vector, torch.full((9,), 7.0, dtype=vector.dtype)])  # padding beyond length is dropped
    for v in (vector, padded):
        back = layout.unflatten(v)
        assert list(back) == list(layout.keys)
        for k in sd:
            assert torch.equal(back[k], sd[k]), k


def test_normalize_denormalize_round_trip():
    sd = saved_keys_state_dict(seed=3)
    sd[next(iter(sd))] = torch.zeros_like(next(iter(sd.values())))  # an all-zero tensor (std floored, no NaN)
    layout = AdapterLayout.from_state_dict(sd)
    vector, mean, std = normalize_adapter(layout, sd)
    assert torch.isfinite(vector).all()
    # each non-constant tensor is z-scored with its own statistics (unbiased std, as torch.std / the official code)
    pieces = torch.split(vector, layout.numels)
    for key, piece in zip(layout.keys, pieces):
        if sd[key].std() > 0:
            assert abs(piece.mean().item()) < 1e-9 and abs(piece.std().item() - 1) < 1e-9, key
    back = denormalize_adapter(layout, vector, mean, std)
    for k in sd:
        # float64 arithmetic, then one rounding to float32: at most one float32 ulp (2**-23 relative) off
        torch.testing.assert_close(back[k], sd[k], rtol=2.0**-23, atol=1e-12)


def test_shape_mismatch_within_a_task_names_the_key_and_checkpoint():
    ok = saved_keys_state_dict(r=2, seed=0)
    other_rank = saved_keys_state_dict(r=4, seed=1)
    with pytest.raises(ValueError) as exc:
        train_lora_cvae({"t": [ok, other_rank]}, {"t": torch.ones(3)}, IcmLoraConfig(epochs=1, **TINY))
    message = one_line(exc)
    assert "task 't', checkpoint 1" in message and "lora_A.weight has shape (4, 64)" in message
    assert "(2, 64)" in message and "checkpoint 0" in message


def test_layout_mismatch_between_tasks_is_refused():
    a, b = saved_keys_state_dict(r=2), saved_keys_state_dict(r=2)
    b.pop(next(iter(b)))
    with pytest.raises(ValueError) as exc:
        train_lora_cvae({"a": [a], "b": [b]}, {"a": torch.ones(3), "b": torch.zeros(3)},
                        IcmLoraConfig(epochs=1, **TINY))
    assert "task 'b', checkpoint 0: keys differ" in one_line(exc)


# ------------------------------------------------------------------------------------------------------- the CVAE


def test_cvae_shapes_and_the_condition_reaches_encoder_and_decoder():
    torch.manual_seed(0)
    cvae = LoraCVAE(IcmLoraConfig(input_length=100, condition_dim=3, **TINY)).eval()
    assert cvae.padded_length == 128 and cvae.last_length == 32
    x, z = torch.randn(2, 100), torch.randn(2, 8)
    c1, c2 = torch.zeros(2, 3), torch.tensor([[1.0, -2.0, 0.5]] * 2)
    assert cvae.decode(z, c1).shape == (2, 128)
    assert torch.equal(cvae.decode(z, c1), cvae.decode(z, c1.clone()))
    assert not torch.allclose(cvae.decode(z, c1), cvae.decode(z, c2), atol=1e-4)
    assert not torch.allclose(cvae.encode(x, c1)[0], cvae.encode(x, c2)[0], atol=1e-4)
    out = cvae.train()(x, c1)
    assert out["loss"].item() == pytest.approx(out["recon_loss"].item() + 0.005 * out["kld_loss"].item(), rel=1e-6)


def test_official_pairwise_mse_compares_every_pair():
    torch.manual_seed(0)
    cvae = LoraCVAE(IcmLoraConfig(input_length=128, condition_dim=2, kld_weight=0.0, pairwise_mse=True, **TINY))
    cvae.eval()  # BatchNorm off, so two calls decode the same reconstruction for a fixed seed
    x, c = torch.randn(2, 128), torch.randn(2, 2)
    torch.manual_seed(1)
    loss = cvae(x, c)["loss"]
    torch.manual_seed(1)
    mu, log_var = cvae.encode(x, c)
    recon = cvae.decode(mu + torch.randn_like(mu) * torch.exp(0.5 * log_var), c)
    # the official [B, L] vs [B, 1, L] broadcast: the mean over all (target i, reconstruction j) pairs
    pairs = torch.stack([((recon[j] - x[i]) ** 2).mean() for i in range(2) for j in range(2)]).mean()
    assert loss.item() == pytest.approx(pairs.item(), rel=1e-5)
    assert loss.item() != pytest.approx(torch.nn.functional.mse_loss(recon, x).item(), rel=1e-3)


@pytest.fixture(scope="module")
def two_task_generator():
    """A CVAE trained on two tasks whose LoRAs are opposite patterns (3 noisy checkpoints each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is faster than two contended ones
    pattern = saved_keys_state_dict(seed=11)
    tasks = {
        "up": [saved_keys_state_dict(seed=i, pattern=pattern) for i in range(3)],
        "down": [saved_keys_state_dict(seed=10 + i, pattern={k: -v for k, v in pattern.items()}) for i in range(3)],
    }
    conditions = {"up": torch.tensor([1.0, 0.0, 0.0]), "down": torch.tensor([0.0, 1.0, 0.0])}
    generator = train_lora_cvae(tasks, conditions, IcmLoraConfig(epochs=60, **TINY), peft_config=lora_config())
    torch.set_num_threads(threads)
    return generator, tasks


def _flat(sd):
    return torch.cat([sd[k].reshape(-1) for k in sorted(sd)])


def test_generation_follows_the_condition(two_task_generator):
    generator, tasks = two_task_generator
    assert generator.history[-1]["recon_loss"] < 0.5 * generator.history[0]["recon_loss"]
    means = {t: _flat({k: torch.stack([c[k] for c in cks]).mean(0) for k in cks[0]}) for t, cks in tasks.items()}
    for task in ("up", "down"):
        other = "down" if task == "up" else "up"
        # z = 0 (the prior mean): only the condition tells the tasks apart. Draws z ~ N(0, I) are not asserted: with
        # the official KL weight 0.005 the latent also carries the task, so a draw can land on the other task.
        sample = _flat(generator.generate(task=task, latent="zero")[0])
        own = torch.nn.functional.cosine_similarity(sample, means[task], dim=0).item()
        cross = torch.nn.functional.cosine_similarity(sample, means[other], dim=0).item()
        # the two tasks' adapters are opposite (cos -1); a generator ignoring c would give both tasks one adapter
        assert own > 0.6 and cross < -0.6, (task, own, cross)
    assert generator.nearest_task(torch.tensor([0.9, 0.1, 0.0])) == "up"


def test_generated_folder_loads_in_peft_with_the_right_shapes(two_task_generator, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    generator, tasks = two_task_generator
    sample = generator.generate(task="up", seed=3)[0]
    folder = generator.save_adapter(sample, tmp_path / "gen")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(tiny_llama(), str(folder))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(tasks["up"][0])
    for k, v in loaded.items():
        assert v.shape == tasks["up"][0][k].shape and torch.equal(v, sample[k]), k
    out = model(torch.randint(0, 128, (1, 6))).logits
    with model.disable_adapter():
        assert not torch.allclose(out, model(torch.randint(0, 128, (1, 6))).logits)
    # the folder is replaced whole on a second save
    generator.save_adapter(generator.generate(task="down")[0], folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]


def test_generator_save_load_round_trip(two_task_generator, tmp_path):
    generator, _ = two_task_generator
    generator.save(tmp_path / "g")
    again = IcmLoraGenerator.load(tmp_path / "g")
    first, second = generator.generate(task="down", seed=5)[0], again.generate(task="down", seed=5)[0]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_from_folders_keeps_their_lora_config(tmp_path):
    folders = []
    for i in range(2):
        folders.append(save_lora_folder(saved_keys_state_dict(seed=i), lora_config(), tmp_path / f"ckpt{i}"))
    generator = train_lora_cvae({"t": folders}, {"t": torch.ones(2)}, IcmLoraConfig(epochs=1, **TINY))
    assert generator.peft_config["r"] == 2 and sorted(generator.peft_config["target_modules"]) == TARGETS
    last = saved_keys_state_dict(seed=1)  # stats="last": de-normalised with the last checkpoint's statistics
    assert torch.allclose(generator.stats["t"][0], torch.stack([last[k].double().mean() for k in sorted(last)]))


def test_task_condition_pools_the_last_real_token_under_padding():
    from peft_ext.generation import task_condition
    from peft_ext.trainers._tiny import char_tokenizer

    model, tok = tiny_llama(), char_tokenizer()
    prompts = ["a short one", "a much longer prompt than that"]
    batched = task_condition(model, tok, prompts, pooling="last", batch_size=2)  # right padding inside the batch
    alone = torch.stack([task_condition(model, tok, [p], pooling="last", batch_size=1) for p in prompts]).mean(0)
    # a causal model's last real token does not see the padding after it: equal up to float32 summation order
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    ids = tok(prompts[1], return_tensors="pt")
    last_layer = model(**ids, output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(task_condition(model, tok, prompts[1:], pooling="cls"), last_layer[0])
    torch.testing.assert_close(task_condition(model, tok, prompts[1:], pooling="mean"), last_layer.mean(0))
    assert batched.shape == (64,) and not torch.allclose(batched, task_condition(model, tok, prompts, pooling="cls"))
    with pytest.raises(ValueError, match="pooling must be one of") as exc:
        task_condition(model, tok, prompts, pooling="max")
    one_line(exc)
    with pytest.raises(ValueError, match="layer must be in \\[-3, 2\\]") as exc:
        task_condition(model, tok, prompts, layer=7)
    one_line(exc)
    with pytest.raises(ValueError, match="prompts must be a non-empty list of strings"):
        task_condition(model, tok, "not a list")


# ---------------------------------------------------------------------------------------------------- ICM-Fusion


def test_fusion_of_one_task_is_that_tasks_generation(two_task_generator):
    generator, _ = two_task_generator
    fused, single = icm_fusion(generator, ["down"], seed=7)[0], generator.generate(task="down", seed=7)[0]
    assert all(torch.equal(fused[k], single[k]) for k in single)


def test_fuse_conditions():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    assert torch.equal(fuse_conditions([a]), a) and torch.equal(fuse_conditions([b], mode="normalized_sum"), b)
    assert torch.allclose(fuse_conditions([a, b], weights=[3, 1]), torch.tensor([1.5, 1.0]))
    fused = fuse_conditions([a, b], mode="normalized_sum")  # direction of a/|a| + b/|b|, norm = mean norm 3
    assert torch.allclose(fused, torch.tensor([1.0, 1.0]) / 2**0.5 * 3.0)


def test_fused_adapter_lies_between_the_tasks(two_task_generator):
    generator, _ = two_task_generator
    up, down = (_flat(generator.generate(task=t, latent="zero")[0]) for t in ("up", "down"))
    fused = _flat(icm_fusion(generator, ["up", "down"], weights=[3, 1], latent="zero")[0])
    # weighted 3:1 toward "up": the fused adapter must be nearer the up adapter than the down one
    assert (fused - up).norm() < (fused - down).norm()


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=()), "IcmLoraConfig.channels must be a non-empty list"),
        (dict(kernel_size=4), "IcmLoraConfig.kernel_size must be odd"),
        (dict(channels=(4, 4, 4), divide_slice_length=12), "divide_slice_length must be a multiple of 2\\*\\*len"),
        (dict(epochs=0), "IcmLoraConfig.epochs must be an integer >= 1"),
        (dict(learning_rate=float("nan")), "IcmLoraConfig.learning_rate must be a finite number > 0"),
        (dict(stats="first"), "IcmLoraConfig.stats must be one of"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match) as exc:
        IcmLoraConfig(**kwargs)
    one_line(exc)


def test_bad_training_input(tmp_path):
    sd, cfg = saved_keys_state_dict(), IcmLoraConfig(epochs=1, **TINY)
    inf = {**sd, next(iter(sd)): torch.full_like(next(iter(sd.values())), float("inf"))}
    cases = [
        (({}, {}), "task_adapters must be a non-empty dict"),
        (({"t": [sd]}, {"u": torch.ones(2)}), "conditions must have exactly the tasks"),
        (({"t": []}, {"t": torch.ones(2)}), "task 't' needs a non-empty list"),
        (({"t": sd}, {"t": torch.ones(2)}), "task 't' needs a non-empty list"),
        (({"t": [sd]}, {"t": torch.tensor([1.0, float("nan")])}), "condition of task 't' must be a finite 1-D"),
        (({"t": [sd], "u": [sd]}, {"t": torch.ones(2), "u": torch.ones(3)}), "all conditions must have one size"),
        (({"t": [inf]}, {"t": torch.ones(2)}), "holds NaN or inf"),
        (({"t": [str(tmp_path)]}, {"t": torch.ones(2)}), "is not an adapter folder"),
        (({"t": [42]}, {"t": torch.ones(2)}), "expected an adapter folder or a state dict"),
    ]
    for (adapters, conditions), match in cases:
        with pytest.raises(ValueError, match=match) as exc:
            train_lora_cvae(adapters, conditions, cfg)
        one_line(exc)
    with pytest.raises(ValueError, match="config.condition_dim is 5 but the data gives 2") as exc:
        train_lora_cvae({"t": [sd]}, {"t": torch.ones(2)}, IcmLoraConfig(epochs=1, condition_dim=5, **TINY))
    one_line(exc)


def test_non_lora_adapter_folder_is_refused(tmp_path):
    folder = save_lora_folder(saved_keys_state_dict(), lora_config(), tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "DYLORA"}))
    with pytest.raises(ValueError, match="peft_type 'DYLORA' \\(export it to LoRA first") as exc:
        train_lora_cvae({"t": [folder]}, {"t": torch.ones(2)}, IcmLoraConfig(epochs=1, **TINY))
    one_line(exc)
    with pytest.raises(ValueError, match="save_lora_folder: peft_config is required"):
        save_lora_folder(saved_keys_state_dict(), None, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bad_generation_input(two_task_generator):
    generator, _ = two_task_generator
    cases = [
        (dict(task="sideways"), "unknown task 'sideways'; known: \\['up', 'down'\\]"),
        (dict(), "pass exactly one of task= or condition="),
        (dict(task="up", condition=torch.ones(3)), "pass exactly one of task= or condition="),
        (dict(condition=torch.ones(4)), "condition must be a finite vector of size 3"),
        (dict(task="up", latent="max"), "latent must be one of"),
        (dict(task="up", num_samples=0), "num_samples must be an integer >= 1"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match) as exc:
            generator.generate(**kwargs)
        one_line(exc)
    with pytest.raises(ValueError, match="weights must be 2 finite numbers >= 0") as exc:
        icm_fusion(generator, ["up", "down"], weights=[1, -1])
    one_line(exc)
    with pytest.raises(ValueError, match="fuse_conditions: mode must be one of") as exc:
        icm_fusion(generator, ["up", "down"], fuse="max")
    one_line(exc)
    with pytest.raises(ValueError, match="keys differ") as exc:
        generator.save_adapter({"x": torch.ones(2)}, "/nonexistent/never-written")
    one_line(exc)
