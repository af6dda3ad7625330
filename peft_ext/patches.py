"""Every change peft-ext makes to PEFT's own classes and functions, in one module, each limited to peft-ext's adapters.

PEFT has no plug-in points for what follows, so these are patches. Each one leaves PEFT's behaviour unchanged for
adapters that are not peft-ext's (plain LoRA, upstream RandLoRA, ...): the wrapper calls PEFT's original and returns
its result, or re-raises its exception untouched.

* ``PeftType`` gains one member per registered method (``add_peft_type``): the enum is closed, and PEFT's own
  ``register_peft_method`` refuses names that are not members. Nothing else about the enum changes.
* ``PeftModel.__init__``: for a peft-ext adapter, the tuner's per-call inputs (``ExtModel.call_args``, e.g.
  ``route_ids``) join ``special_peft_forward_args``, so ``model(input_ids, route_ids=...)`` hands them to the tuner
  and not to the base model, as PEFT does with ``adapter_names=``.
* ``PeftModel.save_pretrained``: a model with a peft-ext adapter saves into a temporary folder beside the target and
  moves the finished files into place, so a save that fails midway leaves the previous files intact.
* ``PeftModel.create_or_update_model_card``: a model with a peft-ext adapter gets peft-ext's complete card
  (``peft_ext.card``) instead of PEFT's template.
* ``peft.peft_model.load_peft_weights``: when the weights of a local peft-ext adapter cannot be read (truncated,
  corrupted, not safetensors), the error names the folder and the fix; every other adapter's error is PEFT's own.
* RandLoRA, only when its config asks for the paper scale (``RandLoraPaperConfig(paper_scaling=True)``, made by
  ``peft_ext.presets.randlora_preset``): ``RandLoraModel.inject_adapter`` applies ``α/(r·√n)`` per layer after
  injection, and PEFT's config table loads a saved RandLoRA config as ``RandLoraPaperConfig`` when the file says
  ``"paper_scaling": true`` and as PEFT's plain ``RandLoraConfig`` otherwise.

``PATCHED`` records the signature of each original as of the pinned PEFT (see ``pyproject.toml``); ``tests/
test_patches.py`` fails when a PEFT release changes one, so the wrappers are re-checked before the pin moves.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
from typing import Any, Optional

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType

# "<module>:<qualname>" of each patched PEFT callable → its signature (annotations dropped) in the pinned PEFT 0.21.2.
PATCHED: dict[str, str] = {
    "peft.peft_model:PeftModel.__init__":
        "(self, model, peft_config, adapter_name='default', autocast_adapter_dtype=True, low_cpu_mem_usage=False)",
    "peft.peft_model:PeftModel.save_pretrained":
        "(self, save_directory, safe_serialization=True, selected_adapters=None, save_embedding_layers='auto', "
        "is_main_process=True, path_initial_model_for_weight_conversion=None, **kwargs)",
    "peft.peft_model:PeftModel.create_or_update_model_card": "(self, output_dir)",
    "peft.peft_model:load_peft_weights": "(model_id, device=None, key_mapping=None, **hf_hub_download_kwargs)",
    "peft.tuners.randlora:RandLoraModel.inject_adapter":
        "(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, state_dict=None)",
}

ORIGINALS: dict[str, Any] = {}  # the same keys as PATCHED → PEFT's original callable, kept for tests and unpatching


def signature_text(fn) -> str:
    """``inspect.signature`` of ``fn`` without annotations (they are strings or types depending on the module)."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


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


def ext_spec(peft_type) -> Optional[Any]:
    """The ``MethodSpec`` of a peft-ext peft type (enum member or string), or None for any other type."""
    from .registry import _SPECS

    return _SPECS.get(str(getattr(peft_type, "value", peft_type)).lower())


def ext_specs_of(model) -> list:
    """The specs of the peft-ext adapters of ``model`` (a ``PeftModel``), without repeats; [] for other models."""
    found = []
    for cfg in (getattr(model, "peft_config", None) or {}).values():
        spec = ext_spec(getattr(cfg, "peft_type", None))
        if spec is not None and spec not in found:
            found.append(spec)
    return found


