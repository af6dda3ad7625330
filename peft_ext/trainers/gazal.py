"""Two-stage SFT (DoRA + rsLoRA) → GRPO on the same adapter (Gazal-R1), on TRL's ``SFTTrainer`` and ``GRPOTrainer``.

Paper: *Gazal-R1: Achieving State-of-the-Art Medical Reasoning with Parameter-Efficient Two-Stage Training*
(https://arxiv.org/abs/2506.21594; no public code). Stage 1 fine-tunes with DoRA + rsLoRA
(``peft_ext.presets.dora_rslora_preset``); stage 2 runs GRPO with a multi-component reward (accuracy, format, length,
repetition: ``peft_ext.rewards``; the exact terms and weights are UNCERTAIN) and continues the *same* adapter: the
SFT ``PeftModel`` goes into ``GRPOTrainer`` as it is, and with ``beta > 0`` TRL copies its adapter into a frozen
``ref`` adapter, so the KL term is measured against the SFT model. Any peft-ext tuner works as the adapter too.

Every TRL default that has drifted between TRL versions (``beta``: 0.04 → 0.0 in TRL 1.x, ``loss_type``: "grpo" →
"bnpo" → "dapo", ``scale_rewards``, ``num_generations``, ``max_completion_length``, ``temperature``, TRL's base
config turning gradient checkpointing on, and ``bf16`` on even on CPUs without native bf16, ...) is re-declared in
``GazalGRPOConfig`` / ``GazalSFTConfig`` with an explicit value, so a TRL upgrade cannot change the recipe silently.
``PINNED_GRPO`` / ``PINNED_SFT`` list them.
"""

from __future__ import annotations

import copy
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from trl import GRPOConfig, GRPOTrainer, SFTConfig

from ._precision import BF16_HELP, default_bf16

PAPER_URL = "https://arxiv.org/abs/2506.21594"
CODE_URL = ""
DEFAULT_REWARDS = ["accuracy", "format", "cosine_length", "repetition"]
DEFAULT_REWARD_WEIGHTS = [1.0, 0.5, 0.5, 0.5]


