"""The registry: one ``MethodSpec`` per method, registered with PEFT through PEFT's own ``register_peft_method``.

PEFT's ``PeftType`` enum is closed and ``peft.utils.register_peft_method`` refuses names that are not members, so
``register`` first adds the member to the enum (``peft_ext.patches.add_peft_type``), checks that the prefix is unique
against every prefix PEFT already knows (upstream's own check looks up the prefix among the mapping's *keys*, which
are peft types, so it never fires), then calls PEFT's ``register_peft_method``. The conformance suite, the README
table and ``scripts/bench_overhead.py`` all iterate ``list_methods()``.

Every other change to PEFT's classes and functions (``PeftModel.__init__`` / ``save_pretrained`` / model card,
``load_peft_weights``, RandLoRA's paper scaling) lives in ``peft_ext.patches``, limited to peft-ext's adapters; it is
installed when this module is imported.
"""

from __future__ import annotations

from typing import Any

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
from peft.utils import register_peft_method

from . import patches
from .patches import add_peft_type
from .spec import MethodSpec


_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Register one method with PEFT. Registering the same spec again is a no-op; a clash is a clear error."""
    if spec.name in _SPECS:
        if _SPECS[spec.name].config_cls is spec.config_cls:
            return _SPECS[spec.name]
        raise ValueError(f"A different peft-ext method is already registered as {spec.name!r}.")
    if spec.name != spec.name.lower() or spec.name.endswith("_"):
        raise ValueError(f"MethodSpec.name must be lower case without a trailing '_'; got {spec.name!r}.")
    if getattr(spec.model_cls, "prefix", None) != spec.prefix:
        raise ValueError(
            f"{spec.model_cls.__name__}.prefix must be {spec.prefix!r} (the method name plus '_'); "
            f"got {getattr(spec.model_cls, 'prefix', None)!r}."
        )
    peft_type = add_peft_type(spec.name.upper())
    for other_type, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_type != peft_type and other_prefix == spec.prefix:
            raise ValueError(f"Prefix {spec.prefix!r} of {spec.name!r} is already used by PEFT method {other_type}.")
    existing = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if existing is None:
        register_peft_method(name=spec.name, config_cls=spec.config_cls, model_cls=spec.model_cls, prefix=spec.prefix)
    elif existing is not spec.config_cls:  # e.g. a later PEFT release ships a method of the same name
        raise ValueError(
            f"PEFT already has a method {peft_type.value!r} ({existing.__module__}.{existing.__name__}); "
            f"peft-ext cannot register its own {spec.config_cls.__name__} under that name."
        )
    _SPECS[spec.name] = spec
    return spec


def list_methods() -> list[MethodSpec]:
    """All registered peft-ext methods, in registration order."""
    return list(_SPECS.values())


def get_method(name_or_type: Any) -> MethodSpec:
    """The spec of one method, by name (``"dylora"``), peft type (``"DYLORA"``) or config instance."""
    key = getattr(name_or_type, "peft_type", name_or_type)
    key = str(getattr(key, "value", key)).lower()
    if key not in _SPECS:
        raise KeyError(f"{name_or_type!r} is not a peft-ext method; registered: {sorted(_SPECS)}.")
    return _SPECS[key]


patches.install()


# Every built-in method, in the order of the README table; each folder's __init__ defines SPEC.
BUILTIN_METHODS = (
    "dylora",
    "nola",
    "lora_sb",
    "block_lora",
    "switchlora",
    "codyra",
    "o3_lora",
    "mola",
    "smora",
    "lora_mixer",
    "gated_lora",
    "prompt_aware_lora",
)


def _builtin_specs() -> list[MethodSpec]:
    import importlib

    return [importlib.import_module(f"peft_ext.tuners.{name}").SPEC for name in BUILTIN_METHODS]


for _spec in _builtin_specs():
    register(_spec)
