"""Adapters in and out of the merge functions: read a folder or a (state dict, config) pair as plain LoRA factors,
export LoRA-convertible peft-ext adapters to LoRA, check that the inputs fit together, write a plain LoRA folder.

A "LoRA view" of an adapter is ``LoraView(modules, extra, config)``: ``modules`` maps each adapted module's state-dict
prefix (``base_model.model.<module>``) to its ``(A, B, scaling, kind)`` with ``ΔW = scaling · B @ A`` (``kind`` is
``"linear"`` for ``lora_A.weight`` / ``lora_B.weight``, ``"embedding"`` for ``lora_embedding_A`` / ``_B``), ``extra``
holds the other saved tensors (``modules_to_save`` copies, e.g. a classifier head), ``config`` the source config.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .._io import atomic_write, atomic_write_json

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


class MergeInputError(ValueError):
    """Adapters that cannot be merged (different bases or modules, a type without a LoRA export, a bad ``k``)."""


@dataclass
class LoraView:
    """One adapter as plain LoRA factors (see the module docstring)."""

    name: str = field(metadata={"help": "How errors name the adapter: its folder, or 'adapter <index>'."})
    modules: dict = field(metadata={"help": "state-dict prefix -> (A [r, ...], B [out, r, ...], scaling, kind)."})
    extra: dict = field(metadata={"help": "Saved tensors that are not LoRA factors (modules_to_save copies)."})
    config: Any = field(metadata={"help": "The adapter's PeftConfig (a LoraConfig after export)."})

    @property
    def base(self) -> Optional[str]:
        """The base model the adapter was trained on (``base_model_name_or_path``), or None."""
        return getattr(self.config, "base_model_name_or_path", None)

    def delta_weights(self) -> dict:
        """``{module prefix: scaling · B @ A}`` in float64, A and B as matrices ([out, r] @ [r, in])."""
        return {m: s * B.reshape(B.shape[0], B.shape[1]).double() @ A.reshape(A.shape[0], -1).double()
                for m, (A, B, s, _) in self.modules.items()}


def load_adapter(adapter, index: int = 0, base_model=None, export_rank: Optional[int] = None) -> LoraView:
    """An adapter folder, or a ``(state_dict, config)`` pair, as a ``LoraView``.

    A non-LoRA adapter is exported to LoRA first (PEFT's ``convert_to_lora``, at ``export_rank`` or the adapter's own
    ``r``): this needs the base model, ``base_model`` (a model, which is left as it was, or a folder) or else the
    folder the adapter's config names. Methods whose ΔW is not one static low-rank matrix (``MethodSpec.
    lora_convertible`` False) are refused."""
    from peft import PeftConfig

    if isinstance(adapter, (str, os.PathLike)):
        folder = Path(adapter)
        name = str(folder)
        check_adapter_folder(folder)
        config = PeftConfig.from_pretrained(str(folder))
        state_dict = None
    elif isinstance(adapter, (tuple, list)) and len(adapter) == 2 and isinstance(adapter[0], dict):
        folder, name = None, f"adapter {index}"
        state_dict, config = adapter
        if isinstance(config, dict):
            config = PeftConfig.from_peft_type(**config)
    else:
        raise MergeInputError(f"adapter {index}: pass an adapter folder or a (state_dict, config) pair; got "
                              f"{type(adapter).__name__}.")
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type != "LORA":
        state_dict, config = _export_to_lora(name, folder, state_dict, config, base_model, export_rank)
    elif state_dict is None:
        state_dict = _load_weights(folder)
    return lora_view(state_dict, config, name)


def lora_view(state_dict: dict, config, name: str = "adapter") -> LoraView:
    """A LoRA state dict (``get_peft_model_state_dict`` / ``save_pretrained`` keys) and its LoraConfig as factors."""
    for attr, allowed in (("use_dora", False), ("lora_bias", False), ("bias", "none"), ("target_parameters", None)):
        value = getattr(config, attr, allowed)
        if value not in (allowed, [], ()):
            raise MergeInputError(f"{name}: LoraConfig.{attr}={value!r} is not a sum of rank-1 units B·A; only "
                                  f"plain LoRA merges ({attr}={allowed!r}).")
    from peft.utils.other import get_pattern_key

    factors: dict = {}
    extra = {}
    for key, tensor in state_dict.items():
        match = _LORA_KEY.match(key)
        if match is None:
            extra[key] = tensor
            continue
        part = match["part"]
        slot = factors.setdefault(match["module"], {})
        slot["A" if "A" in part.replace("lora_", "") else "B"] = tensor
        slot["kind"] = "embedding" if "embedding" in part else "linear"
    modules = {}
    for module, slot in sorted(factors.items()):
        if "A" not in slot or "B" not in slot:
            raise MergeInputError(f"{name}: module {module} has only one of its two LoRA factors.")
        A, B = slot["A"], slot["B"]
        r = A.shape[0]
        if B.dim() < 2 or B.shape[1] != r or B.numel() != B.shape[0] * r:
            raise MergeInputError(f"{name}: module {module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                  "are not the factors of a rank-r update B·A.")
        short = module.removeprefix(PREFIX)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), short), config.lora_alpha) \
            if config.alpha_pattern else config.lora_alpha
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        modules[module] = (A, B, float(scaling), slot["kind"])
    if not modules:
        raise MergeInputError(f"{name}: no LoRA weights found (keys like '<module>.lora_A.weight').")
    return LoraView(name, modules, extra, config)


def _load_weights(folder: Path) -> dict:
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        return load_file(str(weights))
    return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)


def _export_to_lora(name, folder, state_dict, config, base_model, export_rank):
    """A non-LoRA adapter as (LoRA state dict, LoraConfig) through PEFT's ``convert_to_lora``; the base is restored."""
    from peft import PeftModel, set_peft_model_state_dict
    from peft.tuners.lora.conversion import convert_to_lora

    spec = _spec_of(config)
    if spec is not None and not spec.lora_convertible:
        raise MergeInputError(
            f"{name}: {spec.name} adapters cannot export to LoRA (their ΔW is not one static low-rank matrix; "
            "MethodSpec.lora_convertible is False), so they cannot be merged; merge LoRA-convertible adapters only.")
    rank = export_rank or getattr(config, "r", None)
    if not isinstance(rank, int) or rank < 1:
        raise MergeInputError(f"{name}: {config.peft_type} has no rank r to export at; pass export_rank.")
    base = _base_for(name, config, base_model)
    if folder is not None:
        model = PeftModel.from_pretrained(base, str(folder))
    else:
        from peft import get_peft_model

        model = get_peft_model(base, config)
        set_peft_model_state_dict(model, state_dict)
    try:
        if not model.supports_lora_conversion():
            raise MergeInputError(f"{name}: {config.peft_type} adapters cannot export to LoRA, so they cannot be "
                                  "merged; merge LoRA-convertible adapters only.")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora_config, lora_sd = convert_to_lora(model, rank=rank)
    finally:
        model.unload()  # leave the caller's base model as it was
    lora_config.task_type = config.task_type
    return {k: v.detach().clone() for k, v in lora_sd.items()}, lora_config


