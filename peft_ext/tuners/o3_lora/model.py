"""O3 model: injects ``O3LoraLinear`` layers, hands the per-call gate ``ood_weight=`` (or a gate scorer's output) to
them, adds the orthogonality loss to ``outputs.loss`` and manages the continual-unlearning requests.

Paper: *Practical Unlearning for Large Language Models* (O3, https://arxiv.org/abs/2407.10223). Official code:
https://github.com/GCYZSL/O3-LLM-UNLEARNING (``src/modeling_llama_hacked_o.py``: ``init_olora``, ``init_oodweight``,
the layer-averaged orthogonal loss).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .._shared.base import ExtModel
from .config import O3LoraConfig
from .layer import O3LoraLayer, O3LoraLinear

GateScorer = Callable[..., Any]
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def o3_layers(model: nn.Module) -> list[O3LoraLayer]:
    """All O3 layers inside ``model`` (a PeftModel, an O3LoraModel or any module holding them)."""
    return [m for m in model.modules() if isinstance(m, O3LoraLayer)]


def block_key(module_name: str) -> str:
    """The transformer block a module belongs to: its name up to the first numeric component
    (``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``); a name without one is its own block.

    Counts the adapted blocks for the ``block_mean`` reduction of the O3 orthogonality loss when the model's number of
    decoder layers is unknown (see ``O3LoraModel.orth_block_count``)."""
    match = _BLOCK.match(module_name)
    return match.group(1) if match else module_name


def normalize_ood_weight(value: Any, adapter_names, source: str = "ood_weight"):
    """Validate a gate ``w₁`` (``ood_weight=``) once per call and bring it to the form the layers read.

    Accepted: None; a number; a 0-d tensor (both become a Python float); a real tensor with one value per sample
    (``[batch]``) or per token (``[batch, tokens]``; the shape is checked in each layer against its input); or a dict
    adapter name -> one of those. Values must be finite and >= 0: the nominal range is [0, 1], but the official O3
    post-processing maps confident scores to 1.2, so values above 1 are accepted. Errors name ``ood_weight``."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = sorted(str(k) for k in value if k not in adapter_names)
        if unknown:
            raise ValueError(
                f"{source} keys must be adapter names of this model ({sorted(adapter_names)}); got {unknown}."
            )
        return {k: normalize_ood_weight(v, adapter_names, f"{source}[{k!r}]") for k, v in value.items()}
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise ValueError(
            f"{source} must be a number, a real tensor with one gate per sample ([batch]) or per token, or a dict "
            f"adapter name -> gate; got {type(value).__name__}."
        )
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{source} must be a real-valued tensor; got dtype {value.dtype}.")
        if value.dim() > 0:
            bad = (~torch.isfinite(value.float())) | (value < 0)
            if bool(bad.any()):
                raise ValueError(
                    f"{source} values must be finite and >= 0 (nominally in [0, 1]); "
                    f"got {value.flatten()[:8].tolist()}."
                )
            return value
        value = value.item()
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{source} must be finite and >= 0 (nominally in [0, 1]); got {value!r}.")
    return value


