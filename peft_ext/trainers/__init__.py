"""Training recipes as TRL trainer subclasses.

* ``MrDPOTrainer`` / ``MrDPOConfig``: multi-round DPO with adapter merge-and-reinit and rebirth SFT (video-SALMONN 2,
  https://arxiv.org/abs/2506.15220), on TRL's ``DPOTrainer``.
* ``GazalGRPOTrainer`` / ``GazalGRPOConfig`` / ``GazalSFTConfig`` / ``sft_then_grpo``: SFT with the DoRA + rsLoRA
  preset, then GRPO continuing the same adapter (Gazal-R1, https://arxiv.org/abs/2506.21594), on TRL's
  ``SFTTrainer`` and ``GRPOTrainer``.
* ``MTPModel`` / ``MTPConfig`` / ``mtp_generate``: multi-token prediction with gated LoRA at ``<mask>`` positions and
  speculative decoding identical to greedy ``generate()`` (*Your LLM Knows the Future*).
* ``PlannerConfig`` / ``PlannerActionPipeline`` / ``train_planner_recipe``: Octo-planner, one adapter per function
  domain merged into a planner, plus an action adapter (``peft_ext/trainers/planner.py``).
* ``LoRIDConfig`` / ``consistency_loop`` / ``train_lorid_recipe``: LoRID's three interacting adapters (intuitive
  reasoner, knowledge generator, deep reasoner) with the consistency loop (``peft_ext/trainers/lorid.py``).
* ``train_recipe``: the ``trainer:`` section of a ``peft-ext train`` recipe (``peft_ext/trainers/run.py``).

TRL is imported when this package is imported; ``import peft_ext`` alone does not import it.
"""

from .gazal import GazalGRPOConfig, GazalGRPOTrainer, GazalSFTConfig, sft_then_grpo
from .lorid import LoRIDConfig, consistency_loop, train_lorid_recipe
from .mrdpo import MrDPOConfig, MrDPOTrainer
from .mtp import MTPConfig, MTPModel, mtp_generate, train_mtp, train_mtp_recipe
from .planner import PlannerActionPipeline, PlannerConfig, train_planner_recipe

__all__ = [
    "GazalGRPOConfig",
    "GazalGRPOTrainer",
    "GazalSFTConfig",
    "LoRIDConfig",
    "MTPConfig",
    "MTPModel",
    "MrDPOConfig",
    "MrDPOTrainer",
    "PlannerActionPipeline",
    "PlannerConfig",
    "consistency_loop",
    "mtp_generate",
    "sft_then_grpo",
    "train_mtp",
    "train_lorid_recipe",
    "train_mtp_recipe",
    "train_planner_recipe",
]