def _local_peft_type(model_id, subfolder: Optional[str]) -> Optional[str]:
    """``peft_type`` of the adapter_config.json in a local adapter folder; None when not local or not readable."""
    if not isinstance(model_id, (str, os.PathLike)):
        return None
    path = os.path.join(model_id, subfolder or "", "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def _record(key: str, original) -> None:
    ORIGINALS.setdefault(key, original)


def _patch_peft_model() -> None:
    if getattr(PeftModel, "_peft_ext_patched", False):
        return
    orig_init = PeftModel.__init__
    orig_card = PeftModel.create_or_update_model_card
    orig_save = PeftModel.save_pretrained
    _record("peft.peft_model:PeftModel.__init__", orig_init)
    _record("peft.peft_model:PeftModel.create_or_update_model_card", orig_card)
    _record("peft.peft_model:PeftModel.save_pretrained", orig_save)

    @functools.wraps(orig_init)
    def __init__(self, model, peft_config, *args, **kwargs):
        orig_init(self, model, peft_config, *args, **kwargs)
        spec = ext_spec(getattr(peft_config, "peft_type", None))
        if spec is not None:  # per-call routing inputs are popped by the tuner, never passed to the base model
            self.special_peft_forward_args = set(self.special_peft_forward_args) | set(spec.model_cls.call_args)

    @functools.wraps(orig_card)
    def create_or_update_model_card(self, output_dir):
        if not ext_specs_of(self):
            return orig_card(self, output_dir)
        from .card import write_model_card

        try:
            write_model_card(self, output_dir, update=orig_card)
        except Exception as exc:  # a card must never cost the user the save: fall back to PEFT's own card
            import warnings

            warnings.warn(f"peft-ext could not write its model card ({type(exc).__name__}: {exc}); wrote PEFT's.",
                          stacklevel=2)
            orig_card(self, output_dir)

    @functools.wraps(orig_save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not ext_specs_of(self) or not isinstance(save_directory, (str, os.PathLike)):
            return orig_save(self, save_directory, *args, **kwargs)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a folder; {os.fspath(save_directory)!r} is a file.")
        if kwargs.get("state_dict") is None:
            from .fsdp import is_sharded

            if is_sharded(self):
                raise ValueError(
                    "save_pretrained on an FSDP-sharded model sees only this rank's shards; call "
                    "peft_ext.fsdp.save_adapter(model, path) on every rank, or pass "
                    "state_dict=accelerator.get_state_dict(model)."
                )
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


def _patch_load_peft_weights() -> None:
    import peft.peft_model as peft_model_module

    orig_load = peft_model_module.load_peft_weights
    if getattr(orig_load, "_peft_ext_patched", False):
        return
    _record("peft.peft_model:load_peft_weights", orig_load)

    @functools.wraps(orig_load)
    def load_peft_weights(model_id, *args, **kwargs):
        try:
            return orig_load(model_id, *args, **kwargs)
        except OSError:  # missing files, Hub look-ups: already clear
            raise
        except Exception as exc:
            # safetensors / unpickling errors do not say which file is broken; only peft-ext adapters get the rewrite
            if ext_spec(_local_peft_type(model_id, kwargs.get("subfolder"))) is None:
                raise
            raise ValueError(
                f"The adapter weights in {os.fspath(model_id)!r} are truncated, corrupted or not a safetensors file "
                f"({type(exc).__name__}: {exc}). Save the adapter again, or copy the folder again."
            ) from exc

    load_peft_weights._peft_ext_patched = True
    peft_model_module.load_peft_weights = load_peft_weights


def _patch_randlora() -> None:
    """RandLoRA's official per-layer scale α/(r·√n), opt-in through ``RandLoraPaperConfig(paper_scaling=True)``."""
    from peft.tuners.randlora import RandLoraConfig, RandLoraModel

    from .presets.randlora import RandLoraPaperConfig, post_injection_paper_scaling

    if getattr(RandLoraModel, "_peft_ext_patched", False):
        return
    orig_inject = RandLoraModel.inject_adapter
    _record("peft.tuners.randlora:RandLoraModel.inject_adapter", orig_inject)

    class RandLoraConfigLoader(RandLoraPaperConfig):
        """PEFT's config table entry for RANDLORA: builds a ``RandLoraPaperConfig`` when the saved config says
        ``paper_scaling: true``, PEFT's plain ``RandLoraConfig`` otherwise (never an instance of this class)."""

        def __new__(cls, *args, **kwargs):
            if kwargs.get("paper_scaling") is True:
                return RandLoraPaperConfig(*args, **kwargs)
            kwargs.pop("paper_scaling", None)
            return RandLoraConfig(*args, **kwargs)

    @functools.wraps(orig_inject)
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        orig_inject(self, model, adapter_name, *args, **kwargs)
        post_injection_paper_scaling(self, adapter_name)  # a no-op unless the config says paper_scaling

    PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.RANDLORA] = RandLoraConfigLoader
    RandLoraModel.inject_adapter = inject_adapter
    RandLoraModel._peft_ext_patched = True


def install() -> None:
    """Apply every patch once (idempotent); ``peft_ext.registry`` calls it on import."""
    _patch_peft_model()
    _patch_load_peft_weights()
    _patch_randlora()
