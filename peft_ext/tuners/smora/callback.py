"""SMoRA balancing-bias updates: once per optimizer step, raise the bias of under-loaded rank experts and lower that
of over-loaded ones.

Paper: *Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-Task Learning*
(https://arxiv.org/abs/2501.15103). No public code; the rule follows DeepSeek-V3's auxiliary-loss-free balancing
(``b_i ← b_i + u·sign(mean load − load_i)``), the form the secondary sources describe (UNCERTAIN).
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from transformers import TrainerCallback

from .model import update_smora_bias


class SmoraBiasCallback(TrainerCallback):
    """Updates the SMoRA selection bias after every optimizer step.

    Each SMoRA layer accumulates, in training mode, how often each rank expert was selected since the last update (all
    micro-batches of a gradient-accumulation step count). After the optimizer step this applies
    ``b_i ← b_i + u·sign(mean load − load_i)`` per layer and adapter and resets the counts. Under
    ``torch.distributed`` (DDP, ``torchrun``, ``accelerate launch``) the counts of all processes are summed by one
    all-reduce before the update, so every rank applies the same update from the global load and the bias buffers stay
    identical; ``step()`` is then a collective: call it on every rank at the same step (the Trainer does).

    With ``transformers.Trainer``: ``Trainer(..., callbacks=[SmoraBiasCallback()])``. In a hand-written loop:
    ``cb = SmoraBiasCallback(model)`` and ``cb.step()`` after each ``optimizer.step()``.

    Args:
        model: the model holding SMoRA layers; taken from the Trainer when omitted.
        seed: unused (the rule is deterministic); accepted so every method callback is built as ``cls(model, seed)``.
        adapter_name: only update this adapter (default: every adapter that was trained).
        rate: ``u``; default each adapter's ``SmoraConfig.bias_update_rate``."""

    def __init__(
        self, model: Optional[nn.Module] = None, seed: int = 0, adapter_name: Optional[str] = None,
        rate: Optional[float] = None,
    ):
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0):
            raise ValueError(f"SmoraBiasCallback.rate must be a number >= 0 or None; got {rate!r}.")
        self.model = model
        self.seed = seed
        self.adapter_name = adapter_name
        self.rate = rate
        self.num_updates = 0
        self.last_load: dict = {}

    def step(self, *args, **kwargs) -> dict:
        """Apply one bias update from the load accumulated since the previous one; returns ``{layer: load}``.

        Extra arguments (``optimizer``, ``global_step``) are accepted and ignored, so the callback fits loops that
        call ``step(model, optimizer, global_step)``."""
        if self.model is None:
            raise ValueError("SmoraBiasCallback.step() needs the model: pass it to the constructor.")
        self.last_load = update_smora_bias(self.model, self.adapter_name, self.rate)
        self.num_updates += 1
        return self.last_load

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.model is None:
            self.model = model

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.model is None:
            self.model = model
        self.step()
