"""LoRA-Mixer model: injects ``LoraMixerLinear`` layers, loads PEFT LoRA folders as experts, adds the routing losses.

Paper: *LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing*
(https://arxiv.org/abs/2507.00029). Official code: https://github.com/hustcselwb/LoRA-Mixer (README only).
"""

from __future__ import annotations

import re
import warnings

from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers
from torch import nn

from .._shared.base import ExtModel
from .._shared.routing import route_value, value_range
from .config import LoraMixerConfig
from .experts import LoraExpert, read_lora_experts
from .layer import LoraMixerLayer, LoraMixerLinear

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj"]
_SSM = ["in_proj", "out_proj"]

# The paper's targets: the attention block's input and output projections (q/k/v and o for Transformers; in_proj and
# out_proj of each Mamba mixer for state-space models). Architectures not listed fall back to PEFT's LoRA defaults.
ATTENTION_TARGET_MODULES = {
    **{t: _LLAMA_LIKE for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "starcoder2", "smollm3", "granite", "cohere", "stablelm",
    )},
    "phi3": ["qkv_proj", "o_proj"],
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "mamba": _SSM,
    "falcon_mamba": _SSM,
    "mamba2": _SSM,
}


def _pattern_lookup(pattern: dict, key: str):
    """A per-module value of ``rank_pattern`` / ``alpha_pattern``: exact module name first, then PEFT's rule (a
    pattern equal to a dotted suffix of the name, as a regex)."""
    if key in pattern:
        return pattern[key]
    for pattern_key, value in pattern.items():
        if re.match(rf"(.*\.)?({pattern_key})$", key):
            return value
    return None


def lora_mixer_layers(model: nn.Module) -> list[LoraMixerLayer]:
    """All LoRA-Mixer layers inside ``model`` (a PeftModel, a LoraMixerModel or any module holding them)."""
    return [m for m in model.modules() if isinstance(m, LoraMixerLayer)]