def _spec_of(config):
    from ..registry import get_method

    try:
        return get_method(config)
    except KeyError:
        return None


def _base_for(name, config, base_model):
    """The base model to export on: ``base_model`` (a model or a folder) or the folder the config names."""
    if base_model is not None and not isinstance(base_model, (str, os.PathLike)):
        return base_model
    from ..cli import _base_model_for

    path = base_model or config.base_model_name_or_path
    if not path or not Path(path).exists():
        raise MergeInputError(f"{name}: exporting a {config.peft_type} adapter to LoRA needs its base model; "
                              f"{path!r} is not a local folder (pass base_model).")
    config.base_model_name_or_path = str(path)
    return _base_model_for(config)


def check_adapter_folder(folder: Path) -> None:
    """FileNotFoundError / MergeInputError unless ``folder`` holds an adapter_config.json and whole weights."""
    from .._io import safetensors_is_whole

    if not folder.is_dir():
        raise FileNotFoundError(f"adapter {str(folder)!r} is not a folder; pass folders written by save_pretrained.")
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no adapter_config.json; pass a folder written by save_pretrained.")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeInputError(f"{config} is not valid JSON ({exc}); save the adapter again.") from exc
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        if not safetensors_is_whole(weights):
            raise MergeInputError(f"{weights} is truncated or not a safetensors file; save or copy it again.")
    elif not (folder / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"{folder} has no adapter_model.safetensors.")


