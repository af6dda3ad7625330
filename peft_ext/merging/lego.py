"""LoRA-LEGO: merge LoRAs by clustering their rank-1 units (*Merging LoRAs like Playing LEGO: Pushing the Modularity
of LoRA to Extremes Through Rank-Wise Clustering*, ICLR 2025, https://arxiv.org/abs/2409.16167; no official code).

A LoRA update is a sum of rank-1 "minimal semantic units" (MSUs), ``ΔW = Σ_i b_i a_iᵀ``, and a sum does not care
about the order of its terms or which adapter they came from. LEGO pools the MSUs of all inputs per module, clusters
them into ``k`` groups and uses the centroids as the ``k`` units of one merged LoRA, then rescales them (dual
reweighting). ``lego_merge`` works on adapter folders or (state dict, config) pairs and returns a plain LoRA;
``add_lego_adapter`` does the same for adapters loaded on one ``PeftModel``, like PEFT's ``add_weighted_adapter``.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

import torch

from .adapters import (
    PREFIX,
    LoraView,
    MergeInputError,
    average_extra,
    check_compatible,
    load_adapter,
    lora_config_for,
    lora_view,
    write_lora_folder,
)

REWEIGHTS = ("param", "output")


def lego_merge(
    adapters: Sequence,
    k: int,
    reweight: Iterable[str] = REWEIGHTS,
    seed: int = 0,
    weights: Optional[Sequence[float]] = None,
    out: Optional[os.PathLike] = None,
    base_model=None,
    export_rank: Optional[int] = None,
    n_init: int = 4,
    max_iter: int = 100,
):
    """Merge LoRA adapters into one rank-``k`` LoRA by rank-wise clustering; returns ``(state_dict, LoraConfig)`` and,
    with ``out``, also writes them as a plain LoRA folder (loads in PEFT without peft-ext).

    ``adapters``: adapter folders or ``(state_dict, config)`` pairs; PEFT LoRAs of any ranks, or peft-ext adapters
    that export to LoRA (exported at ``export_rank`` or their own ``r``, on ``base_model`` or the base folder their
    config names). All must share the base model and the adapted modules. ``weights`` scale each input's ΔW (default
    1). ``reweight`` chooses the dual reweighting steps, ``"param"`` and/or ``"output"``; ``()`` gives the plain
    centroids. Per module, with ``n`` = Σ of the inputs' ranks ≥ ``k``:

    1. *Units.* Unit ``i`` of input ``j`` is ``(b, a) = (w_j·s_j·B[:, i], A[i])``: the input's LoRA scaling ``s_j``
       (α/r, or α/√r for rsLoRA, per module with rank/alpha patterns) and weight are folded into ``b``.
    2. *Canonical form (ours; the paper does not say how it treats the ambiguity).* ``(b, a)``, ``(c·b, a/c)`` and
       ``(−b, −a)`` are the same unit. We balance the two halves, ``|b| = |a| = √(|b|·|a|)``, so that the clustering
       feature ``x = [a, b]`` depends only on the rank-1 matrix ``b aᵀ``, and flip each ``x`` so its largest-magnitude
       entry is positive. Clustering is sign-aware as well: a unit is compared with a centroid under both signs
       (distance ``|x|² + |c|² − 2|x·c|``) and joins it with the sign that fits, so opposite-sign copies of one
       direction cluster together however the first flip fell.
    3. *Clustering.* k-means on the ``x`` (k-means++ seeding from ``seed``, Lloyd iterations until no assignment or
       sign changes or ``max_iter``, ``n_init`` seedings, the lowest inertia kept; an empty cluster takes the unit
       farthest from its centroid). The units are put in a canonical order first, so the result does not depend on
       the order of ``adapters``. ``k = n`` skips k-means (every unit its own cluster: ΔW = Σ_j w_j ΔW_j exactly).
    4. *Centroids.* Each cluster's mean ``(b̄, ā)`` (members sign-aligned) is one unit of the merged LoRA.
    5. *Parameter reweighting* (``"param"``; the paper: averaging shrinks norms). Our reading: each centroid is
       rescaled so that its rank-1 norm ``|b̄|·|ā|`` equals the mean ``|b|·|a|`` of its members (both halves by the
       square root); a singleton cluster is unchanged.
    6. *Output reweighting* (``"output"``; the paper: the merged LoRA's output variance grows with its rank). Our
       reading: a sum of ``k`` roughly independent unit outputs has ``k/r̄`` times the variance of an ``r̄``-unit LoRA
       (``r̄`` = the inputs' mean rank at this module), so the merged ``B`` is multiplied by ``√(r̄/k)``.

    The result has ``r = lora_alpha = k`` (scaling 1). ``modules_to_save`` tensors (e.g. classifier heads) are
    averaged with the weights normalised to sum 1. Errors (``MergeInputError``, a ``ValueError``) name the problem:
    ``k < 1``, ``k`` above a module's pooled rank, different bases or target modules, a type without a LoRA export.
    """
    if isinstance(adapters, (str, os.PathLike)) or not len(adapters):
        raise MergeInputError("adapters must be a non-empty list of adapter folders or (state_dict, config) pairs.")
    views = [load_adapter(a, i, base_model=base_model, export_rank=export_rank) for i, a in enumerate(adapters)]
    state_dict, config = merge_views(views, k, reweight=reweight, seed=seed, weights=weights, n_init=n_init,
                                     max_iter=max_iter)
    if out is not None:
        write_lora_folder(out, state_dict, config)
    return state_dict, config


def merge_views(views: list, k: int, reweight: Iterable[str] = REWEIGHTS, seed: int = 0, weights=None,
                n_init: int = 4, max_iter: int = 100):
    """``lego_merge`` on loaded ``LoraView`` s; returns ``(state_dict, LoraConfig)``."""
    check_compatible(views)
    reweight = _check_reweight(reweight)
    weights = _check_weights(weights, len(views))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MergeInputError(f"k must be an integer >= 1 (the merged LoRA's rank); got {k!r}.")
    if not isinstance(n_init, int) or n_init < 1 or not isinstance(max_iter, int) or max_iter < 1:
        raise MergeInputError(f"n_init and max_iter must be integers >= 1; got {n_init!r}, {max_iter!r}.")
    state_dict = {}
    for module in views[0].modules:
        A, B = _merge_module(views, weights, module, k, reweight, seed, n_init, max_iter)
        kind = views[0].modules[module][3]
        names = ("lora_A.weight", "lora_B.weight") if kind == "linear" else ("lora_embedding_A", "lora_embedding_B")
        state_dict[f"{module}.{names[0]}"] = A
        state_dict[f"{module}.{names[1]}"] = B
    state_dict.update(average_extra(views, weights))
    config = lora_config_for(views, k, [m.removeprefix(PREFIX) for m in views[0].modules])
    return state_dict, config


def _check_reweight(reweight) -> frozenset:
    if isinstance(reweight, str):
        reweight = (reweight,)
    reweight = frozenset(reweight or ())
    if not reweight <= set(REWEIGHTS):
        raise MergeInputError(f"reweight must be a subset of {REWEIGHTS}; got {sorted(reweight)}.")
    return reweight


def _check_weights(weights, n: int) -> list:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise MergeInputError(f"weights must be {n} finite numbers, one per adapter; got {weights}.")
    return weights


def _merge_module(views, weights, module, k, reweight, seed, n_init, max_iter):
    """One module: pool, canonicalise, cluster, reweight; returns (A [k, ...], B [out, k, ...]) in the inputs' dtype."""
    A0, B0, _, _ = views[0].modules[module]
    bs, as_ = [], []
    for view, w in zip(views, weights):
        A, B, s, _ = view.modules[module]
        as_.append(A.reshape(A.shape[0], -1).double())
        bs.append(B.reshape(B.shape[0], B.shape[1]).double().T * (w * s))
    a, b = torch.cat(as_), torch.cat(bs)  # [n, in], [n, out]
    n = a.shape[0]
    if k > n:
        raise MergeInputError(f"k={k} exceeds the {n} rank-1 units pooled at {module.removeprefix(PREFIX)} "
                              f"(the inputs' ranks sum to {n}); choose k <= {n}.")
    x, sigma = _canonical_units(a, b)
    order = _canonical_order(x)
    x, sigma = x[order], sigma[order]
    if k == n:
        labels, signs = torch.arange(n), torch.ones(n, dtype=x.dtype)
    else:
        labels, signs = kmeans(x, k, seed=seed, n_init=n_init, max_iter=max_iter)
    d_in = a.shape[1]
    ca, cb = [], []
    for j in range(k):
        members = labels == j
        if not members.any():  # fewer distinct units than k: a zero unit
            ca.append(x.new_zeros(d_in))
            cb.append(x.new_zeros(x.shape[1] - d_in))
            continue
        c = (x[members] * signs[members, None]).mean(0)
        ca_j, cb_j = c[:d_in], c[d_in:]
        if "param" in reweight:
            norm = ca_j.norm() * cb_j.norm()
            if norm > 0:
                factor = (sigma[members].mean() / norm).sqrt()
                ca_j, cb_j = ca_j * factor, cb_j * factor
        ca.append(ca_j)
        cb.append(cb_j)
    A_new, B_new = torch.stack(ca), torch.stack(cb, dim=1)
    if "output" in reweight:
        B_new = B_new * math.sqrt((n / len(views)) / k)
    return (A_new.to(A0.dtype).reshape(k, *A0.shape[1:]).contiguous(),
            B_new.to(B0.dtype).reshape(B0.shape[0], k, *B0.shape[2:]).contiguous())


def _canonical_units(a: torch.Tensor, b: torch.Tensor):
    """Balanced, sign-canonical features ``x = [a, b]`` (|a| = |b|, largest-magnitude entry positive) and each unit's
    rank-1 norm ``σ = |a|·|b|``."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    sigma = na * nb
    live = sigma > 0
    fa = torch.where(live, (nb / na.where(live, torch.ones_like(na))).sqrt(), torch.zeros_like(na))
    fb = torch.where(live, (na / nb.where(live, torch.ones_like(nb))).sqrt(), torch.zeros_like(nb))
    x = torch.cat([a * fa[:, None], b * fb[:, None]], dim=1)
    peak = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return x * torch.where(peak < 0, -1.0, 1.0).to(x.dtype)[:, None], sigma


def _canonical_order(x: torch.Tensor) -> torch.Tensor:
    """A permutation that sorts the units by decreasing norm, then lexicographically: the same set of units gives the
    same order, whichever adapter came first."""
    rows = x.tolist()
    norms = x.norm(dim=1).tolist()
    return torch.tensor(sorted(range(len(rows)), key=lambda i: (-norms[i], rows[i])), dtype=torch.long)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, n_init: int = 4, max_iter: int = 100):
    """Sign-aware k-means of the rows of ``x`` (a row and its negation are the same point): returns ``(labels [n],
    signs [n])``, the sign each row joins its cluster with. k-means++ seeding from ``torch.Generator(seed)``,
    ``n_init`` seedings, Lloyd iterations; deterministic for a given ``x`` and ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(n_init):
        centers = _kmeans_pp(x, k, gen)
        labels, signs, inertia = _lloyd(x, centers, max_iter)
        if best is None or inertia < best[2]:
            best = (labels, signs, inertia)
    return best[0], best[1]


def _distances(x, centers):
    """Sign-aware squared distances ``|x|² + |c|² − 2|x·c|`` [n, k] and the dot products."""
    dots = x @ centers.T
    d = (x * x).sum(1, keepdim=True) + (centers * centers).sum(1)[None, :] - 2 * dots.abs()
    return d.clamp_min(0), dots


def _kmeans_pp(x, k, gen):
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    for _ in range(1, k):
        d, _ = _distances(x, x[chosen])
        weight = d.min(1).values
        weight[chosen] = 0
        if weight.sum() > 0:
            chosen.append(int(torch.multinomial(weight, 1, generator=gen)))
        else:  # every remaining unit duplicates a chosen one
            chosen.append(next(i for i in range(n) if i not in chosen))
    return x[chosen].clone()


def _lloyd(x, centers, max_iter):
    labels = signs = None
    for _ in range(max_iter):
        d, dots = _distances(x, centers)
        new_labels = d.argmin(1)
        new_signs = torch.where(dots.gather(1, new_labels[:, None]).squeeze(1) < 0, -1.0, 1.0).to(x.dtype)
        if labels is not None and torch.equal(new_labels, labels) and torch.equal(new_signs, signs):
            break
        labels, signs = new_labels, new_signs
        own = d.gather(1, labels[:, None]).squeeze(1).clone()
        for j in range(centers.shape[0]):
            members = labels == j
            if not members.any():  # empty cluster: take the unit farthest from its centroid
                far = int(own.argmax())
                if own[far] <= 0:
                    continue
                labels[far], signs[far], own[far] = j, 1.0, 0.0
                members = labels == j
            centers[j] = (x[members] * signs[members, None]).mean(0)
    d, _ = _distances(x, centers)
    return labels, signs, float(d.gather(1, labels[:, None]).sum())


def add_lego_adapter(model, adapters: list, weights: Optional[list], adapter_name: str, k: int, seed: int = 0,
                     reweight: Iterable[str] = REWEIGHTS) -> None:
    """Add the LEGO merge of adapters loaded on ``model`` (a ``PeftModel``) as a new LoRA adapter ``adapter_name``,
    like PEFT's ``add_weighted_adapter``: it is added frozen and not activated (``model.set_adapter`` it).

    ``adapters``: names of LoRA adapters, or of peft-ext adapters that export to LoRA (at their own ``r``);
    ``weights`` scale each one's ΔW (None: all 1); ``k``, ``seed`` and ``reweight`` as in ``lego_merge``."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise MergeInputError(f"add_lego_adapter needs a PeftModel; got {type(model).__name__}.")
    if adapter_name in configs:
        raise MergeInputError(f"adapter_name {adapter_name!r} already exists on the model; choose a new name.")
    if isinstance(adapters, str) or not adapters:
        raise MergeInputError("adapters must be a non-empty list of adapter names.")
    missing = [a for a in adapters if a not in configs]
    if missing:
        raise MergeInputError(f"adapters {missing} are not on the model; loaded: {sorted(configs)}.")
    views = [_view_of_loaded(model, name, get_peft_model_state_dict) for name in adapters]
    state_dict, config = merge_views(views, k, reweight=reweight, seed=seed, weights=weights)
    model.add_adapter(adapter_name, config)
    result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"add_lego_adapter: merged weights did not load into {adapter_name!r}: {unexpected[:3]}")
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(False)


def _view_of_loaded(model, name: str, get_state_dict) -> LoraView:
    config = model.peft_config[name]
    if str(getattr(config.peft_type, "value", config.peft_type)) == "LORA":
        state_dict = {k: v.detach() for k, v in get_state_dict(model, adapter_name=name).items()}
        return lora_view(state_dict, config, f"adapter {name!r}")
    from peft.tuners.lora.conversion import convert_to_lora

    from .adapters import _spec_of

    spec = _spec_of(config)
    if (spec is not None and not spec.lora_convertible) or not model.supports_lora_conversion(name):
        raise MergeInputError(f"adapter {name!r}: {config.peft_type} adapters cannot export to LoRA, so they cannot "
                              "be merged; merge LoRA-convertible adapters only.")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_config, state_dict = convert_to_lora(model, rank=int(getattr(config, "r", 8)), adapter_name=name)
    lora_config.task_type = config.task_type
    return lora_view({k: v.detach().clone() for k, v in state_dict.items()}, lora_config, f"adapter {name!r}")
