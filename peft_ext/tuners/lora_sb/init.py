"""LoRA-SB gradient initialisation: estimate the first full-fine-tuning update and put its best rank-r approximation
into the LoRA-XS factors.

Paper: *Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning*
(LoRA-SB, https://arxiv.org/abs/2411.19557); official code https://github.com/RaghavSinghal10/lora-sb
(``utils/gradient_utils.py``: ``estimate_and_process_grads_torch``; ``utils/initialization_utils.py``:
``find_and_initialize_grad``).

Typical use with a plain ``transformers.Trainer``::

    model = get_peft_model(base, LoraSBConfig(r=24, target_modules=[...]))      # init="gradient" (default)
    lora_sb_init(model, train_dataloader, num_samples=2, lr=1e-3, warmup_ratio=0.06, total_steps=steps)
    Trainer(model=model, args=args, train_dataset=...).train()

or ``lora_sb_init_from_trainer(trainer)``, which takes the dataloader, learning rate, warm-up and step count from the
trainer. Differences from the official code: the gradient is taken on the PeftModel with its adapters disabled (the
official code uses the model before ``get_peft_model``; identical values), only the targeted base weights require
gradients during the estimate (the official code computes every parameter's gradient), each weight's gradient is
moved to the CPU as soon as it is accumulated (``register_post_accumulate_grad_hook``), and the SVD uses a local
generator instead of the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .layer import LoraSBLayer

_PEFT_PREFIX = "base_model.model."


def _clean_name(name: str) -> str:
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def _named_lora_sb_layers(model: nn.Module, adapter_name: Optional[str]) -> tuple[str, list[tuple[str, LoraSBLayer]]]:
    layers = [(_clean_name(n), m) for n, m in model.named_modules() if isinstance(m, LoraSBLayer)]
    if not layers:
        return adapter_name or "default", []
    if adapter_name is None:
        active = layers[0][1].active_adapters
        if not active:
            raise ValueError("lora_sb_init: the model has no active LoRA-SB adapter; pass adapter_name.")
        adapter_name = active[0]
    layers = [(n, m) for n, m in layers if adapter_name in m.r]
    if not layers:
        raise ValueError(f"lora_sb_init: adapter_name {adapter_name!r} is not a LoRA-SB adapter of this model.")
    return adapter_name, layers


def effective_lr(
    lr: float, warmup_ratio: Optional[float] = None, total_steps: Optional[int] = None,
    warmup_steps: Optional[float] = None,
) -> float:
    """The official code's effective step size of the estimated update: ``lr / (warmup_ratio·total_steps)``
    (= ``lr / warmup_steps``), the learning rate at the first step of a linear warm-up. Without a warm-up: ``lr``."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lora_sb_init: lr must be a number > 0 (the training learning rate); got {lr!r}.")
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError("lora_sb_init: pass warmup_ratio (with total_steps) or warmup_steps, not both.")
    if warmup_ratio is not None:
        if not isinstance(warmup_ratio, (int, float)) or not 0 <= warmup_ratio <= 1:
            raise ValueError(f"lora_sb_init: warmup_ratio must be a number in [0, 1]; got {warmup_ratio!r}.")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(
                f"lora_sb_init: total_steps must be an integer >= 1 when warmup_ratio is given; got {total_steps!r}."
            )
        warmup_steps = warmup_ratio * total_steps
    if warmup_steps is None or warmup_steps == 0:
        return float(lr)
    if not isinstance(warmup_steps, (int, float)) or warmup_steps < 0:
        raise ValueError(f"lora_sb_init: warmup_steps must be a number >= 0; got {warmup_steps!r}.")
    return float(lr) / float(warmup_steps)