def _same_base(a: Optional[str], b: Optional[str]) -> bool:
    if a == b:
        return True
    if a and b and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def check_compatible(views: list) -> None:
    """MergeInputError unless every adapter has the same base model, the same adapted modules and the same shapes."""
    if not views:
        raise MergeInputError("no adapters to merge; pass at least one.")
    first = views[0]
    for view in views[1:]:
        if not _same_base(first.base, view.base):
            raise MergeInputError(f"adapters of different base models cannot be merged: {first.name} is for "
                                  f"{first.base!r}, {view.name} for {view.base!r}.")
        ours, theirs = set(first.modules), set(view.modules)
        if ours != theirs:
            only = sorted(m.removeprefix(PREFIX) for m in ours ^ theirs)[:4]
            raise MergeInputError(f"adapters with different target modules cannot be merged: {first.name} and "
                                  f"{view.name} differ on {', '.join(only)}.")
        for module in ours:
            (A0, B0, _, k0), (A1, B1, _, k1) = first.modules[module], view.modules[module]
            if k0 != k1 or A0.shape[1:] != A1.shape[1:] or B0.shape[:1] + B0.shape[2:] != B1.shape[:1] + B1.shape[2:]:
                raise MergeInputError(f"{first.name} and {view.name} adapt {module.removeprefix(PREFIX)} with "
                                      f"different shapes ({tuple(B0.shape)}·{tuple(A0.shape)} vs "
                                      f"{tuple(B1.shape)}·{tuple(A1.shape)}); were they trained on one base model?")
        if set(first.extra) != set(view.extra):
            raise MergeInputError(f"{first.name} and {view.name} save different modules_to_save "
                                  f"({sorted(set(first.extra) ^ set(view.extra))[:3]}).")


def average_extra(views: list, weights: list) -> dict:
    """The ``modules_to_save`` tensors (e.g. classifier heads) averaged over the adapters, weighted by ``weights``
    normalised to sum 1 (a head is a full module, not a low-rank update, so it is averaged, not added)."""
    total = sum(weights)
    if not views[0].extra:
        return {}
    if total == 0:
        raise MergeInputError("the weights sum to 0, so the adapters' modules_to_save cannot be averaged.")
    return {key: sum(w / total * v.extra[key].float() for v, w in zip(views, weights)).to(views[0].extra[key].dtype)
            for key in views[0].extra}


def lora_config_for(views: list, rank: int, target_modules, **overrides):
    """The LoraConfig of a merged adapter: rank ``rank`` with ``lora_alpha = rank`` (scaling 1, folded into B), the
    inputs' base model, task type, fan_in_fan_out and modules_to_save."""
    from peft import LoraConfig

    first = views[0].config
    return LoraConfig(
        r=rank, lora_alpha=rank, target_modules=sorted(target_modules),
        base_model_name_or_path=views[0].base, task_type=first.task_type,
        fan_in_fan_out=bool(getattr(first, "fan_in_fan_out", False)),
        modules_to_save=getattr(first, "modules_to_save", None) if views[0].extra else None,
        **overrides,
    )


def write_lora_folder(out: Union[str, os.PathLike], state_dict: dict, config) -> Path:
    """Write a plain LoRA adapter folder (``adapter_model.safetensors`` then ``adapter_config.json``, each atomically,
    so a folder with a config always has whole weights) that ``PeftModel.from_pretrained`` loads without peft-ext."""
    from safetensors.torch import save

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} exists and is not a folder.")
    payload = save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, metadata={"format": "pt"})
    atomic_write(out / "adapter_model.safetensors", lambda f: f.write(payload), binary=True)
    data = config.to_dict()
    data["peft_type"] = str(getattr(data["peft_type"], "value", data["peft_type"]))
    if data.get("task_type") is not None:
        data["task_type"] = str(getattr(data["task_type"], "value", data["task_type"]))
    atomic_write_json(out / "adapter_config.json", data)
    return out
