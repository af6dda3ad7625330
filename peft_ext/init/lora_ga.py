"""Paper-faithful LoRA-GA initialisation written into upstream PEFT LoRA layers.

Paper: *LoRA-GA: Low-Rank Adaptation with Gradient Approximation* — https://arxiv.org/abs/2407.05000.
Official code: https://github.com/Outsider565/LoRA-GA (a PEFT fork: ``peft/src/peft/tuners/lora/layer.py``
``lora_ga_init``, ``peft/src/peft/utils/lora_ga_utils/lora_ga_utils.py`` ``estimate_gradient``).

Algorithm (``W ∈ R^{m×n}``, ``m`` = out features, LoRA scale ``s``):

1. ``G`` = mean over batches of ``∇_W L`` on the *base* model (adapters disabled); averaged over processes when
   ``torch.distributed`` runs.
2. ``U, S, V = svd_lowrank(G, q=min(4r, m, n), niter=4)`` (here with a local, seeded generator so the result is
   deterministic, and with each singular pair's sign fixed so that the largest-magnitude entry of ``U[:, k]`` is
   positive — the SVD is only defined up to those signs).
3. Direction ``"ArB2r"`` (default): ``A₀ = V[:, :r]ᵀ``, ``B₀ = U[:, r:2r]``; ``"A2rBr"``: ``A₀ = V[:, r:2r]ᵀ``,
   ``B₀ = U[:, :r]``; ``"ArBr"``: ``A₀`` = odd, ``B₀`` = even singular vectors among the first ``2r``; ``"random"``:
   a seeded permutation of the first ``2r`` indices, the first ``r`` for ``A₀``, the other ``r`` for ``B₀``.
   **No singular values** enter ``A₀`` or ``B₀``.
4. Scale ``"stable"`` (default, ``γ = 16``): ``A₀, B₀ ← A₀·m^{1/4}/√γ, B₀·m^{1/4}/√γ`` — so
   ``s·B₀A₀ = s·(√m/γ)·U_{r:2r}V_{:r}ᵀ`` does not depend on ``‖G‖``; ``"gd"``: both divided by ``s``; ``"unit"``:
   unchanged; ``"weightS"``: both multiplied by ``mean(√(σ_{1..r}(W)/s))``.
5. ``W ← W − s·B₀A₀`` so that the model's output is unchanged at initialisation.

**Upstream PEFT differs** (``LoraConfig(init_lora_weights="lora_ga", lora_ga_config=…)`` +
``preprocess_loraga``): it multiplies ``B₀`` by ``diag(S)`` in every direction and the ``"stable"`` scale multiplies
only ``B₀``, so upstream's ``B₀A₀`` grows with the gradient's norm (``×10`` gradient → ``×10`` initial update) where
the official one does not; upstream's ``"random"`` uses the same indices for ``A₀`` and ``B₀``; its ``weight_svd``
scale is not the official ``weightS``; it averages the gradient per backward-hook call rather than per batch, and it
silently falls back to the default init when no gradient is attached. This module follows the official code; the
official code's hard-coded ``scaling["default"]`` is replaced by the initialised adapter's own scale.

Because ``W`` is offset, the trained adapter belongs to the *offset* base. :func:`lora_ga_to_lora` turns it into a
plain rank-``2r`` LoRA of the **original** base (``ΔW = s·BA − s·B₀A₀``), as the official code does with PEFT's
``path_initial_model_for_weight_conversion`` (PiSSA / OLoRA style); :func:`apply_lora_ga_offset` re-applies the
offset to a fresh original base, e.g. to resume training from a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

PAPER_URL = "https://arxiv.org/abs/2407.05000"
CODE_URL = "https://github.com/Outsider565/LoRA-GA"

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weightS")
SVD_METHODS = ("lowrank", "full")


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"lora_ga_init.{name} must be {allowed}; got {value!r}.")


@dataclass
class LoraGAInit:
    """What :func:`lora_ga_init` wrote: per LoRA layer the initial factors ``(A₀, B₀)`` and the scale ``s``.

    LoRA-GA: https://arxiv.org/abs/2407.05000; official code https://github.com/Outsider565/LoRA-GA. Needed to turn
    the trained adapter into a LoRA of the original base (:func:`lora_ga_to_lora`) and to re-apply the weight offset
    to a fresh base (:func:`apply_lora_ga_offset`). ``save`` / ``load`` use one safetensors file.
    """

    adapter_name: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scaling: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write the factors and scales to one safetensors file (atomically)."""
        from safetensors.torch import save

        from .._io import atomic_write

        tensors = {}
        for name, (a0, b0) in self.factors.items():
            tensors[f"{name}::A0"] = a0.detach().cpu().contiguous()
            tensors[f"{name}::B0"] = b0.detach().cpu().contiguous()
        meta = {"adapter_name": self.adapter_name, "scaling": self.scaling, "settings": self.settings}
        payload = save(tensors, metadata={"format": "pt", "lora_ga": json.dumps(meta)})
        atomic_write(path, lambda f: f.write(payload), binary=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LoraGAInit":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta_text = (f.metadata() or {}).get("lora_ga")
            if meta_text is None:
                raise ValueError(f"{os.fspath(path)!r} is not a LoRA-GA init file (no 'lora_ga' metadata).")
            meta = json.loads(meta_text)
            names = sorted({key.rsplit("::", 1)[0] for key in f.keys()})
            factors = {n: (f.get_tensor(f"{n}::A0"), f.get_tensor(f"{n}::B0")) for n in names}
        return cls(meta["adapter_name"], factors, {k: float(v) for k, v in meta["scaling"].items()}, meta["settings"])


# ----------------------------------------------------------------------------------------------------------------
# layers


def _is_quantized(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)
    if weight is None or not torch.is_floating_point(weight):
        return True
    if type(weight).__name__ in ("Params4bit", "Int8Params") or hasattr(weight, "quant_state"):
        return True
    return type(base).__module__.split(".")[0] in ("bitsandbytes", "hqq", "awq", "auto_gptq", "gptqmodel", "torchao")


def lora_ga_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """The LoRA layers of ``model`` that carry ``adapter_name``, by module name; refuses what LoRA-GA cannot
    initialise (https://arxiv.org/abs/2407.05000; https://github.com/Outsider565/LoRA-GA): quantized bases (the offset
    ``W ← W − s·B₀A₀`` needs a writable
    full-precision weight), non-linear LoRA layers, DoRA adapters (the offset would change DoRA's magnitude), and
    merged adapters."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name not in module.lora_A and adapter_name not in getattr(module, "lora_embedding_A", {}):
            continue
        base = module.get_base_layer()
        if _is_quantized(base) or not isinstance(module, LoraLinear):
            kind = type(base).__name__
            if _is_quantized(base):
                raise ValueError(
                    f"LoRA-GA cannot initialise {name!r}: its base layer ({kind}) is quantized, and LoRA-GA needs a "
                    "full-precision gradient and a writable weight to offset (W <- W - s*B0*A0). Estimate and "
                    "initialise on a full-precision model, or use plain LoRA on quantized models."
                )
            raise ValueError(f"LoRA-GA initialises linear LoRA layers only; {name!r} wraps a {kind}.")
        if module.use_dora.get(adapter_name, False):
            raise ValueError(
                f"LoRA-GA cannot initialise the DoRA adapter {adapter_name!r} of {name!r}: offsetting W would change "
                "DoRA's magnitude vector. Use use_dora=False."
            )
        if adapter_name in module.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into {name!r}; unmerge it first.")
        found[name] = module
    if not found:
        raise ValueError(f"LoRA-GA: the model has no LoRA layer with adapter {adapter_name!r}.")
    return found


def _grad_view(layer: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """A gradient in the base weight's storage layout, as (out, in)."""
    return grad.T if getattr(layer, "fan_in_fan_out", False) else grad


# ----------------------------------------------------------------------------------------------------------------
# gradient


def estimate_lora_ga_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    adapter_name: str = "default",
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    train_mode: bool = True,
    all_reduce: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """``G`` per LoRA layer: the mean over ``batches`` of ``∇_W L`` on the base model with adapters disabled, in fp32,
    shaped (out, in); keys are the layers' module names in ``model``.

    LoRA-GA: https://arxiv.org/abs/2407.05000; official code https://github.com/Outsider565/LoRA-GA
    (``estimate_gradient``). ``model`` is a ``PeftModel`` with a LoRA adapter ``adapter_name``. Each batch is passed
    as ``model(**batch).loss`` unless ``loss_fn(model, batch)`` is given. Only the targeted base weights require
    gradients while this runs; every ``requires_grad`` flag and the train/eval mode are restored afterwards.
    ``train_mode=True`` runs the model in train mode as the official code does (dropout active, if the model has
    any). ``all_reduce`` (default: when ``torch.distributed`` is initialised with several processes) averages ``G``
    over processes, as the official code's all-reduce ``AVG``.
    """
    layers = lora_ga_layers(model, adapter_name)
    if not hasattr(model, "disable_adapter"):
        raise ValueError("estimate_lora_ga_gradients needs a PeftModel (it disables the adapters while estimating).")
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    count = 0
    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        model.train(train_mode)
        with model.disable_adapter(), torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
                if loss is None or not torch.is_tensor(loss) or loss.ndim != 0:
                    raise ValueError(
                        "estimate_lora_ga_gradients: each batch must give a scalar loss (pass labels, or loss_fn)."
                    )
                loss.backward()
                for name, w in weights.items():
                    if w.grad is not None:
                        sums[name] += w.grad.float()
                        w.grad = None
                count += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for w in weights.values():
            w.grad = None
        model.train(was_training)
    if count == 0:
        raise ValueError("estimate_lora_ga_gradients: `batches` is empty.")
    grads = {name: s / count for name, s in sums.items()}
    dist = torch.distributed
    if all_reduce is None:
        all_reduce = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if all_reduce:
        world = dist.get_world_size()
        for g in grads.values():  # ReduceOp.AVG is NCCL-only; SUM / world works on every backend
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            g /= world
    return {name: _grad_view(layers[name], g) for name, g in grads.items()}


# ----------------------------------------------------------------------------------------------------------------
# SVD


def svd_lowrank(matrix: torch.Tensor, q: int, niter: int, generator: torch.Generator):
    """Randomised SVD (Halko et al.; the algorithm of ``torch.svd_lowrank`` that LoRA-GA's official code
    https://github.com/Outsider565/LoRA-GA calls, https://arxiv.org/abs/2407.05000) with a local generator: returns
    ``U (m×q), S (q), V (n×q)`` with ``matrix ≈ U diag(S) Vᵀ``. The Gaussian test matrix is drawn on the CPU, so the
    result does not depend on the device's random stream."""
    m, n = matrix.shape
    probe = torch.randn(n, q, generator=generator, dtype=torch.float32).to(matrix.device, matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return basis @ u_small, s, vh.mT


def fix_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair ``(u_k, v_k)`` so that the largest-magnitude entry of ``u_k`` is positive (the
    sign convention of LoRA-GA's init here, https://arxiv.org/abs/2407.05000; the official code
    https://github.com/Outsider565/LoRA-GA leaves these signs to the SVD, which makes its init run-dependent)."""
    cols = torch.arange(u.shape[1], device=u.device)
    signs = torch.sign(u[u.abs().argmax(dim=0), cols])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, v * signs


def _svd(matrix: torch.Tensor, q: int, method: str, niter: int, seed: int):
    if method == "full":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, v = u[:, :q], s[:q], vh[:q].mT
    else:
        u, s, v = svd_lowrank(matrix, q, niter, torch.Generator().manual_seed(seed))
    u, v = fix_signs(u, v)
    return u, s, v


def lora_ga_factors(
    grad: torch.Tensor,
    r: int,
    scaling: float,
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    gamma: float = 16,
    weight: Optional[torch.Tensor] = None,
    svd: str = "lowrank",
    niter: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A₀, B₀)`` of the official LoRA-GA initialisation (https://arxiv.org/abs/2407.05000; official code
    https://github.com/Outsider565/LoRA-GA, ``lora_ga_init``) for one layer with gradient ``grad`` (m×n, fp32),
    rank ``r`` and LoRA scale ``scaling``. ``weight`` (m×n) is needed only for ``scale="weightS"``."""
    m, n = grad.shape
    if 2 * r > min(m, n):
        raise ValueError(f"LoRA-GA needs 2r <= min(out, in) = {min(m, n)}; got r = {r}.")
    q = min(4 * r, m, n)
    u, s, v = _svd(grad.float(), q, svd, niter, seed)
    if direction == "ArB2r":
        a_idx, b_idx = torch.arange(0, r), torch.arange(r, 2 * r)
    elif direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(0, r)
    elif direction == "ArBr":
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    elif direction == "random":
        perm = torch.randperm(2 * r, generator=torch.Generator().manual_seed(seed + 1))
        a_idx, b_idx = perm[:r], perm[r:]
    else:
        raise _bad("direction", direction, f"one of {list(DIRECTIONS)}")
    a0 = v[:, a_idx.to(v.device)].mT.clone()
    b0 = u[:, b_idx.to(u.device)].clone()
    if scale == "stable":
        factor = m**0.25 / math.sqrt(gamma)
        a0, b0 = a0 * factor, b0 * factor
    elif scale == "gd":
        a0, b0 = a0 / scaling, b0 / scaling
    elif scale == "weightS":
        if weight is None:
            raise ValueError("LoRA-GA scale='weightS' needs the layer's weight.")
        _, sw, _ = _svd(weight.float(), min(4 * r, m, n), svd, niter, seed)
        factor = torch.sqrt(sw[:r] / scaling).mean()
        a0, b0 = a0 * factor, b0 * factor
    elif scale != "unit":
        raise _bad("scale", scale, f"one of {list(SCALES)}")
    return a0, b0


# ----------------------------------------------------------------------------------------------------------------
# init


def _match_grads(layers: Mapping[str, nn.Module], grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    aliases = {}
    for name in layers:
        aliases[name] = name
        aliases.setdefault(name.removeprefix("base_model.model."), name)
    matched: dict[str, torch.Tensor] = {}
    unknown = []
    for key, g in grads.items():
        if key in aliases:
            matched[aliases[key]] = g
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"lora_ga_init: gradients given for {sorted(unknown)}, which are not LoRA layers of the "
                         f"adapter; LoRA layers: {sorted(layers)}.")
    missing = sorted(set(layers) - set(matched))
    if missing:
        raise ValueError(f"lora_ga_init: no gradient for the LoRA layer(s) {missing}.")
    return matched


@torch.no_grad()
def lora_ga_init(
    model: nn.Module,
    batches: Optional[Iterable[Any]] = None,
    *,
    grads: Optional[Mapping[str, torch.Tensor]] = None,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    adapter_name: str = "default",
    direction: str = "ArB2r",
    scale: str = "stable",
    gamma: float = 16,
    svd: str = "lowrank",
    niter: int = 4,
    seed: int = 0,
    norm_clip: bool = False,
    factor_dtype: Optional[torch.dtype] = None,
    train_mode: bool = True,
) -> LoraGAInit:
    """Initialise the LoRA adapter ``adapter_name`` of ``model`` (a ``PeftModel`` built from ``peft.LoraConfig``)
    with the official LoRA-GA initialisation and offset the base weights so that the output is unchanged.

    Paper: https://arxiv.org/abs/2407.05000; official code: https://github.com/Outsider565/LoRA-GA. See the module
    docstring for the algorithm and how upstream PEFT's ``init_lora_weights="lora_ga"`` differs (upstream puts
    singular values in ``B₀`` and scales only ``B₀``, so its init grows with ‖G‖; here it does not).

    Args:
        batches: gradient-estimation batches (official: 64 iterations of batch 2); each gives
            ``model(**batch).loss`` or ``loss_fn(model, batch)``. Exactly one of ``batches`` / ``grads``.
        grads: precomputed gradients ``{layer name: G}`` (names as in ``model`` or the base model, shapes (out, in)),
            e.g. from :func:`estimate_lora_ga_gradients` or a cache.
        direction: ``"ArB2r"`` (official default), ``"A2rBr"``, ``"ArBr"``, ``"random"``.
        scale: ``"stable"`` (official default, with ``gamma``), ``"gd"``, ``"unit"``, ``"weightS"``.
        svd: ``"lowrank"`` (official: randomised, ``q = min(4r, m, n)``, ``niter`` power iterations, seeded with
            ``seed``) or ``"full"`` (exact ``torch.linalg.svd``).
        norm_clip: the official option that shrinks ``s·B₀A₀`` (and √ of it on each factor) when its largest entry
            exceeds the weight's.
        factor_dtype: dtype of ``A₀, B₀`` (default: the adapter weights' dtype); the offset is computed from the
            factors in that dtype, in fp32.

    Returns the :class:`LoraGAInit` needed by :func:`lora_ga_to_lora` and :func:`apply_lora_ga_offset`.
    """
    if direction not in DIRECTIONS:
        raise _bad("direction", direction, f"one of {list(DIRECTIONS)}")
    if scale not in SCALES:
        raise _bad("scale", scale, f"one of {list(SCALES)}")
    if svd not in SVD_METHODS:
        raise _bad("svd", svd, f"one of {list(SVD_METHODS)}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise _bad("gamma", gamma, "a number > 0")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise _bad("niter", niter, "an integer >= 0")
    if (batches is None) == (grads is None):
        raise ValueError("lora_ga_init needs exactly one of `batches` (to estimate gradients) or `grads`.")
    layers = lora_ga_layers(model, adapter_name)
    if grads is None:
        grads = estimate_lora_ga_gradients(
            model, batches, adapter_name=adapter_name, loss_fn=loss_fn, train_mode=train_mode
        )
    grads = _match_grads(layers, grads)
    planned = {}
    for name, layer in layers.items():  # compute everything first, so a failure leaves the model untouched
        base_w = layer.get_base_layer().weight
        w = _grad_view(layer, base_w)
        g = grads[name].to(device=base_w.device, dtype=torch.float32)
        if tuple(g.shape) != tuple(w.shape):
            raise ValueError(f"lora_ga_init: gradient of {name!r} has shape {tuple(g.shape)}, the weight "
                             f"{tuple(w.shape)}.")
        s = float(layer.scaling[adapter_name])
        a0, b0 = lora_ga_factors(
            g, layer.r[adapter_name], s, direction=direction, scale=scale, gamma=gamma,
            weight=w if scale == "weightS" else None, svd=svd, niter=niter, seed=seed,
        )
        dtype = factor_dtype or layer.lora_A[adapter_name].weight.dtype
        a0, b0 = a0.to(dtype), b0.to(dtype)
        offset = s * (b0.float() @ a0.float())
        if norm_clip:
            ratio = (w.float().abs().max() / offset.abs().max().clamp_min(1e-30)).item()
            if ratio < 1:
                offset = offset * ratio
                a0, b0 = (a0.float() * ratio**0.5).to(dtype), (b0.float() * ratio**0.5).to(dtype)
        planned[name] = (a0, b0, s, offset)
    result = LoraGAInit(
        adapter_name,
        settings={"direction": direction, "scale": scale, "gamma": gamma, "svd": svd, "niter": niter, "seed": seed,
                  "norm_clip": norm_clip},
    )
    for name, (a0, b0, s, offset) in planned.items():
        layer = layers[name]
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        lora_a.data = a0.to(lora_a.device).contiguous()
        lora_b.data = b0.to(lora_b.device).contiguous()
        _offset_weight(layer, -offset)
        result.factors[name] = (a0.detach().cpu().clone(), b0.detach().cpu().clone())
        result.scaling[name] = s
    return result


def _offset_weight(layer: nn.Module, delta: torch.Tensor) -> None:
    weight = layer.get_base_layer().weight
    delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    weight.data.copy_((weight.data.float() + delta.to(weight.device)).to(weight.dtype))


@torch.no_grad()
def apply_lora_ga_offset(model: nn.Module, init: LoraGAInit) -> None:
    """Re-apply ``W ← W − s·B₀A₀`` to a model built on the *original* base, e.g. to resume training a LoRA-GA adapter
    (https://arxiv.org/abs/2407.05000; https://github.com/Outsider565/LoRA-GA) from a checkpoint: build the PEFT
    model from the same ``LoraConfig``, call this, then load the adapter weights."""
    layers = lora_ga_layers(model, init.adapter_name)
    missing = sorted(set(init.factors) - set(layers))
    if missing:
        raise ValueError(f"apply_lora_ga_offset: the model has no LoRA layer(s) {missing}.")
    for name, (a0, b0) in init.factors.items():
        _offset_weight(layers[name], -init.scaling[name] * (b0.float() @ a0.float()).to(
            layers[name].get_base_layer().weight.device))


@torch.no_grad()
def lora_ga_to_lora(model: nn.Module, init: LoraGAInit, save_directory: Optional[str | os.PathLike] = None):
    """Turn a trained LoRA-GA adapter into a plain LoRA adapter of the **original** base weights
    (https://arxiv.org/abs/2407.05000; official code https://github.com/Outsider565/LoRA-GA, which does this with
    PEFT's ``path_initial_model_for_weight_conversion``).

    The trained model computes ``(W − s·B₀A₀) + s·BA``, i.e. ``W + s·[B, −B₀][A; A₀]``: a rank-``2r`` LoRA with the
    same scale (``r → 2r``, ``α → 2α``, or ``√2·α`` under rsLoRA; ``rank_pattern`` / ``alpha_pattern`` likewise).
    Returns ``(LoraConfig, state_dict)`` in PEFT's saved-adapter format; with ``save_directory`` also writes
    ``adapter_config.json`` and ``adapter_model.safetensors`` there, loadable with ``PeftModel.from_pretrained`` on the
    original base model.
    """
    from dataclasses import fields as dc_fields

    from peft import LoraConfig, get_peft_model_state_dict

    adapter = init.adapter_name
    config = model.peft_config[adapter]
    if not isinstance(config, LoraConfig):
        raise ValueError(f"lora_ga_to_lora: adapter {adapter!r} is not a LoRA adapter ({type(config).__name__}).")
    layers = lora_ga_layers(model, adapter)
    missing = sorted(set(init.factors) - set(layers))
    if missing:
        raise ValueError(f"lora_ga_to_lora: the model has no LoRA layer(s) {missing}.")
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    for name, (a0, b0) in init.factors.items():
        layer = layers[name]
        if not math.isclose(float(layer.scaling[adapter]), init.scaling[name], rel_tol=1e-6):
            raise ValueError(f"lora_ga_to_lora: the scale of {name!r} changed since initialisation "
                             f"({init.scaling[name]} -> {layer.scaling[adapter]}).")
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if key_a not in state or key_b not in state:
            raise ValueError(f"lora_ga_to_lora: {key_a!r} is not in the adapter's state dict; pass the PeftModel.")
        a, b = state[key_a], state[key_b]
        state[key_a] = torch.cat([a, a0.to(a.device, a.dtype)], dim=0)
        state[key_b] = torch.cat([b, -b0.to(b.device, b.dtype)], dim=1)
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    values = {f.name: getattr(config, f.name) for f in dc_fields(config) if f.init}
    values.update(
        r=2 * config.r,
        lora_alpha=config.lora_alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: v * alpha_factor for k, v in (config.alpha_pattern or {}).items()},
        init_lora_weights=True,
    )
    new_config = LoraConfig(**values)
    if save_directory is not None:
        from safetensors.torch import save

        from .._io import atomic_write

        os.makedirs(save_directory, exist_ok=True)
        payload = save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata={"format": "pt"})
        atomic_write(os.path.join(save_directory, "adapter_model.safetensors"), lambda f: f.write(payload),
                     binary=True)
        new_config.save_pretrained(os.fspath(save_directory))
    return new_config, state
