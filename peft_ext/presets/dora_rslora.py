"""DoRA + rsLoRA preset used for Gazal-R1's supervised stage, on upstream ``peft.LoraConfig``.

Paper: *Gazal-R1: Achieving State-of-the-Art Medical Reasoning with Parameter-Efficient Two-Stage Training* —
https://arxiv.org/abs/2506.21594 (no public code; the model is on the Hugging Face Hub). The paper fine-tunes
Qwen3-32B with DoRA (*DoRA: Weight-Decomposed Low-Rank Adaptation*, https://arxiv.org/abs/2402.09353) combined with
rsLoRA (*A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA*, https://arxiv.org/abs/2312.03732), both
implemented upstream (``use_dora=True``, ``use_rslora=True``) and reused here unchanged:

* rsLoRA: ``s = α/√r`` instead of ``α/r`` — α no longer means what it means for plain LoRA;
* DoRA: ``W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_col`` with a trainable magnitude ``m`` initialised to ``‖W‖_col``.

UNCERTAIN: Gazal-R1's rank, α, dropout and target modules are not confirmed from the paper's text; the preset
requires ``r`` and ``lora_alpha`` explicitly and defaults to ``target_modules="all-linear"``. Pitfalls: DoRA costs
~0.83× LoRA's throughput (PEFT's benchmark), and its update is not a pure low-rank addition, so ``save_as_lora`` /
``convert_to_lora`` are only approximations.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from peft import LoraConfig

PAPER_URL = "https://arxiv.org/abs/2506.21594"
CODE_URL = ""


def dora_rslora_preset(r: int, lora_alpha: float, **kwargs: Any) -> LoraConfig:
    """``LoraConfig(use_dora=True, use_rslora=True, target_modules="all-linear", r=r, lora_alpha=lora_alpha)``: the
    adapter of Gazal-R1's SFT stage (https://arxiv.org/abs/2506.21594; no public code).

    ``r`` and ``lora_alpha`` are required because Gazal-R1's values are UNCERTAIN (``configs/gazal_dora_rslora.yaml``
    documents the choice). With rsLoRA the scale is ``lora_alpha/√r``. Every other keyword is a ``LoraConfig`` field
    (e.g. ``target_modules`` to override ``"all-linear"``, ``lora_dropout``).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"dora_rslora_preset.r must be an integer >= 1; got {r!r}.")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise ValueError(f"dora_rslora_preset.lora_alpha must be a number > 0; got {lora_alpha!r}.")
    for fixed in ("use_dora", "use_rslora"):
        if fixed in kwargs and kwargs[fixed] is not True:
            raise ValueError(
                f"dora_rslora_preset always sets {fixed}=True; got {fixed}={kwargs[fixed]!r} (use LoraConfig instead)."
            )
        kwargs.pop(fixed, None)
    allowed = {f.name for f in fields(LoraConfig) if f.init} - {"r", "lora_alpha"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"dora_rslora_preset got unknown argument(s) {unknown}; allowed: r, lora_alpha and the LoraConfig fields."
        )
    kwargs.setdefault("target_modules", "all-linear")
    return LoraConfig(r=r, lora_alpha=lora_alpha, use_dora=True, use_rslora=True, **kwargs)
