"""``merge_adapters``: adapter folders (or (state dict, config) pairs) merged into one plain LoRA by LoRA-LEGO or by one
of PEFT's ``add_weighted_adapter`` rules; the function behind ``peft-ext merge``.

PEFT's rules run on the adapters' base model: every input is loaded as a LoRA adapter (peft-ext adapters through their
LoRA export, each input's scaling folded into B so all have scaling 1), PEFT merges them, and the merged adapter's
factors are written out. ``modules_to_save`` tensors (e.g. classifier heads) are averaged for every rule (PEFT's
``add_weighted_adapter`` refuses adapters that share one), with the weights normalised to sum 1.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

from .adapters import PREFIX, MergeInputError, average_extra, check_compatible, load_adapter, write_lora_folder
from .lego import REWEIGHTS, add_lego_adapter, merge_views

RULES = ("lego", "linear", "ties", "dare_ties", "cat", "svd")
# rule -> PEFT combination_type without k (factor-wise: equal ranks, output rank r) and with k (on ΔW, then an SVD
# truncated to rank k); None: not available.
_PEFT_TYPES = {
    "linear": ("linear", "svd"),
    "ties": ("ties", "ties_svd"),
    "dare_ties": ("dare_ties", "dare_ties_svd"),
    "cat": ("cat", None),
    "svd": ("svd", "svd"),
}
# Rules of ``add_merged_adapter`` (adapters loaded in one model): every combination type of PEFT's
# ``add_weighted_adapter``, and LoRA-LEGO.
PEFT_COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
IN_MODEL_RULES = PEFT_COMBINATIONS + ("lego",)


def merge_adapters(
    adapters: Sequence,
    rule: str = "lego",
    k: Optional[int] = None,
    weights: Optional[Sequence[float]] = None,
    density: Optional[float] = None,
    seed: int = 0,
    out: Optional[os.PathLike] = None,
    base_model=None,
    reweight=REWEIGHTS,
):
    """Merge ``adapters`` by ``rule``; returns ``(state_dict, LoraConfig)`` of a plain LoRA and writes it to ``out``.

    Rules: ``lego`` (``lego_merge`` at rank ``k``, required); ``linear``, ``ties``, ``dare_ties`` (PEFT's
    factor-wise rules on equal-rank adapters without ``k``; with ``k`` PEFT's ``svd`` / ``ties_svd`` /
    ``dare_ties_svd``: the rule on each ΔW, then a rank-``k`` SVD); ``cat`` (rank = Σ of the ranks, exact; no ``k``);
    ``svd`` (the weighted ΔW sum truncated to rank ``k``, default the largest input rank). ``weights``: one per
    adapter (default 1). ``density``: the kept fraction for ``ties`` / ``dare_ties`` (default 0.5). ``base_model``
    (a model, left as it was, or a folder; default the folder the adapters name) is needed by PEFT's rules and by
    the LoRA export of non-LoRA adapters. Errors are ``MergeInputError`` (a ``ValueError``) naming the problem, or
    ``FileNotFoundError`` for a missing folder."""
    if rule not in RULES:
        raise MergeInputError(f"rule must be one of {', '.join(RULES)}; got {rule!r}.")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise MergeInputError(f"k must be an integer >= 1 (the merged LoRA's rank); got {k!r}.")
    if isinstance(adapters, (str, os.PathLike)) or not len(adapters):
        raise MergeInputError("adapters must be a non-empty list of adapter folders or (state_dict, config) pairs.")
    if density is not None and rule not in ("ties", "dare_ties"):
        raise MergeInputError(f"density applies to the ties and dare_ties rules, not {rule}.")
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise MergeInputError(f"density must be in (0, 1] (the fraction of entries kept); got {density!r}.")
    if rule == "lego" and k is None:
        raise MergeInputError("the lego rule needs k, the rank of the merged LoRA (e.g. -k 8).")
    if rule == "cat" and k is not None:
        raise MergeInputError("the cat rule's rank is the sum of the input ranks; drop k (or use --rule svd -k).")
    views = [load_adapter(a, i, base_model=base_model) for i, a in enumerate(adapters)]
    check_compatible(views)
    weights = [1.0] * len(views) if weights is None else [float(w) for w in weights]
    if len(weights) != len(views) or not all(math.isfinite(w) for w in weights):
        raise MergeInputError(f"weights must be {len(views)} finite numbers, one per adapter; got {weights}.")
    ranks = sorted({A.shape[0] for view in views for A, _, _, _ in view.modules.values()})
    if rule in ("linear", "ties", "dare_ties") and k is None and len(ranks) > 1:
        raise MergeInputError(f"the {rule} rule without k merges the factors, which needs adapters of one rank; got "
                              f"ranks {ranks}. Pass k to merge on ΔW with a rank-k SVD, or use the lego or cat rule.")
    if rule == "lego":
        state_dict, config = merge_views(views, k, reweight=reweight, seed=seed, weights=weights)
    else:
        state_dict, config = _peft_merge(views, rule, k, weights, 0.5 if density is None else density, base_model)
    if out is not None:
        write_lora_folder(out, state_dict, config)
    return state_dict, config


def _peft_merge(views, rule, k, weights, density, base_model):
    """PEFT's ``add_weighted_adapter`` on the base model, each view loaded as a scaling-1 LoRA adapter."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from .adapters import lora_config_for

    combination = _PEFT_TYPES[rule][0 if k is None else 1]
    base = _base_model(views[0], base_model)
    model = None
    try:
        names = []
        for i, view in enumerate(views):
            ranks = {m.removeprefix(PREFIX): A.shape[0] for m, (A, _, _, _) in view.modules.items()}
            r = max(ranks.values())
            config = lora_config_for([view], r, ranks, rank_pattern=ranks, alpha_pattern=ranks)
            config.modules_to_save = None
            state_dict = {}
            for module, (A, B, s, kind) in view.modules.items():
                a_key, b_key = ("lora_A.weight", "lora_B.weight") if kind == "linear" else \
                    ("lora_embedding_A", "lora_embedding_B")
                state_dict[f"{module}.{a_key}"], state_dict[f"{module}.{b_key}"] = A, B * s
            name = f"merge_input_{i}"
            if model is None:
                model = get_peft_model(base, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            set_peft_model_state_dict(model, state_dict, adapter_name=name)
            names.append(name)
        try:
            with torch.no_grad():
                model.add_weighted_adapter(names, weights, "merged", combination_type=combination, svd_rank=k,
                                           density=density if "ties" in combination else None)
        except ValueError as exc:
            raise MergeInputError(f"PEFT's {combination} merge refused the adapters: {exc}") from exc
        merged = {key: v.detach().clone() for key, v in get_peft_model_state_dict(model, adapter_name="merged").items()}
        rank = model.peft_config["merged"].r
    finally:
        if model is not None:
            model.unload()  # leave a caller's base model as it was
    merged.update(average_extra(views, weights))
    config = lora_config_for(views, rank, [m.removeprefix(PREFIX) for m in views[0].modules])
    return merged, config


def _base_model(view, base_model):
    if base_model is not None and not isinstance(base_model, (str, os.PathLike)):
        return base_model
    from pathlib import Path

    from ..cli import _base_model_for

    path = base_model or view.base
    if not path or not Path(path).exists():
        raise MergeInputError(f"PEFT's merge rules run on the adapters' base model; {path!r} is not a local folder "
                              "(pass base_model, or use --rule lego, which needs no base model).")
    config = view.config
    saved, config.base_model_name_or_path = config.base_model_name_or_path, str(path)
    try:
        return _base_model_for(config)
    finally:
        config.base_model_name_or_path = saved


def add_merged_adapter(model, adapters: Sequence[str], rule: str, adapter_name: str = "merged",
                   weights: Optional[Sequence[float]] = None, density: float = 0.5, svd_rank: Optional[int] = None,
                   lego_k: Optional[int] = None, majority_sign_method: str = "total", seed: int = 0,
                   lego_reweight: Optional[Sequence[str]] = None) -> str:
    """Merge LoRA adapters loaded in a PEFT ``model`` into a new LoRA adapter ``adapter_name`` of the same model (e.g.
    Octo-planner's planner, ``peft_ext.trainers.planner``): ``rule`` is a combination type of PEFT's
    ``add_weighted_adapter`` or ``lego``
    (``peft_ext.merging.add_lego_adapter``). ``weights`` default to 1.0 each; dare_* draw their masks after
    ``torch.manual_seed(seed)``; ``lego_k`` (default: the largest input rank) and ``lego_reweight`` (default: LEGO's
    dual reweighting) go to ``add_lego_adapter``. Returns ``adapter_name``."""
    import torch

    if rule not in IN_MODEL_RULES:
        raise ValueError(f"add_merged_adapter: rule must be one of {list(IN_MODEL_RULES)}; got {rule!r}.")
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict):
        raise ValueError("add_merged_adapter: model must be a PeftModel with LoRA adapters; got "
                         f"{type(model).__name__}.")
    adapters = list(adapters)
    missing = [a for a in adapters if a not in config]
    if not adapters or missing:
        raise ValueError(f"add_merged_adapter: adapters {missing or adapters} not found; the model has {list(config)}.")
    not_lora = [a for a in adapters if str(getattr(config[a].peft_type, "value", config[a].peft_type)) != "LORA"]
    if not_lora:
        raise ValueError(f"add_merged_adapter: {not_lora} are not LoRA adapters; export them first (PEFT's "
                         "convert_to_lora).")
    if adapter_name in config:
        raise ValueError(f"add_merged_adapter: adapter_name {adapter_name!r} exists already; choose another name.")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"add_merged_adapter: {len(weights)} weights for {len(adapters)} adapters.")
    torch.manual_seed(seed)
    if rule == "lego":
        rank = max(config[a].r for a in adapters)
        extra = {} if lego_reweight is None else {"reweight": tuple(lego_reweight)}
        add_lego_adapter(model, adapters, weights, adapter_name, k=lego_k or rank, seed=seed, **extra)
    else:
        kwargs = {}
        if rule.endswith("svd"):
            kwargs["svd_rank"] = svd_rank
        if rule not in ("linear", "cat", "svd"):
            kwargs["density"] = density
        if "ties" in rule:
            kwargs["majority_sign_method"] = majority_sign_method
        model.add_weighted_adapter(adapters, weights, adapter_name, combination_type=rule, **kwargs)
    if adapter_name not in model.peft_config:
        raise ValueError(f"add_merged_adapter: rule {rule!r} did not create adapter {adapter_name!r}.")
    return adapter_name
