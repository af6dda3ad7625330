"""Training recipes as TRL trainer subclasses.

* ``MrDPOTrainer`` / ``MrDPOConfig``: multi-round DPO with adapter merge-and-reinit and rebirth SFT (video-SALMONN 2,
  https://arxiv.org/abs/2506.15220), on TRL's ``DPOTrainer``.
* ``GazalGRPOTrainer`` / ``GazalGRPOConfig`` / ``GazalSFTConfig`` / ``sft_then_grpo``: SFT with the DoRA + rsLoRA
  preset, then GRPO continuing the same adapter (Gazal-R1, https://arxiv.org/abs/2506.21594), on TRL's
  ``SFTTrainer`` and ``GRPOTrainer``.
* ``train_recipe``: the ``trainer:`` section of a ``peft-ext train`` recipe (``peft_ext/trainers/run.py``).

TRL is imported when this package is imported; ``import peft_ext`` alone does not import it.
"""

from .gazal import GazalGRPOConfig, GazalGRPOTrainer, GazalSFTConfig, sft_then_grpo
from .mrdpo import MrDPOConfig, MrDPOTrainer

__all__ = ["GazalGRPOConfig", "GazalGRPOTrainer", "GazalSFTConfig", "MrDPOConfig", "MrDPOTrainer", "sft_then_grpo"]
