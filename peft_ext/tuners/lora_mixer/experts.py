"""Reading PEFT LoRA adapter folders as LoRA-Mixer experts.

Paper: *LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing*
(https://arxiv.org/abs/2507.00029), regime (ii): plug-and-play routing over frozen LoRA modules "sourced from public
repositories". Official code: https://github.com/hustcselwb/LoRA-Mixer (README only).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


@dataclass
class LoraExpert:
    """One PEFT LoRA adapter read from a folder.

    ``modules`` maps a module name relative to the base model (``model.layers.0.self_attn.q_proj``) to
    ``(A [r, in], B [out, r], alpha)``, where ``alpha / r`` is that module's LoRA scale (rsLoRA's ``α/√r`` is stored
    as ``alpha = α·√r``). ``r`` / ``lora_alpha`` are the folder's global values, converted the same way."""

    path: str
    r: int
    lora_alpha: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)


def _pattern_value(pattern: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern look-up: a pattern key equal to ``key`` or to a dotted suffix of it."""
    for pattern_key, value in pattern.items():
        if re.match(rf"(.*\.)?({pattern_key})$", key):
            return value
    return default


def read_lora_expert(path: str) -> LoraExpert:
    """Read one PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Plain LoRA only: DoRA (``use_dora``), LoRA bias (``lora_bias``) and non-LoRA adapters are refused with an error
    naming the folder, since a mixer expert is ``s·B·A`` and nothing else."""
    where = f"LoraMixerConfig.expert_adapters: {path!r}"
    if not os.path.isdir(path):
        raise ValueError(f"{where} is not a folder; each entry must be a saved PEFT LoRA adapter folder.")
    config_file = os.path.join(path, CONFIG_NAME)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(f"{where} has no {CONFIG_NAME}; each entry must be a saved PEFT LoRA adapter folder.")
    if not os.path.isfile(weights_file):
        raise ValueError(
            f"{where} has no {WEIGHTS_NAME}; only safetensors LoRA adapters can be loaded as experts "
            "(re-save a .bin adapter with PeftModel.save_pretrained)."
        )
    with open(config_file, encoding="utf-8") as f:
        cfg = json.load(f)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{where} holds a {peft_type or 'unknown'} adapter; only plain LoRA adapters can be experts.")
    if cfg.get("use_dora"):
        raise ValueError(f"{where} is a DoRA adapter (use_dora=True); only plain LoRA adapters can be experts.")
    if cfg.get("lora_bias"):
        raise ValueError(f"{where} has LoRA bias terms (lora_bias=True); only plain LoRA adapters can be experts.")
    from safetensors.torch import load_file

    try:
        state = load_file(weights_file)
    except Exception as exc:  # a truncated or corrupted file does not say which one
        raise ValueError(f"{where}: {WEIGHTS_NAME} is truncated or corrupted ({type(exc).__name__}: {exc}).") from exc

    rslora = bool(cfg.get("use_rslora", False))
    global_r = int(cfg["r"])
    global_alpha = float(cfg.get("lora_alpha", global_r))
    alpha_pattern = cfg.get("alpha_pattern") or {}

    def effective_alpha(alpha: float, r: int) -> float:
        return alpha * math.sqrt(r) if rslora else alpha

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            continue  # embeddings' lora_embedding_A/B, modules_to_save, ...: not linear LoRA factors
        module = match["module"].removeprefix(_PEFT_PREFIX)
        factors.setdefault(module, {})[match["which"]] = tensor
    modules = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{where}: module {module!r} has lora_{next(iter(pair))} but not its partner factor.")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{where}: module {module!r} is not a linear LoRA (lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)})."
            )
        r = A.shape[0]  # the rank comes from the tensors themselves (it already honours rank_pattern)
        alpha = float(_pattern_value(alpha_pattern, module, global_alpha))
        modules[module] = (A, B, effective_alpha(alpha, r))
    if not modules:
        raise ValueError(f"{where}: {WEIGHTS_NAME} holds no linear-layer lora_A / lora_B weights.")
    return LoraExpert(path=path, r=global_r, lora_alpha=effective_alpha(global_alpha, global_r), modules=modules)


def read_lora_experts(paths: list[str], module_names: list[str]) -> list[LoraExpert]:
    """Read every folder of ``paths`` and check that each one covers every module of ``module_names`` (the modules
    the mixer adapts), so nothing is created before all experts are known to fit."""
    experts = [read_lora_expert(path) for path in paths]
    for expert in experts:
        missing = [m for m in module_names if m not in expert.modules]
        if missing:
            have = sorted({m.rsplit(".", 1)[-1] for m in expert.modules})
            raise ValueError(
                f"LoraMixerConfig.expert_adapters: {expert.path!r} has no LoRA weights for {len(missing)} of the "
                f"mixer's target modules, e.g. {missing[:3]}; its LoRA targets {have}. The folders' target_modules "
                "must cover the mixer's target_modules (narrow target_modules to what every folder adapts)."
            )
    return experts
