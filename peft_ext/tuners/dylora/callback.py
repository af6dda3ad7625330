"""DyLoRA rank sampling: a new rank b ~ U{1..r} for every optimizer step, the same for every layer.

Paper: *DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation*
(https://arxiv.org/abs/2210.07558). Official code: https://github.com/huawei-noah/Efficient-NLP
(``DyLoRA/examples/NLU/examples/text-classification/run_glue.py`` samples the rank before each step).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback

from .model import max_rank, set_rank


class DyLoraRankSampler(TrainerCallback):
    """Samples the DyLoRA training rank each optimizer step.

    With ``transformers.Trainer``: ``Trainer(..., callbacks=[DyLoraRankSampler(seed=0)])``. In a hand-written loop:
    ``sampler = DyLoraRankSampler(model)`` and ``sampler.step()`` before each optimizer step. Evaluation
    (``model.eval()``)
    always uses the evaluation rank set with ``set_rank`` (default r), never the sampled one.

    Args:
        model: the model holding DyLoRA layers; taken from the Trainer when omitted.
        seed: seed of the rank sequence. The rank of optimizer step k is a function of (seed, k) alone, drawn from a
            local generator (the global RNG is left alone), so a run resumed from a checkpoint samples exactly the
            ranks the uninterrupted run would have.
        adapter_name: the DyLoRA adapter to sample for (default: the active adapters).
        min_rank: the smallest rank sampled (default 1, the paper's setting)."""

    def __init__(
        self, model: Optional[nn.Module] = None, seed: int = 0, adapter_name: Optional[str] = None, min_rank: int = 1
    ):
        if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
            raise ValueError(f"DyLoraRankSampler.min_rank must be an integer >= 1; got {min_rank!r}.")
        self.model = model
        self.adapter_name = adapter_name
        self.min_rank = min_rank
        self.seed = seed
        self.num_steps = 0  # optimizer steps taken through step() in a hand-written loop
        self.last_rank: Optional[int] = None

    def sample(self, step: int) -> int:
        """The rank of optimizer step ``step``: uniform on ``min_rank..r``, a function of (seed, step) only."""
        r = max_rank(self.model, self.adapter_name)
        if self.min_rank > r:
            raise ValueError(f"DyLoraRankSampler.min_rank={self.min_rank} exceeds the adapter rank r={r}.")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return int(torch.randint(self.min_rank, r + 1, (1,), generator=generator).item())

    def step(self, global_step: Optional[int] = None) -> int:
        """Set the rank of the next optimizer step on every DyLoRA layer and return it.

        ``global_step`` is the index of that step (the Trainer passes its own); by default a counter of the calls."""
        if self.model is None:
            raise ValueError("DyLoraRankSampler.step() needs the model: pass it to the constructor.")
        if global_step is None:
            global_step = self.num_steps
        self.num_steps = global_step + 1
        self.last_rank = self.sample(global_step)
        set_rank(self.model, self.last_rank, self.adapter_name, training_only=True)
        return self.last_rank

    def clear(self) -> None:
        """Forget the sampled rank, so training mode uses the evaluation rank again."""
        if self.model is not None:
            set_rank(self.model, None, self.adapter_name, training_only=True)
        self.last_rank = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.model is None:
            self.model = model

    def on_step_begin(self, args, state, control, **kwargs):
        self.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.clear()
