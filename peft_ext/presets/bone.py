"""Bone (block affine) as a preset on upstream ``peft.MissConfig``, plus a loader for old Bone checkpoints.

Paper: *Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large Language Models* —
https://arxiv.org/abs/2409.15371 (now titled *DiSHA: Dimension-Sharding Adaptation*). Official code:
https://github.com/JL-er/Bone, which imports ``BoneConfig`` from PEFT: the official implementation *is* the author's
upstream contribution. Upstream PEFT replaced Bone by MiSS (``peft.tuners.miss``) and removed ``BoneConfig``; the
numerics are unchanged, only the names changed (``bone_block`` → ``miss_block``, ``BONE`` → ``MISS``).

Forms (``M`` is the trainable block, zero at init so the model starts as the base model):

* ``"bone"`` (MiSS default, ``init_weights=True``): ``M ∈ R^{r×d_out}``;
  ``y = xWᵀ + (Σ_k x[k·r:(k+1)·r]) M`` with the input zero-padded to a multiple of ``r`` (``ΔW[:, k·r+i] = M[i, :]ᵀ``).
* ``"bat"`` (``init_weights="bat"``): ``M ∈ R^{(d_out/r)×r×r}``; each ``r×r`` block of ``W`` becomes
  ``W_ab + W_ab M_a + M_a``. It reads ``W`` in every forward (a quantized base is dequantised on each call) and its
  unmerge inverts ``I + M``; it needs ``d_in`` and ``d_out`` divisible by ``r``.

The paper's LLaMA2 setting is ``r = 64`` on all seven projections (``configs/bone.yaml``). MiSS's third form
(``"mini"``) is a later addition of MiSS, not part of Bone, and is not offered here (use ``MissConfig`` directly).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import fields
from typing import Any

import torch
from peft import MissConfig, PeftModel

PAPER_URL = "https://arxiv.org/abs/2409.15371"
CODE_URL = "https://github.com/JL-er/Bone"

_MODES = {"bone": True, "bat": "bat"}
# Keys of an adapter_config.json that are bookkeeping of PEFT rather than fields of the method.
_BOOKKEEPING = {"peft_type", "peft_version", "auto_mapping", "revision", "runtime_config"}
_BONE_KEY = re.compile(r"\.bone_block(?=\.|$)")


def bone_preset(mode: str = "bone", **kwargs: Any) -> MissConfig:
    """A Bone adapter (https://arxiv.org/abs/2409.15371; official code https://github.com/JL-er/Bone) as
    ``peft.MissConfig``: ``mode="bone"`` → ``init_weights=True`` (block-sum form), ``mode="bat"`` →
    ``init_weights="bat"`` (block affine transformation). Every other keyword is a ``MissConfig`` field
    (``r`` defaults to 64 upstream, the paper's value)."""
    if mode not in _MODES:
        raise ValueError(f"bone_preset.mode must be one of {sorted(_MODES)}; got {mode!r}.")
    if "init_weights" in kwargs:
        raise ValueError(
            "bone_preset sets MissConfig.init_weights from `mode` ('bone' -> True, 'bat' -> 'bat'); do not pass "
            f"init_weights (got {kwargs['init_weights']!r})."
        )
    if "mini_r" in kwargs:
        raise ValueError("bone_preset: mini_r belongs to MiSS's 'mini' form, which is not Bone; use MissConfig.")
    allowed = {f.name for f in fields(MissConfig) if f.init} - {"init_weights", "mini_r"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"bone_preset got unknown argument(s) {unknown}; allowed: mode and {sorted(allowed)}.")
    r = kwargs.get("r", MissConfig.r)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"bone_preset.r must be an integer >= 1; got {r!r}.")
    return MissConfig(init_weights=_MODES[mode], **kwargs)


def remap_bone_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Bone adapter state dict (``….bone_block``) to MiSS names (``….miss_block``); other keys unchanged.

    Bone: https://arxiv.org/abs/2409.15371; official code https://github.com/JL-er/Bone.
    """
    return {_BONE_KEY.sub(".miss_block", key): value for key, value in state_dict.items()}


def bone_config_to_miss(values: dict[str, Any]) -> MissConfig:
    """Build the ``MissConfig`` equivalent to a saved Bone ``adapter_config.json`` (as a dict).

    Bone: https://arxiv.org/abs/2409.15371; official code https://github.com/JL-er/Bone. Keeps every field MiSS
    shares with Bone (``r``, ``target_modules``, ``init_weights`` True/"bat", ``layers_to_transform``, …), maps
    ``bias="bone_only"`` to ``"miss_only"``, and refuses fields MiSS does not know (with their names)."""
    peft_type = str(values.get("peft_type", ""))
    if peft_type not in ("BONE", "MISS"):
        raise ValueError(f"Not a Bone adapter config: peft_type is {values.get('peft_type')!r}, expected 'BONE'.")
    allowed = {f.name for f in fields(MissConfig) if f.init}
    kept = {k: v for k, v in values.items() if k in allowed and k != "peft_type"}
    unknown = sorted(set(values) - allowed - _BOOKKEEPING)
    if unknown:
        raise ValueError(f"Bone adapter config has field(s) {unknown} that MiSS does not have; cannot convert.")
    if kept.get("init_weights", True) not in (True, False, "bat"):
        raise ValueError(f"Bone init_weights must be True, False or 'bat'; got {kept['init_weights']!r}.")
    if kept.get("bias") == "bone_only":
        kept["bias"] = "miss_only"
    return MissConfig(**kept)


def _read_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st), "safetensors"
    binary = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True), "bin"
    raise ValueError(f"No adapter_model.safetensors or adapter_model.bin in {path!r}.")


def convert_bone_checkpoint(bone_dir: str, output_dir: str) -> MissConfig:
    """Write a MiSS adapter folder equivalent to the Bone adapter in ``bone_dir``; returns its config.

    Bone: https://arxiv.org/abs/2409.15371; official code https://github.com/JL-er/Bone. The result loads with
    ``PeftModel.from_pretrained`` of any PEFT with MiSS (>= 0.17). ``output_dir`` must differ from ``bone_dir``.
    """
    if os.path.abspath(bone_dir) == os.path.abspath(output_dir):
        raise ValueError("convert_bone_checkpoint: output_dir must differ from bone_dir.")
    config_file = os.path.join(bone_dir, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"No adapter_config.json in {bone_dir!r}.")
    with open(config_file, encoding="utf-8") as f:
        config = bone_config_to_miss(json.load(f))
    weights, _ = _read_weights(bone_dir)
    remapped = remap_bone_state_dict(weights)
    if not any(".miss_block" in k for k in remapped):
        raise ValueError(f"{bone_dir!r} holds no bone_block weights; is it a Bone adapter?")
    from safetensors.torch import save

    from .._io import atomic_write

    os.makedirs(output_dir, exist_ok=True)
    payload = save({k: v.contiguous() for k, v in remapped.items()}, metadata={"format": "pt"})
    atomic_write(os.path.join(output_dir, "adapter_model.safetensors"), lambda f: f.write(payload), binary=True)
    config.save_pretrained(output_dir)
    return config


def load_bone_checkpoint(model: torch.nn.Module, bone_dir: str, adapter_name: str = "default", **kwargs: Any):
    """Load a Bone adapter (https://arxiv.org/abs/2409.15371; official code https://github.com/JL-er/Bone) saved by
    an older PEFT into ``model`` as MiSS; returns the ``PeftModel``.

    Converts the folder with :func:`convert_bone_checkpoint` into a temporary MiSS folder and loads it with
    ``PeftModel.from_pretrained(model, …, adapter_name=adapter_name, **kwargs)`` (e.g. ``is_trainable=True``).
    """
    tmp = tempfile.mkdtemp(prefix="peft-ext-bone-")
    try:
        convert_bone_checkpoint(bone_dir, tmp)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
            return PeftModel.from_pretrained(model, tmp, adapter_name=adapter_name, **kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
