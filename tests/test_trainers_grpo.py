"""SFT (DoRA + rsLoRA) → GRPO on the same adapter (Gazal-R1) on a tiny random Llama: every drifted TRL default is
pinned in our configs, GRPO starts from (and is regularised towards) the SFT adapter, a peft-ext tuner works as the
adapter, resuming from the GRPO stage ends identical, and a missing reward is a one-line error."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, tiny_llama
from datasets import Dataset
from trl import GRPOConfig, SFTConfig

from peft_ext.presets import dora_rslora_preset
from peft_ext.registry import get_method
from peft_ext.trainers._tiny import char_tokenizer
from peft_ext.trainers.gazal import (
    PINNED_GRPO,
    PINNED_SFT,
    GazalGRPOConfig,
    GazalGRPOTrainer,
    GazalSFTConfig,
    sft_then_grpo,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread


SFT_DATA = Dataset.from_dict({"prompt": ["Q1+1=", "Q2+2="],
                              "completion": ["<think>1+1</think><answer>2</answer>",
                                             "<think>2+2</think><answer>4</answer>"]})
GRPO_DATA = Dataset.from_dict({"prompt": ["Q1+1=", "Q2+2="], "answer": ["2", "4"]})


def char_sum_reward(completions, **kwargs):
    """A reward that varies within a group, so GRPO's advantages (and its update) are non-zero on a random model."""
    return [float(len(c) + sum(map(ord, c)) % 101) for c in completions]


def configs(tmp_path, **grpo):
    common = dict(report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no", logging_steps=1,
                  max_steps=1, per_device_train_batch_size=2, seed=0)
    sft = GazalSFTConfig(output_dir=str(tmp_path / "sft"), learning_rate=1e-2, **common)
    grpo = GazalGRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=2, max_completion_length=6,
                           learning_rate=1e-2, rewards=["accuracy"], reward_weights=[1.0], **{**common, **grpo})
    return sft, grpo


def adapter_state(model, adapter="default"):
    return {n.replace(f".{adapter}.", "."): p.detach().clone() for n, p in model.named_parameters()
            if f".{adapter}." in n}


def test_drifted_defaults_are_pinned():
    """Each pinned field exists in TRL's config (a rename would be caught) and is declared in our subclass."""
    for ours, theirs, pinned in ((GazalGRPOConfig, GRPOConfig, PINNED_GRPO), (GazalSFTConfig, SFTConfig, PINNED_SFT)):
        trl_fields = theirs.__dataclass_fields__
        for name in pinned:
            assert name in trl_fields, f"{theirs.__name__} has no field {name!r} any more"
            assert name in ours.__dict__["__annotations__"], f"{ours.__name__} does not pin {name!r}"
    args = GazalGRPOConfig(output_dir="x", report_to=[], use_cpu=True)
    assert (args.beta, args.loss_type, args.num_generations, args.scale_rewards, args.gradient_checkpointing) == \
        (0.04, "grpo", 8, "group", False)


def test_bf16_is_off_on_cpu_unless_asked():
    """TRL turns bf16 on when unset; on a CPU without native bf16 that makes every matmul ~10x slower (PyTorch's scalar
    fallback), so peft-ext's configs resolve the unset value to fp32 on CPU; an explicit value is kept."""
    from peft_ext.trainers import MrDPOConfig

    for cls in (GazalSFTConfig, GazalGRPOConfig, MrDPOConfig):
        assert cls(output_dir="x", report_to=[], use_cpu=True).bf16 is False, cls.__name__
    assert GazalSFTConfig(output_dir="x", report_to=[], use_cpu=True, bf16=True).bf16 is True


@pytest.mark.parametrize("adapter", ["dora_rslora", "nola"])
def test_grpo_continues_the_sft_adapter(adapter, tmp_path):
    peft_config = (dora_rslora_preset(r=4, lora_alpha=8) if adapter == "dora_rslora"
                   else make_config(get_method(adapter), ["q_proj", "v_proj"]))
    seen = {}

    def on_stage_end(stage, model, trainer):
        seen[stage] = adapter_state(model)
        if stage == "grpo":
            seen["ref"] = adapter_state(model, "ref")

    sft_args, grpo_args = configs(tmp_path)
    model = sft_then_grpo(tiny_llama(), char_tokenizer(), SFT_DATA, GRPO_DATA, peft_config, sft_args, grpo_args,
                          reward_funcs=[char_sum_reward], stage_dir=str(tmp_path / "stages"),
                          on_stage_end=on_stage_end)
    assert seen["sft"].keys() == seen["ref"].keys() == seen["grpo"].keys() and seen["sft"]
    assert all(torch.equal(seen["sft"][k], seen["ref"][k]) for k in seen["sft"])  # reference = the SFT adapter
    assert any(not torch.equal(seen["sft"][k], seen["grpo"][k]) for k in seen["sft"])  # GRPO trained that adapter
    assert list(model.peft_config) == ["default"]
    assert (tmp_path / "stages" / "sft" / "adapter_config.json").is_file()
    assert (tmp_path / "stages" / "grpo" / "adapter_config.json").is_file()