@contextmanager
def _only_base_weights_require_grad(weights: Iterable[nn.Parameter], model: nn.Module, layers: list[LoraSBLayer]):
    """Within the block: adapters disabled, every parameter frozen except ``weights``; all restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    disabled = [(layer, layer._disable_adapters) for layer in layers]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for layer, _ in disabled:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in disabled:
            layer._disable_adapters = flag
        for p, flag in flags:
            p.requires_grad_(flag)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return v.shape[0]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    raise ValueError("lora_sb_init: cannot tell the batch size of a batch; use dict batches of tensors.")


def _take(batch: Any, n: int, size: int, device: torch.device) -> Any:
    def cut(v):
        if isinstance(v, torch.Tensor):
            v = v[:n] if v.dim() > 0 and v.shape[0] == size else v
            return v.to(device)
        return v

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise ValueError("lora_sb_init: batches must be dicts of model inputs with labels, or pass loss_fn.")
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None and isinstance(out, tuple):
        loss = out[0]
    if loss is None:
        raise ValueError("lora_sb_init: the model returned no loss; include 'labels' in the batches or pass loss_fn.")
    return loss


def estimate_gradients(
    model: nn.Module,
    dataloader: Iterable,
    num_samples: int = 2,
    adapter_name: Optional[str] = None,
    target_modules: Optional[list[str]] = None,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    train_mode: bool = True,
) -> dict[str, torch.Tensor]:
    """``G = Σ_batches ∇_W (loss / batch_size)`` over the first ``num_samples`` examples, for the base weight W of
    every LoRA-SB layer (or, on a model without LoRA-SB layers, of the ``nn.Linear`` modules named by
    ``target_modules``), as float32 CPU tensors keyed by module name (``model.layers.0.self_attn.q_proj``, the same
    on the base model and on the PeftModel); the official code's ``estimate_and_process_grads_torch``.

    Adapters are disabled while the gradient is taken, so it is the base model's; only the targeted base weights
    require gradients (all flags are restored afterwards, other parameters' ``.grad`` are left untouched), and each
    weight's gradient is moved to the CPU as soon as it is accumulated. ``train_mode=True`` runs the model in training
    mode like the official code (dropout active). Under ``torch.distributed`` the sums are all-reduced (SUM), as in
    the official code. Quantized (bitsandbytes) base weights have no float gradient: estimate on an unquantized copy
    and pass the result as ``grads=`` to ``lora_sb_init``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"lora_sb_init: num_samples must be an integer >= 1; got {num_samples!r}.")
    adapter_name, layers = _named_lora_sb_layers(model, adapter_name)
    if layers:
        targets = [(n, m.get_base_layer()) for n, m in layers]
        quantized = [n for n, m in layers if m.quantization_backend is not None]
        if quantized:
            raise ValueError(
                f"lora_sb_init cannot estimate the gradient of quantized base layers ({quantized[0]}, ...): they have "
                "no float weight gradient. Run estimate_gradients on an unquantized copy of the base model (with "
                "target_modules=...) and pass the result as lora_sb_init(model, grads=...)."
            )
        merged = [n for n, m in layers if m.merged]
        if merged:
            raise RuntimeError(f"lora_sb_init: {merged[0]} has merged adapters; call unmerge_adapter() first.")
    else:
        if not target_modules:
            raise ValueError("estimate_gradients: the model has no LoRA-SB layers; pass target_modules=[...].")
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        targets = [
            (_clean_name(n), m)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in wanted)
        ]
        if not targets:
            raise ValueError(f"estimate_gradients: target_modules={target_modules!r} matched no nn.Linear module.")
    weights = {name: module.weight for name, module in targets}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}

    def make_hook(name):
        def hook(param):
            sums[name] += param.grad.detach().float().cpu()
            param.grad = None

        return hook

    device = next(iter(weights.values())).device
    loss_fn = loss_fn or _default_loss
    was_training = model.training
    handles = []
    seen = 0
    try:
        with _only_base_weights_require_grad(weights.values(), model, [m for _, m in layers]):
            handles = [w.register_post_accumulate_grad_hook(make_hook(n)) for n, w in weights.items()]
            model.train(train_mode)
            for batch in dataloader:
                size = _batch_size(batch)
                take = min(size, num_samples - seen)
                if take <= 0:
                    break
                batch = _take(batch, take, size, device)
                (loss_fn(model, batch) / take).backward()
                seen += take
                if seen >= num_samples:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("lora_sb_init: the dataloader yielded no examples.")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for name, g in sums.items():
            g_dev = g.to(device)
            torch.distributed.all_reduce(g_dev, op=torch.distributed.ReduceOp.SUM)
            sums[name] = g_dev.cpu()
    return sums


def sign_update(grads: dict[str, torch.Tensor], lr_eff: float) -> dict[str, torch.Tensor]:
    """The first full-fine-tuning update LoRA-SB approximates: ``Δ = -lr_eff·sign(G)`` per weight."""
    return {name: -lr_eff * torch.sign(g.float()) for name, g in grads.items()}


