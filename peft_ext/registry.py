"""The registry: the only code in peft-ext that touches PEFT's internals.

PEFT's ``PeftType`` enum is closed and ``peft.utils.register_peft_method`` refuses names that are not members, so
``register`` first adds the member to the enum, checks that the prefix is unique against every prefix PEFT already
knows (upstream's own check looks up the prefix among the mapping's *keys*, which are peft types, so it never fires),
then calls PEFT's own ``register_peft_method``. Each method is described by one ``MethodSpec``: the conformance suite,
the README table and ``scripts/bench_overhead.py`` all iterate ``list_methods()``.

Three PEFT behaviours are extended here, for peft-ext adapters only (and RandLoRA gets the official paper scaling as
an opt-in, see ``_patch_randlora``):

* ``PeftModel.__init__`` adds the tuner's per-call inputs (``ExtModel.call_args``, e.g. ``route_ids``) to
  ``special_peft_forward_args``, so ``model(input_ids, route_ids=...)`` hands them to the tuner and not to the base
  model, exactly as PEFT does with ``adapter_names=``.
* ``PeftModel.save_pretrained`` writes into a temporary folder beside the target and moves the finished files into
  place, so a save that fails midway leaves the previous adapter files intact.
* ``PeftModel.create_or_update_model_card`` adds a section that names the method, cites its paper and links the
  official code; the tags ``peft-ext`` and the method name come from ``BaseTuner._post_injection_hook``.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import Any

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
from peft.utils import PeftType, register_peft_method

from .spec import MethodSpec


_SPECS: dict[str, MethodSpec] = {}


def add_peft_type(member: str) -> PeftType:
    """Add ``member`` (upper case, value == name) to PEFT's closed ``PeftType`` enum; harmless when already there."""
    if member in PeftType.__members__:
        return PeftType[member]
    if not member.isupper() or not member.replace("_", "").isalnum():
        raise ValueError(f"PeftType member must be upper-case letters, digits and '_'; got {member!r}.")
    value = str.__new__(PeftType, member)
    value._name_ = member
    value._value_ = member
    value.__objclass__ = PeftType
    if hasattr(value, "_sort_order_"):
        value._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[member] = value
    PeftType._value2member_map_[member] = value
    PeftType._member_names_.append(member)
    type.__setattr__(PeftType, member, value)  # EnumType.__setattr__ refuses new members
    return value


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


def _ext_specs_of(model) -> list[MethodSpec]:
    configs = getattr(model, "peft_config", {}) or {}
    found = []
    for cfg in configs.values():
        key = str(getattr(cfg.peft_type, "value", cfg.peft_type)).lower()
        if key in _SPECS and _SPECS[key] not in found:
            found.append(_SPECS[key])
    return found


def _patch_peft_model() -> None:
    if getattr(PeftModel, "_peft_ext_patched", False):
        return
    orig_card = PeftModel.create_or_update_model_card
    orig_save = PeftModel.save_pretrained
    orig_init = PeftModel.__init__

    @functools.wraps(orig_init)
    def __init__(self, model, peft_config, *args, **kwargs):
        orig_init(self, model, peft_config, *args, **kwargs)
        spec = _SPECS.get(str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).lower())
        if spec is not None:  # per-call routing inputs are popped by the tuner, never passed to the base model
            self.special_peft_forward_args = set(self.special_peft_forward_args) | set(spec.model_cls.call_args)

    @functools.wraps(orig_card)
    def create_or_update_model_card(self, output_dir: str):
        orig_card(self, output_dir)
        specs = _ext_specs_of(self)
        if specs:
            from .card import update_model_card

            update_model_card(self, output_dir, specs)

    @functools.wraps(orig_save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _ext_specs_of(self) or not isinstance(save_directory, (str, os.PathLike)):
            return orig_save(self, save_directory, *args, **kwargs)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a folder; {save_directory!r} is a file.")
        target = os.path.abspath(save_directory)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".peft-ext-save-", dir=parent)
        try:
            if os.path.isfile(os.path.join(target, "README.md")):  # PEFT updates an existing card in place
                shutil.copy2(os.path.join(target, "README.md"), os.path.join(staging, "README.md"))
            result = orig_save(self, staging, *args, **kwargs)
            for root, _dirs, files in os.walk(staging):
                rel = os.path.relpath(root, staging)
                dest_root = target if rel == "." else os.path.join(target, rel)
                os.makedirs(dest_root, exist_ok=True)
                for name in files:
                    os.replace(os.path.join(root, name), os.path.join(dest_root, name))
            return result
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    PeftModel.__init__ = __init__
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.save_pretrained = save_pretrained
    PeftModel._peft_ext_patched = True

    import peft.peft_model as peft_model_module

    orig_load = peft_model_module.load_peft_weights

    @functools.wraps(orig_load)
    def load_peft_weights(model_id, *args, **kwargs):
        try:
            return orig_load(model_id, *args, **kwargs)
        except OSError:  # missing files, Hub look-ups: already clear
            raise
        except Exception as exc:  # safetensors / unpickling errors do not say which file is broken
            raise ValueError(
                f"The adapter weights in {model_id!r} are truncated, corrupted or not a safetensors file "
                f"({type(exc).__name__}: {exc}). Save the adapter again, or copy the folder again."
            ) from exc

    peft_model_module.load_peft_weights = load_peft_weights


_patch_peft_model()


def _patch_randlora() -> None:
    """RandLoRA's official per-layer scale α/(r·√n) (``peft_ext.presets.randlora_preset``): the saved config keeps
    its ``paper_scaling`` marker on load, and the scale is applied after every injection (``get_peft_model``,
    ``add_adapter``, ``load_adapter``, ``from_pretrained``). ``paper_scaling=False`` is upstream's behaviour."""
    from peft.tuners.randlora import RandLoraModel

    from .presets.randlora import RandLoraPaperConfig, post_injection_paper_scaling

    if getattr(RandLoraModel, "_peft_ext_patched", False):
        return
    PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.RANDLORA] = RandLoraPaperConfig
    orig_inject = RandLoraModel.inject_adapter

    @functools.wraps(orig_inject)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        orig_inject(self, model, adapter_name, *args, **kwargs)
        post_injection_paper_scaling(self, adapter_name)

    RandLoraModel.inject_adapter = inject_adapter
    RandLoraModel._peft_ext_patched = True


_patch_randlora()


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
