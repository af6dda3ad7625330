"""Prompt-aware LoRA model: the prompt pass, the shared prompt adapter (pooling network) and the stage switch.

Paper: *WavLLM: Towards Robust and Adaptive Speech Large Language Model* (https://arxiv.org/abs/2404.00656).
Official code: https://github.com/microsoft/SpeechT5 (``WavLLM/wavllm/models/llama.py``: ``LLAMA.forward_generate``,
``scale_fc_1`` / ``scale_fc_2`` / ``scale_weight_attention``, ``Attention_LoRA``).
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._shared.base import ExtModel, bad_value
from .._shared.routing import check_route_input
from .config import PromptAwareLoraConfig
from .layer import PromptAwareLoraLayer, PromptAwareLoraLinear


class _PromptCaptured(Exception):
    """Raised by the capture hooks to stop the prompt pass once every prompt representation is captured."""


class PromptPooler(nn.Module):
    """WavLLM's prompt adapter (official ``scale_fc_1``, ``scale_fc_2``, ``scale_weight_attention`` in
    ``WavLLM/wavllm/models/llama.py``):
    ``S = fc2(GELU(fc1(H)))``, ``a = softmax_T(score(S))`` over the valid prompt tokens, returns ``p = Σ_t a_t S_t``.

    ``score`` has no bias: softmax is shift-invariant, so the official ``Linear(d, 1)`` bias never changes the output
    and never receives a gradient. Padding positions (``valid`` False) are left out of the softmax (the official code
    runs unpadded prompts)."""

    def __init__(self, hidden_size: int, adapter_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, adapter_hidden)
        self.fc2 = nn.Linear(adapter_hidden, hidden_size)
        self.score = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.gelu(self.fc1(hidden)))
        logits = self.score(s).squeeze(-1).float().masked_fill(~valid, float("-inf"))
        weights = torch.softmax(logits, dim=-1).to(s.dtype)
        return (weights.unsqueeze(-1) * s).sum(dim=-2)


def prompt_aware_lora_layers(model: nn.Module) -> list[PromptAwareLoraLayer]:
    """All prompt-aware LoRA layers inside ``model`` (a PeftModel, a PromptAwareLoraModel or any module)."""
    return [m for m in model.modules() if isinstance(m, PromptAwareLoraLayer)]


def set_stage(model: nn.Module, stage: int, adapter_name: Optional[str] = None) -> None:
    """Switch WavLLM's curriculum stage of ``adapter_name`` (default: the active adapters) on ``model`` (a PeftModel
    or PromptAwareLoraModel): 1 = plain LoRA with α/r, 2 = prompt-aware scales.
    The stage is recorded in the adapter's config, so ``save_pretrained`` keeps it. Official code:
    ``WavLLM/``, ``second_stage_update_scale``."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, PromptAwareLoraModel):
        tuner = model
    if not isinstance(tuner, PromptAwareLoraModel):
        raise ValueError("set_stage: the model has no prompt-aware LoRA adapter.")
    tuner.set_stage(stage, adapter_name)