@dataclass
class GazalSFTConfig(SFTConfig):
    """``SFTConfig`` of stage 1 with the fields whose TRL default has moved between versions pinned explicitly."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of the SFT stage."})
    max_length: Optional[int] = field(default=1024, metadata={"help": "Truncate each example to this many tokens."})
    packing: bool = field(default=False, metadata={"help": "Pack several examples into one sequence (off)."})
    completion_only_loss: Optional[bool] = field(
        default=True, metadata={"help": "Loss on the completion only for prompt/completion data (TRL: None = auto)."}
    )
    assistant_only_loss: bool = field(default=False, metadata={"help": "Loss on assistant turns only (chat data)."})
    loss_type: str = field(default="nll", metadata={"help": "SFT loss: 'nll' (token-mean cross-entropy)."})
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the dataset once before training."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (TRL's base config: on)."}
    )
    bf16: Optional[bool] = field(default=None, metadata={"help": BF16_HELP})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = default_bf16(self.use_cpu)
        super().__post_init__()


@dataclass
class GazalGRPOConfig(GRPOConfig):
    """``GRPOConfig`` of stage 2 with every drifted TRL default pinned, plus the named rewards and their weights."""

    rewards: list = field(
        default_factory=lambda: list(DEFAULT_REWARDS),
        metadata={"help": "Names of peft_ext.rewards.REWARDS to use when no reward_funcs are passed to the trainer."},
    )
    reward_weights: Optional[list] = field(
        default_factory=lambda: list(DEFAULT_REWARD_WEIGHTS),
        metadata={"help": "Weight of each reward (same order), summed before group normalisation. UNCERTAIN for "
                  "Gazal-R1: accuracy 1.0, the shaping terms 0.5."},
    )
    beta: float = field(
        default=0.04,
        metadata={"help": "KL coefficient to the reference (the SFT adapter, copied by TRL). TRL < 0.19: 0.04; "
                  "TRL 1.x: 0.0 (no reference)."},
    )
    num_generations: Optional[int] = field(default=8, metadata={"help": "Completions sampled per prompt (a group)."})
    loss_type: str = field(
        default="grpo",
        metadata={"help": "'grpo': each sequence's token-mean, as in DeepSeekMath's GRPO (TRL 1.x default: 'dapo')."},
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "Divide advantages by the group's reward std ('group'), 'batch' or 'none'."}
    )
    epsilon: float = field(default=0.2, metadata={"help": "Clipping range of the importance ratio."})
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes per generated batch (μ)."})
    max_completion_length: Optional[int] = field(default=256, metadata={"help": "Token budget of each completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the completions."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0 = off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Generation repetition penalty (1.0 = off)."})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Leave completions cut at max_completion_length out of the loss."}
    )
    importance_sampling_level: str = field(default="token", metadata={"help": "'token' (GRPO) or 'sequence' (GSPO)."})
    multi_objective_aggregation: str = field(
        default="sum_then_normalize", metadata={"help": "Weighted sum of the rewards, then group normalisation."}
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of the GRPO stage."})
    disable_dropout: bool = field(default=False, metadata={"help": "Disable dropout in the policy."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (TRL's base config: on)."}
    )
    log_completions: bool = field(default=False, metadata={"help": "Print sampled completions at each log step."})
    bf16: Optional[bool] = field(default=None, metadata={"help": BF16_HELP})

    def __post_init__(self):
        from ..rewards import REWARDS

        if not self.rewards or any(r not in REWARDS for r in self.rewards):
            raise ValueError(f"GazalGRPOConfig.rewards must be a non-empty list of {sorted(REWARDS)}; got "
                             f"{self.rewards!r}.")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"GazalGRPOConfig.reward_weights needs one weight per reward ({len(self.rewards)}: "
                             f"{self.rewards}); got {self.reward_weights!r}.")
        if self.bf16 is None:
            self.bf16 = default_bf16(self.use_cpu)
        super().__post_init__()


PINNED_SFT = ("learning_rate", "max_length", "packing", "completion_only_loss", "assistant_only_loss", "loss_type",
              "shuffle_dataset", "gradient_checkpointing", "bf16")
PINNED_GRPO = ("beta", "num_generations", "loss_type", "scale_rewards", "epsilon", "num_iterations",
               "max_completion_length", "temperature", "top_p", "top_k", "repetition_penalty",
               "mask_truncated_completions", "importance_sampling_level", "multi_objective_aggregation",
               "learning_rate", "disable_dropout", "shuffle_dataset", "gradient_checkpointing", "log_completions",
               "bf16")


class GazalGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` for stage 2 of Gazal-R1: the rewards of ``args.rewards`` (``peft_ext.rewards``) unless
    ``reward_funcs`` are given; a ``PeftModel`` from stage 1 continues its adapter (reference = a frozen copy)."""

    _tag_names = ["trl", "grpo", "gazal-r1", "peft-ext"]
    _name = "Gazal-R1 GRPO"
    _paper = {
        "title": "Gazal-R1: Achieving State-of-the-Art Medical Reasoning with Parameter-Efficient Two-Stage Training",
        "id": "2506.21594",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{adly2025gazal,
                title   = {{Gazal-R1: Achieving State-of-the-Art Medical Reasoning with Parameter-Efficient
                            Two-Stage Training}},
                author  = {Ahmed M. Adly and Mostafa Samy and Amr Fawzy},
                year    = 2025,
                journal = {arXiv preprint arXiv:2506.21594},
            }"""),
    }

    def __init__(self, model, args: GazalGRPOConfig, train_dataset, processing_class, reward_funcs=None, **kwargs):
        from ..rewards import get_reward_funcs

        if not isinstance(args, GazalGRPOConfig):
            raise TypeError(f"GazalGRPOTrainer needs args=GazalGRPOConfig(...); got {type(args).__name__}.")
        if reward_funcs is None:
            reward_funcs = get_reward_funcs(args.rewards)
        if isinstance(reward_funcs, (list, tuple)) and not reward_funcs:
            raise ValueError("GazalGRPOTrainer needs at least one reward function (see peft_ext.rewards).")
        if args.reward_weights is not None and len(args.reward_weights) != len(list(reward_funcs)):
            raise ValueError(f"GazalGRPOConfig.reward_weights has {len(args.reward_weights)} weights for "
                             f"{len(list(reward_funcs))} reward functions.")
        super().__init__(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=train_dataset,
                         processing_class=processing_class, **kwargs)


def continue_adapter(base, adapter_dir):
    """Stage 1's saved adapter on ``base``, trainable, for stage 2 (resume from the ``grpo`` stage)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)


def sft_then_grpo(model, processing_class, sft_dataset, grpo_dataset, peft_config, sft_args: SFTConfig,
                  grpo_args: GazalGRPOConfig, reward_funcs: Optional[Sequence[Callable]] = None,
                  stage_dir: Optional[str] = None, resume_stage: Optional[str] = None,
                  on_stage_end: Optional[Callable] = None):
    """Stage 1 ``SFTTrainer(peft_config=...)``, then ``GazalGRPOTrainer`` on the same ``PeftModel``; returns it
    (its ``ref`` adapter removed).

    ``stage_dir`` saves the adapter after each stage (``<stage_dir>/sft``, ``<stage_dir>/grpo``);
    ``resume_stage="grpo"`` skips stage 1 and continues the adapter saved in ``<stage_dir>/sft`` (``model`` is then the
    base model again). ``on_stage_end(stage, model, trainer)`` runs after each stage (e.g. to evaluate; after GRPO it
    runs while the frozen ``ref`` adapter, stage 1's copy, is still there).
    """
    from trl import SFTTrainer

    from ..runner import save_adapter

    if resume_stage not in (None, "sft", "grpo"):
        raise ValueError(f"sft_then_grpo: resume_stage must be None, 'sft' or 'grpo'; got {resume_stage!r}.")
    if resume_stage == "grpo":
        if stage_dir is None or not (Path(stage_dir) / "sft" / "adapter_config.json").is_file():
            raise ValueError(f"sft_then_grpo: cannot resume from the grpo stage: no SFT adapter in {stage_dir}/sft.")
        policy = continue_adapter(model, Path(stage_dir) / "sft")
    else:
        sft = SFTTrainer(model=model, args=sft_args, train_dataset=sft_dataset, processing_class=processing_class,
                         peft_config=copy.deepcopy(peft_config))
        sft.train()
        policy = sft.model
        if stage_dir is not None and sft.is_world_process_zero():
            save_adapter(policy, None, Path(stage_dir) / "sft")
        if on_stage_end is not None:
            on_stage_end("sft", policy, sft)
    grpo = GazalGRPOTrainer(model=policy, args=grpo_args, train_dataset=grpo_dataset,
                            processing_class=processing_class, reward_funcs=reward_funcs)
    grpo.train()
    policy = grpo.model
    if on_stage_end is not None:  # before the reference adapter is dropped, so a caller can compare with it
        on_stage_end("grpo", policy, grpo)
    if "ref" in policy.peft_config:
        policy.delete_adapter("ref")
        policy.set_adapter("default")
    if stage_dir is not None and grpo.is_world_process_zero():
        save_adapter(policy, None, Path(stage_dir) / "grpo")
    return policy