class O3LoraModel(ExtModel):
    """O3 tuner model.

    * Per-call gate: ``model(input_ids, ood_weight=w)`` with ``w`` a number, a tensor ``[batch]`` (or per token) or
      a dict adapter -> gate; w = 0 gives the base output exactly. In eval mode without ``ood_weight``, a scorer set
      with ``set_gate_scorer(fn)`` computes it from the inputs; otherwise the gate is 1 in training and the config's
      ``merge_gate`` in eval mode.
    * Orthogonality loss: with ``labels``, ``outputs.loss = CE + Σ_active orth_weight · o_loss`` where
      ``o_loss = reduce_modules ‖P·A_curᵀ‖_F²`` and ``P`` stacks the frozen snapshots and the detached A of
      ``prev_adapters``. It is computed from the parameters once per forward (in the hook that adds it to the loss),
      not inside the layers, so gradient checkpointing (re-entrant or not) and DistributedDataParallel see it whole.
    * Requests: ``snapshot_request`` freezes the current A (official "resume" workflow); the module-level
      ``start_new_request`` also supports one fresh adapter per request.

    Notes: ``generate(..., ood_weight=g)`` applies ``g`` at every decoding step, so a per-sample ``g`` must match the
    expanded batch (beams x return sequences); a per-token gate only fits a single forward. Merged adapters refuse
    per-call gates (the merged gate is ``merge_gate``). Under DistributedDataParallel every trainable parameter gets
    gradient in a training step at gate 1 (B from the task loss, A from it and the orthogonality term); training
    with ``ood_weight=0`` leaves the adapter unused and needs ``find_unused_parameters=True``. Snapshot buffers are
    identical on every rank, so DDP's buffer broadcast does not change them."""

    prefix: str = "o3_lora_"
    tuner_layer_cls = O3LoraLayer
    layer_cls = O3LoraLinear
    call_args = ("ood_weight",)
    # per-token weights continue their last value; [batch] weights follow num_beams
    token_inputs = {"ood_weight": "last"}
    has_aux_loss = True
    _o3_gate_scorer: Optional[GateScorer] = None

    # ------------------------------------------------------------------------------------------ gate
    def set_gate_scorer(self, scorer: Optional[GateScorer]) -> None:
        """Use ``scorer`` to compute the gate in eval mode when ``ood_weight`` is not passed; None removes it.

        ``scorer`` is called (under ``torch.no_grad()``) with exactly the arguments the base model's forward receives
        (``input_ids=``, ``attention_mask=``, ... for transformers models; write it as ``def scorer(input_ids=None,
        **kwargs)``) and returns what ``ood_weight=`` accepts: a number, a tensor ``[batch]`` or a dict adapter ->
        gate. It runs once per ``PeftModel`` call: in ``generate`` on the first forward (the whole prompt, after
        beam / num_return_sequences expansion) and that gate stays for every decoding step. The scorer is not saved
        with the adapter (the O3 unlearning recipe supplies an OOD detector).
        """
        if scorer is not None and not callable(scorer):
            raise ValueError(f"set_gate_scorer: scorer must be callable or None; got {type(scorer).__name__}.")
        self.__dict__["_o3_gate_scorer"] = scorer  # never registered as a submodule: not part of the state dict

    @property
    def gate_scorer(self) -> Optional[GateScorer]:
        """The gate scorer set with ``set_gate_scorer`` (None when there is none)."""
        return self._o3_gate_scorer

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapters = list(self.peft_config)
        ood = normalize_ood_weight(kwargs.get("ood_weight"), adapters)
        scorer = self._o3_gate_scorer if (ood is None and not self.model.training) else None
        if ood is not None or scorer is not None:
            merged = sorted({a for layer in self.tuner_layers() for a in layer.merged_adapters})
            if merged:
                what = "ood_weight" if ood is not None else "ood_weight from the gate scorer"
                raise ValueError(
                    f"{what} cannot be applied: O3 adapter(s) {merged} are merged into the base weights with the fixed "
                    f"gate merge_gate. Call unmerge_adapter() first, or do not pass ood_weight / clear the scorer with "
                    "set_gate_scorer(None)."
                )
        kwargs = {**kwargs, "ood_weight": ood}
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            handle = None
            if scorer is not None:
                done = []

                def score(module, f_args, f_kwargs):
                    if done:  # later forwards of the same call (generate's decoding steps) keep the first gate
                        return None
                    done.append(True)
                    with torch.no_grad():
                        raw = scorer(*f_args, **f_kwargs)
                    gate = normalize_ood_weight(raw, adapters, source="ood_weight (returned by the gate scorer)")
                    for layer in self.tuner_layers():
                        layer.call_inputs = {**layer.call_inputs, "ood_weight": gate}
                    return None

                handle = self.model.register_forward_pre_hook(score, with_kwargs=True)
            try:
                yield
            finally:
                if handle is not None:
                    handle.remove()

    # ------------------------------------------------------------------------------------------ loss
    def _named_o3_layers(self) -> list[tuple[str, O3LoraLayer]]:
        cache = self.__dict__.get("_o3_layer_cache")
        if cache is None:
            cache = [(n, m) for n, m in self.model.named_modules() if isinstance(m, O3LoraLayer)]
            self.__dict__["_o3_layer_cache"] = cache
        return cache

    def _invalidate_layer_cache(self) -> None:
        self.__dict__.pop("_o3_layer_cache", None)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key, **optional_kwargs)
        # A new nn.Module starts in training mode; the gate default (1 in training, merge_gate in eval) and dropout
        # must follow the mode of the module it wraps, e.g. a base model loaded in eval mode.
        getattr(parent, target_name).train(target.training)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        self._invalidate_layer_cache()
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._invalidate_layer_cache()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._invalidate_layer_cache()

    def _check_prev_adapters(self, adapter_name: str) -> None:
        """A ``prev_adapters`` name that is not another adapter of this model is an error in training; in eval mode
        (e.g. a loss computed for evaluation after loading only the latest adapter) it is a warning and is skipped."""
        for prev in self.peft_config[adapter_name].prev_adapters:
            if prev == adapter_name or prev not in self.peft_config:
                message = (
                    f"O3LoraConfig.prev_adapters of adapter {adapter_name!r} names {prev!r}, which is "
                    + ("the adapter itself" if prev == adapter_name else "not an adapter of this model")
                    + f"; allowed: other adapters of this model ({sorted(set(self.peft_config) - {adapter_name})}). "
                    "Load it first (load_adapter), or freeze it into this adapter with snapshot_request(source=...)."
                )
                if self.model.training:
                    raise ValueError(message)
                warnings.warn(message + " Skipped in eval mode.")

    def orthogonality_loss(self, adapter_name: Optional[str] = None) -> Optional[torch.Tensor]:
        """The unweighted O3 orthogonality loss of ``adapter_name`` (default: the single active adapter), reduced
        over modules by its config's ``orth_reduction``: ``Σ_modules Σ_j ‖A_j^prev · A_curᵀ‖_F² / divisor`` in fp32
        (``block_mean``: the divisor is ``orth_block_count``, every decoder layer of the model as in the official
        code — the paper does not say).
        Gradient reaches only the adapter's own A. None when the adapter has no earlier request to be orthogonal to.
        """
        if adapter_name is None:
            active = list(self.active_adapters)
            if len(active) != 1:
                raise ValueError(f"orthogonality_loss: several adapters are active ({active}); pass adapter_name.")
            adapter_name = active[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"orthogonality_loss: {adapter_name!r} is not an adapter of this model.")
        self._check_prev_adapters(adapter_name)
        config = self.peft_config[adapter_name]
        layers = [(n, layer) for n, layer in self._named_o3_layers() if adapter_name in layer.o3_lora_down]
        groups: dict = {}
        for _, layer in layers:
            prev = layer.orth_rows(adapter_name)
            if prev is None:
                continue
            A = layer.o3_lora_down[adapter_name].weight
            key = (tuple(prev.shape), tuple(A.shape), A.device)
            entry = groups.setdefault(key, ([], []))
            entry[0].append(prev)
            entry[1].append(A)
        if not groups:
            return None
        terms = []
        for prevs, As in groups.values():  # one batched matmul per distinct shape (q/k/v/o share one, etc.)
            if len(As) == 1:
                terms.append((prevs[0].float() @ As[0].float().T).pow(2).sum())
            else:
                P = torch.stack([p.float() for p in prevs])
                A = torch.stack([a.float() for a in As])
                terms.append(torch.bmm(P, A.transpose(1, 2)).pow(2).sum())
        device = terms[0].device
        total = torch.stack([t.to(device) for t in terms]).sum()
        if config.orth_reduction == "module_mean":
            total = total / len(layers)
        elif config.orth_reduction == "block_mean":
            total = total / self.orth_block_count(adapter_name)
        return total

    def orth_block_count(self, adapter_name: str) -> int:
        """The divisor of the ``block_mean`` orthogonality loss: the model's number of decoder layers
        (``config.num_hidden_layers``) — the official code sums the per-layer terms and divides by every decoder layer
        it runs, adapted or not (``layers_to_transform`` does not shrink it) — or the number of adapted blocks when the
        model does not say or has more adapted blocks than that (e.g. encoder–decoder models, modules outside the layer
        stack)."""
        adapted = len({block_key(n) for n, layer in self._named_o3_layers() if adapter_name in layer.o3_lora_down})
        layers = getattr(getattr(self.model, "config", None), "num_hidden_layers", None)
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            return max(adapted, 1)
        return max(layers, adapted)

    def aux_loss(self) -> Optional[torch.Tensor]:
        """``Σ_active orth_weight · orthogonality_loss`` (plus any term a layer recorded), added to ``outputs.loss``
        when labels are passed. Computed from the current parameters, whatever the grad mode."""
        total = super().aux_loss()
        for name in self.active_adapters:
            weight = self.peft_config[name].orth_weight
            if not weight:
                continue
            loss = self.orthogonality_loss(name)
            if loss is None:
                continue
            total = weight * loss if total is None else total + weight * loss.to(total.device)
        return total

    # ------------------------------------------------------------------------------------------ requests
    def _single_active(self, fn: str) -> str:
        active = list(self.active_adapters)
        if len(active) != 1:
            raise ValueError(f"{fn}: several adapters are active ({active}); pass adapter_name.")
        return active[0]

    def snapshot_request(
        self, adapter_name: Optional[str] = None, source: Optional[Union[str, os.PathLike]] = None
    ) -> int:
        """Freeze A matrices of an earlier request into the snapshot buffer of ``adapter_name`` (default: the active
        adapter) and record the rank in its config (so ``save_pretrained`` keeps the snapshot); returns the number of
        snapshots. ``source``: None (the adapter's own current A — the official workflow: call this when a request
        ends, then keep training the same LoRA on the next request), the name of another O3 adapter of this model,
        or a saved adapter folder / ``.safetensors`` file (O3 ``o3_lora_down`` or PEFT LoRA ``lora_A`` weights, as
        the official scripts load earlier requests' LoRA folders). Modules the source did not adapt get zero rows.
        """
        name = adapter_name or self._single_active("snapshot_request")
        if name not in self.peft_config:
            raise ValueError(f"snapshot_request: adapter_name {name!r} is not an adapter of this model.")
        layers = [(n, layer) for n, layer in self._named_o3_layers() if name in layer.o3_lora_down]
        if source is None or source == name or (isinstance(source, str) and source in self.peft_config):
            src = name if source is None else source
            if not isinstance(self.peft_config[src], O3LoraConfig):
                raise ValueError(f"snapshot_request: source adapter {src!r} is not an O3 adapter.")
            rank = self.peft_config[src].r
            rows = {n: layer.o3_lora_down[src].weight for n, layer in layers if src in layer.o3_lora_down}
        else:
            rows, rank = _load_down_weights(source, {n for n, _ in layers})
        for n, layer in layers:
            weight = layer.o3_lora_down[name].weight
            layer.append_snapshot(name, rows[n] if n in rows else weight.new_zeros(rank, layer.in_features))
        self.peft_config[name].snapshot_ranks.append(int(rank))
        return len(self.peft_config[name].snapshot_ranks)