def _cache_length(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class PromptAwareLoraModel(ExtModel):
    """Prompt-aware LoRA tuner model (WavLLM).

    Every forward through ``PeftModel`` (and every ``generate``) first runs a prompt pass: the frozen model with the
    LoRA switched off, under ``no_grad``, over the prompt tokens only (``prompt_mask=`` picks them per sample; they
    are gathered, left-aligned, into their own batch, like the official prompt-only pass), stopped as soon as the
    prompt representation ``H`` (by default the last block's output, before the final norm) is captured. The shared
    adapter ``prompt_aware_lora_pool[adapter]`` pools ``H`` into ``p``, which the layers turn into their scales; the
    adapter gets its gradient through them. A stage-2 forward without ``prompt_mask=`` raises by default
    (``no_prompt='error'``); opt in to α/r (``'fixed'``) or to pooling over the whole (attended) input
    (``'whole_input'``, not causal: later tokens change earlier positions' scales). A forward that continues a
    non-empty KV cache keeps the scales of the call that started it, and ignores a ``prompt_mask`` it is given
    (``generate`` computes them once, as the official ``forward_generate`` at ``start_pos == 0``). Models without a
    token axis (hidden states ``[rows, d]``) pool over all rows of the call: one prompt, one scale vector for the call.
    Use non-reentrant gradient checkpointing."""

    prefix: str = "prompt_aware_lora_"
    tuner_layer_cls = PromptAwareLoraLayer
    layer_cls = PromptAwareLoraLinear
    call_args = ("prompt_mask",)
    # the prompt pooler lives on the tuner (shared by every layer) and the prompt pass runs from its forward hooks:
    # peft.inject_adapter_in_model, which keeps only the injected layers, is refused with PEFT's shared-state error
    uses_shared_state = True

    # --------------------------------------------------------------- saving / loading
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of a model key: also drops the adapter name inside the pooler's keys
        (``prompt_aware_lora_pool.<adapter>.fc1.weight`` -> ``prompt_aware_lora_pool.fc1.weight``), which PEFT's
        default (adapter name second to last) misses, so an adapter loads under any name into its own pooler."""
        marker = f".prompt_aware_lora_pool.{adapter_name}."
        if marker in key:
            return key.replace(marker, ".prompt_aware_lora_pool.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # files written by peft-ext 0.1.0 kept the saving adapter's name in the pooler keys: drop it
        legacy = re.compile(r"\.prompt_aware_lora_pool\.[^.]+\.(fc1|fc2|score)\.")
        state_dict = {legacy.sub(r".prompt_aware_lora_pool.\1.", k): v for k, v in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # --------------------------------------------------------------- injection
    def _model_hidden_size(self, model: nn.Module) -> Optional[int]:
        cfg = getattr(model, "config", None)
        if cfg is None:
            return None
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        value = getattr(cfg, "hidden_size", None)
        return int(value) if isinstance(value, int) else None

    def _resolve_source(self, model: nn.Module, config: PromptAwareLoraConfig) -> tuple[str, str, int]:
        """(kind 'output' | 'input', module name, width d) of the prompt representation for ``config``."""
        if config.hidden_module is not None:
            wanted = config.hidden_module
            names = [n for n, _ in model.named_modules() if n == wanted or n.endswith("." + wanted)]
            if not names:
                raise bad_value(config, "hidden_module", config.hidden_module,
                                "the name (or suffix) of a module of the model")
            module = model.get_submodule(names[-1])
            d = config.hidden_size or self._model_hidden_size(model) or getattr(module, "out_features", None)
            if d is None:
                raise bad_value(config, "hidden_size", None,
                                "set: the width of hidden_module's output could not be found")
            return "output", names[-1], int(d)
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        d = config.hidden_size or self._model_hidden_size(model)
        if lists and d is not None:  # a model without a config giving hidden_size: the last adapted layer's input
            name, blocks = lists[-1]
            return "output", f"{name}.{len(blocks) - 1}" if name else str(len(blocks) - 1), int(d)
        targets = [(n, m) for n, m in model.named_modules() if n and self._check_target_module_exists(config, n)]
        for n, m in targets:  # a non-linear target: the error naming the method, before the pooler is sized on it
            if not isinstance(m, self.tuner_layer_cls) and ".base_layer" not in n:
                self._check_layer_type(config, m, n)
        targets = [(n, m) for n, m in targets if getattr(m, "in_features", None) is not None]
        if not targets:
            raise bad_value(config, "hidden_module", None, "set: the model has no block list and no adapted layer")
        name, module = targets[-1]
        return "input", name, int(config.hidden_size or module.in_features)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """Create the adapter's prompt pooler (model level, shared by all layers), then inject the layers."""
        self._add_pool(model, self.peft_config[adapter_name], adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._sync_pool_grad(inference_mode=self.peft_config[adapter_name].inference_mode)

    def _add_pool(self, model: nn.Module, config: PromptAwareLoraConfig, adapter_name: str) -> None:
        if "prompt_aware_lora_pool" not in self._modules:
            self.prompt_aware_lora_pool = nn.ModuleDict()
            self._sources: dict = {}
            self._pending_prompt_mask = None
            self._in_prompt_pass = False
            self._use_cache_arg: Optional[bool] = None
        kind, name, d = self._resolve_source(model, config)
        self._sources[adapter_name] = (kind, name, d)
        pool = PromptPooler(d, config.adapter_hidden or max(1, d // 4))
        if config.init_scale and config.scale_mode == "output":  # c starts at min(α/r, clamp) for every prompt
            nn.init.zeros_(pool.fc2.weight)
            nn.init.constant_(pool.fc2.bias, min(config.lora_alpha / config.r, config.clamp))
        param = next(model.parameters(), None)
        # pool parameters on meta (low_cpu_mem_usage): the adapter file fills them
        if param is not None and not any(p.is_meta for p in pool.parameters()):
            # the base model's device and float dtype, like the layers' weights; _cast_adapter_dtype upcasts it
            pool.to(param.device, dtype=param.dtype if param.is_floating_point() else None)
        self.prompt_aware_lora_pool[adapter_name] = pool

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's upcast of float16 / bfloat16 adapter weights to float32 (autocast_adapter_dtype), also for the
        pooler, which PEFT's cast does not see (it lives on the tuner, not in a tuner layer)."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        pools = self._modules.get("prompt_aware_lora_pool")
        pool = pools[adapter_name] if pools is not None and adapter_name in pools else None
        if autocast_adapter_dtype and pool is not None:
            for p in pool.parameters():
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()

    def _layer_kwargs(self, config: PromptAwareLoraConfig, adapter_name: str, current_key: str) -> dict:
        return {"hidden_size": self._sources[adapter_name][2]}

    def _sync_pool_grad(self, inference_mode: bool = False) -> None:
        pools = self._modules.get("prompt_aware_lora_pool")
        if pools is None:
            return
        active = set(self.active_adapters)
        for name, pool in pools.items():
            cfg = self.peft_config.get(name)
            train = name in active and not inference_mode and cfg is not None and cfg.stage == 2
            pool.requires_grad_(train)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_pool_grad(inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        pools = self._modules.get("prompt_aware_lora_pool")
        if pools is not None and adapter_name in pools:
            del pools[adapter_name]
            self._sources.pop(adapter_name, None)
        for layer in self.tuner_layers():
            layer.prompt_vec.pop(adapter_name, None)
        self._sync_pool_grad()

    def set_stage(self, stage: int, adapter_name: Optional[str] = None) -> None:
        """Switch the curriculum stage (1: LoRA with α/r; 2: prompt-aware scales) of ``adapter_name`` (default: the
        active adapters); recorded in the config so that ``save_pretrained`` keeps it."""
        if stage not in (1, 2) or isinstance(stage, bool):
            raise bad_value("set_stage", "stage", stage, "1 or 2")
        names = [adapter_name] if adapter_name else list(self.active_adapters)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"set_stage: adapter_name {name!r} is not a prompt-aware LoRA adapter of this model.")
            cfg = self.peft_config[name]
            cfg.stage = stage
            for layer in self.tuner_layers():
                if name in layer.stage:
                    layer.set_stage(name, stage, cfg.freeze_lora_in_stage2)
        self._sync_pool_grad()

    # --------------------------------------------------------------- prompt pass
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            self._pending_prompt_mask = kwargs.get("prompt_mask")
            handle = self.model.register_forward_pre_hook(self._prompt_pre_hook, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()
                self._pending_prompt_mask = None

    def _stage2_adapters(self) -> list[str]:
        """The stage-2 adapters active on the model or on any layer (PEFT activates several adapters at once
        layer by layer, e.g. ``layer.set_adapter([...])``, without changing the model's active adapter)."""
        pools = self._modules.get("prompt_aware_lora_pool") or {}
        active = list(self.active_adapters)
        for layer in self.tuner_layers():
            active += [a for a in layer.active_adapters if a not in active]
        return [a for a in active if a in pools and self.peft_config[a].stage == 2]

    def _prompt_pre_hook(self, module, args, kwargs):
        if self._in_prompt_pass:
            return None
        adapters = self._stage2_adapters()
        if not adapters:
            return None
        layers = list(self.tuner_layers())
        prompt_mask = self._pending_prompt_mask
        if _cache_length(kwargs.get("past_key_values")) > 0:
            if all(a in layer.prompt_vec for layer in layers for a in adapters if a in layer.stage):
                return None  # continuing a KV cache: keep the scales of the call that started it
        if prompt_mask is None:
            refuse = [a for a in adapters if self.peft_config[a].no_prompt == "error"]
            if refuse:
                raise ValueError(
                    f"prompt_aware_lora: adapter(s) {refuse} are in stage 2 and this forward has no prompt_mask=. Pass "
                    "prompt_mask= (bool [batch, tokens], True on the instruction tokens; WavLLM pools the instruction "
                    "only), or set PromptAwareLoraConfig.no_prompt to 'fixed' (the plain scale α/r for such calls) or "
                    "'whole_input' (pools over every input token: not causal, later tokens and labels change earlier "
                    "positions' logits)."
                )
            fixed = [a for a in adapters if self.peft_config[a].no_prompt == "fixed"]
            for layer in layers:
                for a in fixed:
                    layer.prompt_vec[a] = None
            adapters = [a for a in adapters if a not in fixed]
            if not adapters:
                return None
        hidden = self._run_prompt_pass(adapters, args, kwargs, prompt_mask)
        for a in adapters:
            kind, name, _ = self._sources[a]
            h, valid = hidden[(kind, name)]
            pool = self.prompt_aware_lora_pool[a]
            p = pool(h.to(pool.fc1.weight.dtype), valid)
            for layer in layers:
                if a in layer.stage:
                    layer.prompt_vec[a] = p
        return None

    def _accepts_use_cache(self) -> bool:
        if self._use_cache_arg is None:
            try:
                params = inspect.signature(self.model.forward).parameters
                self._use_cache_arg = "use_cache" in params
            except (TypeError, ValueError):
                self._use_cache_arg = False
        return self._use_cache_arg

    def _prompt_inputs(self, args, kwargs, prompt_mask):
        """(call args, call kwargs, valid mask or None, prompt mask for generic models) of the prompt pass."""
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and not first.is_floating_point() and first.dim() == 2:
                input_ids = first  # an HF model called positionally with input_ids
            else:  # a generic model (e.g. model(X=...)): run the same call, pool over the prompt positions of H
                return args, kwargs, None, prompt_mask
        source = input_ids if input_ids is not None else embeds
        key = "input_ids" if input_ids is not None else "inputs_embeds"
        extra = {"use_cache": False} if self._accepts_use_cache() else {}
        attention = kwargs.get("attention_mask")
        if prompt_mask is None:
            call = {key: source, **extra}
            if attention is not None:
                call["attention_mask"] = attention
            if kwargs.get("position_ids") is not None:
                call["position_ids"] = kwargs["position_ids"]
            if attention is not None and attention.dim() == 2:
                valid = attention.bool()
            else:
                valid = torch.ones(source.shape[:2], dtype=torch.bool, device=source.device)
            return (), call, valid, None
        ref = source if key == "inputs_embeds" else source.unsqueeze(-1)
        mask = check_route_input("prompt_mask", prompt_mask, ref, kind="bool")
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("prompt_mask must mark at least one prompt token in every sample.")
        width = int(lengths.max())
        # prompt tokens first, in order
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
        if key == "input_ids":
            gathered = torch.gather(source, 1, order)
        else:
            gathered = torch.gather(source, 1, order.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
        valid = torch.arange(width, device=source.device).unsqueeze(0) < lengths.unsqueeze(1)
        return (), {key: gathered, "attention_mask": valid.long(), **extra}, valid, None

    def _run_prompt_pass(self, adapters, args, kwargs, prompt_mask) -> dict:
        """Run the frozen model without LoRA on the prompt and return ``{(kind, module): (H [B, T, d], valid)}``."""
        call_args, call_kwargs, valid, generic_mask = self._prompt_inputs(args, kwargs, prompt_mask)
        wanted = {(self._sources[a][0], self._sources[a][1]) for a in adapters}
        captured: dict = {}
        handles = []

        def store(key, value):
            captured[key] = value[0] if isinstance(value, (tuple, list)) else value
            if len(captured) == len(wanted):
                raise _PromptCaptured

        for kind, name in wanted:
            target = self.model.get_submodule(name)
            if kind == "output":
                handles.append(target.register_forward_hook(lambda m, a, out, key=(kind, name): store(key, out)))
            else:
                handles.append(target.register_forward_pre_hook(lambda m, a, key=(kind, name): store(key, a)))
        layers = list(self.tuner_layers())
        for layer in layers:
            layer._prompt_pass = True
        self._in_prompt_pass = True
        try:
            with torch.no_grad():
                self.model(*call_args, **call_kwargs)
        except _PromptCaptured:
            pass
        finally:
            self._in_prompt_pass = False
            for layer in layers:
                layer._prompt_pass = False
            for handle in handles:
                handle.remove()
        missing = wanted - set(captured)
        if missing:
            raise RuntimeError(f"prompt_aware_lora: the prompt pass never reached {sorted(n for _, n in missing)}.")
        out = {}
        for key, h in captured.items():
            h = h.detach()
            if h.dim() == 2:  # no token axis: the rows of the call form one prompt
                v = torch.ones(1, h.shape[0], dtype=torch.bool, device=h.device)
                if generic_mask is not None:
                    v = check_route_input("prompt_mask", generic_mask, h, kind="bool").reshape(1, -1)
                out[key] = (h.unsqueeze(0), v)
                continue
            if valid is not None:
                v = valid
            elif generic_mask is not None:
                v = check_route_input("prompt_mask", generic_mask, h, kind="bool")
            else:
                v = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            if tuple(v.shape) != tuple(h.shape[:2]):
                raise ValueError(
                    f"prompt_aware_lora: the prompt states have shape {tuple(h.shape)}, which does not match the "
                    f"prompt mask {tuple(v.shape)}; set hidden_module to a module whose output is [batch, tokens, d]."
                )
            out[key] = (h, v)
        return out