class LoraMixerModel(ExtModel):
    """LoRA-Mixer tuner model.

    Without ``target_modules`` it adapts the attention input/output projections (``ATTENTION_TARGET_MODULES``).
    With ``expert_adapters`` the PEFT LoRA folders are read once, checked to cover every target module, and copied
    into the experts; the config then records each expert's rank and α (and per-module differences in
    ``rank_pattern`` / ``alpha_pattern``) so the saved adapter rebuilds without the folders. ``expert_ids=`` is a
    per-call input (``model(input_ids, expert_ids=ids)``) that forces one expert per token or per sample (-1: no
    expert). Under ``generate`` a per-token ``expert_ids`` ``[batch, prompt length]`` covers the prompt; generated
    tokens keep each sample's last given expert (``route_fill="last"``, the default), or take ``route_fill=e``
    (an expert index, or -1 for none) passed with the call."""

    prefix: str = "lora_mixer_"
    tuner_layer_cls = LoraMixerLayer
    layer_cls = LoraMixerLinear
    call_args = ("expert_ids", "route_fill")
    token_inputs = {"expert_ids": "last"}
    has_aux_loss = True

    def _check_call_inputs(self, inputs: dict) -> dict:
        """``expert_ids`` (and ``route_fill``) must lie in -1..E-1 for every active adapter; checked once per call."""
        ids = route_value("expert_ids", inputs.get("expert_ids"), kind="int", per_sample_ok=True)
        fill = inputs.get("route_fill")
        counts = sorted({self.peft_config[a].num_experts for a in self.active_adapters if a in self.peft_config})
        if not counts:
            return {**inputs, "expert_ids": ids}
        E = counts[0]
        expert = isinstance(fill, int) and not isinstance(fill, bool) and -1 <= fill < E
        if fill is not None and fill != "last" and not expert:
            raise ValueError(
                f"route_fill (the expert of tokens beyond expert_ids, e.g. generated ones) must be 'last' or an "
                f"expert index in -1..{E - 1} (-1: no expert); got {fill!r}."
            )
        span = value_range(ids) if ids is not None else None
        if span is not None and (span[0] < -1 or span[1] >= E):
            bad = ids[(ids < -1) | (ids >= E)].unique().tolist()[:8]
            raise ValueError(f"expert_ids must lie in -1..{E - 1} (-1: no expert); got values {bad}.")
        return {**inputs, "expert_ids": ids}

    def _prepare_adapter_config(self, peft_config: LoraMixerConfig, model_config: dict) -> LoraMixerConfig:
        if peft_config.target_modules is None:
            targets = ATTENTION_TARGET_MODULES.get(model_config.get("model_type"))
            if targets is not None:
                peft_config.target_modules = set(targets)
        return super()._prepare_adapter_config(peft_config, model_config)

    def _target_keys(self, config: LoraMixerConfig, model: nn.Module) -> list[str]:
        """Names of the modules this config will adapt (what ``inject_adapter`` is about to match)."""
        inside = [name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        keys = []
        for key, _ in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in inside):
                continue
            result = self._check_target_module_exists(config, key)
            if result and not isinstance(result, _ExcludedModule):
                keys.append(key)
        return keys

    def _prepare_model(self, peft_config: LoraMixerConfig, model: nn.Module) -> None:
        # Runs inside inject_adapter after the default targets are set and before any module is replaced: read every
        # expert folder now, so a bad folder fails before the model is touched.
        super()._prepare_model(peft_config, model)
        self.__dict__["_pending_experts"] = None
        if not peft_config.expert_adapters or getattr(peft_config, "_experts_from_checkpoint", False):
            return
        _maybe_include_all_linear_layers(peft_config, model)
        keys = self._target_keys(peft_config, model)
        experts = read_lora_experts(list(peft_config.expert_adapters), keys)
        unused = sorted({m for expert in experts for m in expert.modules} - set(keys))
        if unused:
            warnings.warn(
                f"LoraMixerConfig.expert_adapters: the folders also adapt {len(unused)} modules that the mixer does "
                f"not target (e.g. {unused[:3]}); those parts of the source LoRAs are not used. Widen target_modules "
                "to use them.",
                UserWarning,
            )
        self.__dict__["_pending_experts"] = (experts, keys)

    def _layer_kwargs(self, config: LoraMixerConfig, adapter_name: str, current_key: str) -> dict:
        pending = self.__dict__.get("_pending_experts")
        if pending is not None:
            experts: list[LoraExpert] = pending[0]
            for expert in experts:
                if current_key not in expert.modules:  # read_lora_experts checked this; a changed model is a bug
                    raise ValueError(
                        f"LoraMixerConfig.expert_adapters: {expert.path!r} has no LoRA for {current_key!r}."
                    )
            factors = [expert.modules[current_key] for expert in experts]
            return {
                "ranks": [A.shape[0] for A, _, _ in factors],
                "alphas": [alpha for _, _, alpha in factors],
                "experts": [(A, B) for A, B, _ in factors],
            }
        return {
            "ranks": _pattern_lookup(config.rank_pattern, current_key) or config.r,
            "alphas": _pattern_lookup(config.alpha_pattern, current_key) or config.lora_alpha,
        }

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            pending = self.__dict__.get("_pending_experts")
            if pending is not None:
                self._record_expert_shapes(self.peft_config[adapter_name], *pending)
        finally:
            self.__dict__.pop("_pending_experts", None)

    @staticmethod
    def _record_expert_shapes(config: LoraMixerConfig, experts: list[LoraExpert], keys: list[str]) -> None:
        """Write the loaded experts' ranks and α into the config (global values, and per-module ones where a folder
        differs from its own global values) so that a saved mixer rebuilds its shapes without the folders."""
        config.r = [expert.r for expert in experts]
        config.lora_alpha = [expert.lora_alpha for expert in experts]
        rank_pattern, alpha_pattern = {}, {}
        for key in keys:
            ranks = [expert.modules[key][0].shape[0] for expert in experts]
            alphas = [expert.modules[key][2] for expert in experts]
            if ranks != config.r:
                rank_pattern[key] = ranks
            if alphas != config.lora_alpha:
                alpha_pattern[key] = alphas
        config.rank_pattern = rank_pattern
        config.alpha_pattern = alpha_pattern