def lora_sb_init(
    model: nn.Module,
    dataloader: Optional[Iterable] = None,
    num_samples: int = 2,
    lr: Optional[float] = None,
    warmup_ratio: Optional[float] = None,
    total_steps: Optional[int] = None,
    warmup_steps: Optional[float] = None,
    adapter_name: Optional[str] = None,
    grads: Optional[dict[str, torch.Tensor]] = None,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    train_mode: bool = True,
) -> dict[str, torch.Tensor]:
    """LoRA-SB initialisation of the LoRA-SB adapter ``adapter_name`` (default: the active one) of
    ``model`` (a PeftModel from ``get_peft_model(base, LoraSBConfig(...))``).

    1. ``G = Σ ∇_W(loss / batch_size)`` over ``num_samples`` examples of ``dataloader`` (dict batches with labels, or
       ``loss_fn(model, batch) -> loss``); see ``estimate_gradients``. Or pass ``grads={module name: G}``, e.g.
       estimated on an unquantized copy for a bitsandbytes model.
    2. ``Δ = -lr_eff·sign(G)`` with ``lr_eff = lr / (warmup_ratio·total_steps)`` (or ``lr / warmup_steps``; ``lr``
       without warm-up), the official code's effective first-step size.
    3. Per layer, ``[Δ]_r = U S Vᵀ``: ``B = U``, ``A = Vᵀ``, ``R = diag(S)`` (``LoraSBLayer.init_from_update``), so the
       adapter starts at ``W + s·[Δ]_r`` (W is not compensated unless the config says ``compensate=True``).

    R is written in place, so an optimizer that already holds it keeps working. Run it before training; the config's
    ``init`` is set to ``'gradient'`` so the saved config says how the factors were made. Returns the updates Δ."""
    if lr is None:
        raise ValueError("lora_sb_init: lr is required (the training learning rate; the official README omits it).")
    lr_eff = effective_lr(lr, warmup_ratio, total_steps, warmup_steps)
    adapter_name, layers = _named_lora_sb_layers(model, adapter_name)
    if not layers:
        raise ValueError("lora_sb_init: the model has no LoRA-SB layers; wrap it with get_peft_model(LoraSBConfig).")
    if grads is None:
        if dataloader is None:
            raise ValueError("lora_sb_init: pass a dataloader (or precomputed grads=...).")
        grads = estimate_gradients(model, dataloader, num_samples, adapter_name, loss_fn=loss_fn, train_mode=train_mode)
    missing = [n for n, _ in layers if n not in grads]
    if missing:
        raise ValueError(
            f"lora_sb_init: grads has no entry for {missing[:3]} (keys are module names, e.g. {missing[0]!r})."
        )
    updates = sign_update({n: grads[n] for n, _ in layers}, lr_eff)
    for name, layer in layers:
        layer.init_from_update(adapter_name, updates[name])
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name in configs:
        configs[adapter_name].init = "gradient"
    return updates


def lora_sb_init_from_trainer(trainer, num_samples: int = 2, **kwargs) -> dict[str, torch.Tensor]:
    """``lora_sb_init`` with the dataloader, learning rate, warm-up and number of optimizer steps of a
    ``transformers.Trainer`` (call it before ``trainer.train()``)."""
    args = trainer.args
    dataloader = trainer.get_train_dataloader()
    if args.max_steps and args.max_steps > 0:
        total = int(args.max_steps)
    else:
        total = math.ceil(len(dataloader) / max(args.gradient_accumulation_steps, 1)) * math.ceil(args.num_train_epochs)
    warmup = args.get_warmup_steps(total) if hasattr(args, "get_warmup_steps") else 0
    return lora_sb_init(trainer.model, dataloader, num_samples=num_samples, lr=args.learning_rate,
                        warmup_steps=warmup, **kwargs)


def copy_lora_sb_factors(model: nn.Module, source: str = "default", target: str = "ref") -> None:
    """Copy the frozen factors A, B (and R₀) and the trainable R of LoRA-SB adapter ``source`` into adapter
    ``target`` on every layer.

    Needed where a library clones an adapter by copying its *parameters* only, e.g. TRL's DPO / GRPO / KTO trainers,
    which ``add_adapter("ref", config)`` and copy the ``.default.`` parameters: after ``lora_sb_init`` the frozen A, B
    are buffers computed from data, so call ``copy_lora_sb_factors(trainer.model, "default", "ref")`` after building
    such a trainer (with the SVD init the factors are recomputed identically from W, so nothing is needed)."""
    _, src_layers = _named_lora_sb_layers(model, source)
    done = 0
    for _, layer in src_layers:
        if target not in layer.r:
            continue
        if layer.r[target] != layer.r[source]:
            raise ValueError(f"copy_lora_sb_factors: adapters {source!r} and {target!r} have different ranks.")
        for d in (layer.lora_sb_A, layer.lora_sb_B):
            d[target] = d[source].detach().clone()
        if source in layer.lora_sb_R0 and layer.lora_sb_options[target]["compensate"]:
            layer.lora_sb_R0[target] = layer.lora_sb_R0[source].detach().clone()
        with torch.no_grad():
            layer.lora_sb_R[target].weight.copy_(layer.lora_sb_R[source].weight)
        layer.lora_sb_pending[target] = layer.lora_sb_pending[source]
        done += 1
    if not done:
        raise ValueError(f"copy_lora_sb_factors: the model has no LoRA-SB adapter {target!r}.")
