"""Upstream-backed, paper-faithful adapter presets and the loader of ``configs/*.yaml``.

Each preset returns an upstream PEFT config and states where upstream departs from the paper:

* :func:`randlora_preset` — RandLoRA (https://arxiv.org/abs/2502.00987, https://github.com/PaulAlbert31/RandLoRA)
  with the official per-layer scale ``α/(r·√n)``;
* :func:`bone_preset` — Bone / block-affine "bat" (https://arxiv.org/abs/2409.15371, https://github.com/JL-er/Bone) as
  ``peft.MissConfig``, and :func:`load_bone_checkpoint` for adapters saved as ``BONE``;
* :func:`dora_rslora_preset` — DoRA + rsLoRA as in Gazal-R1 (https://arxiv.org/abs/2506.21594, no public code);
* :func:`layra_preset` — LayRA (https://arxiv.org/abs/2509.11414, no public code), with the CKA layer selection of
  https://github.com/c2d-usp/Layer-wise-LoRA-with-CKA as an option.

The paper-faithful LoRA-GA initialisation is a function, :func:`peft_ext.init.lora_ga.lora_ga_init`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import fields
from typing import Any, Callable

from peft import LoraConfig, PeftConfig

from .bone import bone_config_to_miss, bone_preset, convert_bone_checkpoint, load_bone_checkpoint, remap_bone_state_dict
from .dora_rslora import dora_rslora_preset
from .layra import cka_layer_scores, cka_select_layers, layra_layers, layra_preset, linear_cka
from .randlora import (
    RandLoraPaperConfig,
    apply_paper_scaling,
    paper_scale,
    post_injection_paper_scaling,
    randlora_from_pretrained,
    randlora_preset,
)

# Preset functions a YAML file may name as its `method`, with the config class their extra keywords belong to.
PRESETS: dict[str, tuple[Callable[..., PeftConfig], type]] = {}


def _register_presets() -> None:
    from peft import MissConfig, RandLoraConfig

    PRESETS.update(
        {
            "randlora_preset": (randlora_preset, RandLoraConfig),
            "bone_preset": (bone_preset, MissConfig),
            "dora_rslora_preset": (dora_rslora_preset, LoraConfig),
            "layra_preset": (layra_preset, LoraConfig),
        }
    )


_register_presets()

TOP_LEVEL_KEYS = ("method", "config")


def _init_fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls) if f.init}


def _resolve(method: Any) -> tuple[Callable[..., PeftConfig], set[str], str]:
    """(builder, allowed keyword names, description) of a YAML ``method``."""
    from ..registry import list_methods

    ext = {spec.name: spec for spec in list_methods()}
    if not isinstance(method, str) or not (method in PRESETS or method == "lora" or method in ext):
        allowed = sorted(PRESETS) + ["lora"] + sorted(ext)
        raise ValueError(f"configs: unknown method {method!r}; allowed: {allowed}.")
    if method in PRESETS:
        fn, config_cls = PRESETS[method]
        params = inspect.signature(fn).parameters
        named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            named |= _init_fields(config_cls)
        return fn, named, f"preset {method}"
    config_cls = LoraConfig if method == "lora" else ext[method].config_cls
    return config_cls, _init_fields(config_cls) - {"peft_type"}, config_cls.__name__


def build_config(method: str, config: dict[str, Any] | None = None) -> PeftConfig:
    """Build the PEFT config a ``configs/*.yaml`` entry describes: ``method`` is a preset function of this package
    (:data:`PRESETS`), ``"lora"`` (``peft.LoraConfig``) or a registered peft-ext method name; ``config`` its keyword
    arguments. Unknown methods or keys raise ``ValueError`` naming them and what is allowed. A loader, not a method:
    each YAML's header names its paper and official code (e.g. RandLoRA https://arxiv.org/abs/2502.00987,
    https://github.com/PaulAlbert31/RandLoRA)."""
    builder, allowed, what = _resolve(method)
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"configs: `config` must be a mapping of keyword arguments; got {type(config).__name__}.")
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"configs: unknown key(s) {unknown} for {what}; allowed: {sorted(allowed)}.")
    return builder(**config)


def load_config(path: str | os.PathLike) -> PeftConfig:
    """Read one ``configs/*.yaml`` preset (``yaml.safe_load``) and build its PEFT config.

    The file holds exactly the keys ``method`` (required) and ``config`` (optional mapping); see
    :func:`build_config`. Errors name the file, the offending key or value, and what is allowed. A loader, not a
    method (no paper or code of its own); each YAML's header cites the paper and official code of its setting.

    E.g. ``randlora_paper.yaml``: RandLoRA https://arxiv.org/abs/2502.00987, official code
    https://github.com/PaulAlbert31/RandLoRA; the presets' papers are listed in :mod:`peft_ext.presets`, the methods' in
    ``peft_ext.list_methods()``.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"{os.fspath(path)}: not valid YAML ({exc}).") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)}: must be a mapping with keys {list(TOP_LEVEL_KEYS)}; got "
                         f"{type(data).__name__}.")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"{os.fspath(path)}: unknown top-level key(s) {unknown}; allowed: {list(TOP_LEVEL_KEYS)}.")
    if "method" not in data:
        raise ValueError(f"{os.fspath(path)}: missing the `method` key.")
    try:
        return build_config(data["method"], data.get("config"))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from exc


__all__ = [
    "PRESETS",
    "RandLoraPaperConfig",
    "apply_paper_scaling",
    "bone_config_to_miss",
    "bone_preset",
    "build_config",
    "cka_layer_scores",
    "cka_select_layers",
    "convert_bone_checkpoint",
    "dora_rslora_preset",
    "layra_layers",
    "layra_preset",
    "linear_cka",
    "load_bone_checkpoint",
    "load_config",
    "paper_scale",
    "post_injection_paper_scaling",
    "randlora_from_pretrained",
    "randlora_preset",
    "remap_bone_state_dict",
]