def _load_down_weights(source, module_names: set[str]) -> tuple[dict[str, torch.Tensor], int]:
    """The A matrices of a saved adapter, keyed by module name relative to the base model, and their common rank."""
    from safetensors.torch import load_file

    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(
            f"snapshot_request: source {os.fspath(source)!r} is neither an adapter of this model nor a saved adapter "
            "(a folder with adapter_model.safetensors, or a .safetensors file)."
        )
    rows, ranks = {}, set()
    for key, tensor in load_file(path).items():
        for suffix in (".o3_lora_down.weight", ".lora_A.weight"):
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix("base_model.model.")
                if module in module_names:
                    rows[module] = tensor
                    ranks.add(tensor.shape[0])
    if not rows:
        raise ValueError(
            f"snapshot_request: {path!r} holds no o3_lora_down / lora_A weight of a module this adapter adapts."
        )
    if len(ranks) != 1:
        raise ValueError(f"snapshot_request: the A matrices in {path!r} have different ranks {sorted(ranks)}.")
    missing = len(module_names) - len(rows)
    if missing:
        warnings.warn(f"snapshot_request: {path!r} has no A for {missing} adapted module(s); they get zero rows.")
    return rows, ranks.pop()


def _tuner_of(model: nn.Module) -> O3LoraModel:
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, O3LoraModel):
        raise ValueError(f"Expected a PeftModel with O3 adapters or an O3LoraModel; got {type(model).__name__}.")
    return tuner