def test_resume_from_grpo_stage_matches_uninterrupted(tmp_path):
    sft_args, grpo_args = configs(tmp_path)
    full = sft_then_grpo(tiny_llama(), char_tokenizer(), SFT_DATA, GRPO_DATA, dora_rslora_preset(r=4, lora_alpha=8),
                         sft_args, grpo_args, reward_funcs=[char_sum_reward], stage_dir=str(tmp_path / "stages"))
    resumed = sft_then_grpo(tiny_llama(), char_tokenizer(), SFT_DATA, GRPO_DATA, dora_rslora_preset(r=4, lora_alpha=8),
                            sft_args, grpo_args, reward_funcs=[char_sum_reward], stage_dir=str(tmp_path / "stages"),
                            resume_stage="grpo")
    a, b = adapter_state(full), adapter_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_needs_a_reward(tmp_path):
    _, grpo_args = configs(tmp_path)
    with pytest.raises(ValueError, match="needs at least one reward function") as info:
        GazalGRPOTrainer(model=tiny_llama(), args=grpo_args, train_dataset=GRPO_DATA,
                         processing_class=char_tokenizer(), reward_funcs=[])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"rewards must be a non-empty list of \['accuracy'"):
        GazalGRPOConfig(output_dir="x", rewards=[], report_to=[])
    with pytest.raises(ValueError, match="needs one weight per reward"):
        GazalGRPOConfig(output_dir="x", rewards=["accuracy", "format"], reward_weights=[1.0], report_to=[])


def _recipe(tmp_path, out, *overrides):
    from pathlib import Path

    from peft_ext.recipe import load_recipe
    from peft_ext.trainers._tiny import save_tiny_char_model

    model = tmp_path / "char-llama"
    if not model.is_dir():
        save_tiny_char_model(model)
    root = Path(__file__).resolve().parents[1]
    return load_recipe(root / "recipes" / "tiny_sft_grpo.yaml", [f"output_dir={out}", f"model.name={model}",
                                                                 "data.max_length=512", "evaluation.generate=1",
                                                                 "evaluation.baseline=false", *overrides])


def test_sft_grpo_recipe_writes_stages_and_resumes_identically(tmp_path):
    """Per-stage metrics (GRPO: reward per function), and a run resumed after its SFT stage ends identical."""
    import shutil

    from safetensors.torch import load_file

    from peft_ext.trainers.run import train_recipe

    full = tmp_path / "full"
    metrics = train_recipe(_recipe(tmp_path, full), quiet=True)
    assert [r["stage"] for r in metrics["stages"]] == ["sft", "grpo"]
    grpo = metrics["stages"][1]
    assert {"reward", "reward_accuracy_reward", "reward_format_reward", "reward_cosine_length_reward",
            "reward_repetition_penalty_reward", "kl"} <= set(grpo)
    assert set(grpo["eval"]) >= {"accuracy", "format_rate", "mean_length", "repetition"}
    assert (full / "adapter" / "adapter_config.json").is_file() and (full / "results.png").is_file()
    cut = tmp_path / "cut"
    shutil.copytree(full / "stages" / "sft", cut / "stages" / "sft")
    resumed = train_recipe(_recipe(tmp_path, cut), resume=True, quiet=True)
    a = load_file(full / "stages" / "grpo" / "adapter_model.safetensors")
    b = load_file(cut / "stages" / "grpo" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["stages"][-1]["eval"] == metrics["stages"][-1]["eval"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["trainer.name=grpo", "trainer.rewards=[]", "trainer.reward_weights=null"],
         r"trainer 'grpo' needs trainer.rewards: a list from \['accuracy'"),
        (["trainer.rewards=[accuracy, speed]", "trainer.reward_weights=null"], r"trainer.rewards: unknown \['speed'\]"),
        (["trainer.reward_weights=[1.0]"], "trainer.reward_weights must be 4 numbers"),
        (["trainer.sft_steps=0"], "trainer 'sft_grpo' needs trainer.sft_steps >= 1"),
        (["trainer.num_generations=1"], "trainer.num_generations must be an integer >= 2"),
    ],
)
def test_grpo_recipe_errors_one_line(overrides, match, tmp_path):
    from peft_ext.recipe import RecipeError

    with pytest.raises(RecipeError, match=match) as info:
        _recipe(tmp_path, tmp_path / "out", *overrides)
    assert "\n" not in str(info.value)