def snapshot_request(model: nn.Module, adapter_name: Optional[str] = None, source=None) -> int:
    """Freeze an earlier request's A into ``adapter_name``'s snapshots; see ``O3LoraModel.snapshot_request``."""
    return _tuner_of(model).snapshot_request(adapter_name, source)


def orthogonality_loss(model: nn.Module, adapter_name: Optional[str] = None) -> Optional[torch.Tensor]:
    """The unweighted O3 orthogonality loss; see ``O3LoraModel.orthogonality_loss``."""
    return _tuner_of(model).orthogonality_loss(adapter_name)


def set_gate_scorer(model: nn.Module, scorer: Optional[GateScorer]) -> None:
    """Set the gate scorer used in eval mode when ``ood_weight`` is not passed; see ``O3LoraModel.set_gate_scorer``."""
    _tuner_of(model).set_gate_scorer(scorer)


def start_new_request(
    model: nn.Module,
    adapter_name: Optional[str] = None,
    new_adapter_name: Optional[str] = None,
    mode: Optional[str] = None,
    **config_overrides: Any,
) -> str:
    """Begin the next unlearning request; returns the name of the adapter that trains on it.

    ``mode`` (default: the adapter config's ``request_mode``, itself "resume" by default):

    * ``"resume"`` — the official scripts' workflow (each request resumes from the previous adapter): the current A
      of ``adapter_name`` is frozen into its own snapshots and the same adapter keeps training, so at the start of
      the request ``o_loss = ‖A·Aᵀ‖_F²`` is large and pushes A away from every earlier request's A.
    * ``"new_adapter"`` — one LoRA per request: a fresh adapter ``new_adapter_name`` (default
      ``"<adapter>_request<k>"``) is added with the same config (plus ``config_overrides``), its snapshots hold the
      earlier adapter's snapshots and its current A, and it becomes the active (trainable) adapter. To serve all
      requests, activate them together (``model.base_model.set_adapter([...])``) and pass one gate per adapter,
      ``ood_weight={"default": w1, "default_request2": w2}``.

    The paper does not say which of the two it means; the official code (``train_unlearn_lora.sh``) resumes. ``model``
    is a PeftModel (use it
    for "new_adapter", so PEFT's own active-adapter bookkeeping follows) or an O3LoraModel."""
    tuner = _tuner_of(model)
    name = adapter_name or tuner._single_active("start_new_request")
    if name not in tuner.peft_config:
        raise ValueError(f"start_new_request: adapter_name {name!r} is not an adapter of this model.")
    config = tuner.peft_config[name]
    mode = mode or config.request_mode
    if mode not in ("resume", "new_adapter"):
        raise ValueError(f"start_new_request: mode must be 'resume' or 'new_adapter'; got {mode!r}.")
    if mode == "resume":
        if new_adapter_name is not None or config_overrides:
            raise ValueError("start_new_request: new_adapter_name / config overrides only apply to mode='new_adapter'.")
        tuner.snapshot_request(name)
        return name
    new_name = new_adapter_name or f"{name}_request{len(config.snapshot_ranks) + 2}"
    if new_name in tuner.peft_config:
        raise ValueError(f"start_new_request: an adapter named {new_name!r} already exists.")
    changes = {"inference_mode": False, "snapshot_ranks": list(config.snapshot_ranks) + [config.r], **config_overrides}
    changes["prev_adapters"] = [p for p in changes.get("prev_adapters", config.prev_adapters) if p != new_name]
    new_config = dataclasses.replace(config, **changes)  # re-runs the config's validation
    if hasattr(model, "add_adapter") and model is not tuner:
        model.add_adapter(new_name, new_config)
    else:
        tuner.peft_config[new_name] = new_config
        tuner.inject_adapter(tuner.model, new_name)
    with torch.no_grad():
        for layer in o3_layers(tuner.model):
            if new_name not in layer.o3_lora_snapshots:
                continue
            target = layer.o3_lora_snapshots[new_name]
            if name in layer.o3_lora_down:
                parts = [layer.o3_lora_down[name].weight]
                if name in layer.o3_lora_snapshots:
                    parts.insert(0, layer.o3_lora_snapshots[name])
                rows = torch.cat([p.detach().to(target) for p in parts], dim=0)
                target.copy_(rows)
            else:
                target.zero_()
    model.set_adapter(new_name)
    return new_name


__all__ = [
    "O3LoraModel",
    "block_key",
    "normalize_ood_weight",
    "o3_layers",
    "orthogonality_loss",
    "set_gate_scorer",
    "snapshot_request",
    "start_new_request",
]
