"""RegionBLIP as a runnable recipe: *RegionBLIP: A Unified Multi-modal Pre-training Framework for Holistic and
Regional Comprehension* (https://arxiv.org/abs/2308.02299; official code https://github.com/mightyzau/RegionBLIP,
``lavis/models/regionblip_models/lora_modals.py``, read, not copied).

RegionBLIP keeps the LLM frozen and gives it one LoRA per modality (image, image region, point cloud, point-cloud
region), picked per call by the modality of the batch; batches of different modalities alternate; merging is
disabled (the same weight serves every modality). Here: our ``gated_lora`` tuner with one branch per modality and
``route_ids=<modality name>`` per call, ``default_route`` null so that ``merge_and_unload()`` refuses clearly.

Offline stand-in (``peft_ext.apps._modality``): a tiny LLaVA-like model (modality projectors → a small Llama
pre-trained here on a counting task), modalities ``image`` (digit patches) and ``pointcloud`` (the same digits as
point sets) from scikit-learn's bundled digits, captioning "what is this ? it is <digit>". The region modalities need
region-level annotations that do not ship offline: not reproduced. Measured: caption accuracy per modality for
per-modality LoRA against one shared LoRA of the same total rank, accuracy when a modality is routed to the other
modality's branch (do the branches specialise?), and the text task through the untouched base (route -1).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import _modality as M

PAPER = ("RegionBLIP: A Unified Multi-modal Pre-training Framework for Holistic and Regional Comprehension "
         "(https://arxiv.org/abs/2308.02299)")
CODE = "https://github.com/mightyzau/RegionBLIP"
MODALITIES = ("image", "pointcloud")


@dataclass
class RegionBLIPConfig(M.ModalityConfig):
    """Settings of the RegionBLIP per-modality LoRA recipe (https://arxiv.org/abs/2308.02299): the shared tiny
    LLaVA-like model and training (``ModalityConfig``) plus the data sizes and the shared-LoRA baseline."""

    train_examples: int = field(default=1000, metadata={"help": "Training captions per modality."})
    shared_baseline: bool = field(
        default=True, metadata={"help": "Also train one LoRA shared by both modalities, of rank = the sum of the "
                                "branch ranks (same parameter count)."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.train_examples, bool) or not isinstance(self.train_examples, int) or \
                self.train_examples < 1:
            raise ValueError(f"RegionBLIPConfig.train_examples must be an integer >= 1; got {self.train_examples!r}.")


def regionblip_config_from_recipe(recipe) -> RegionBLIPConfig:
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, RegionBLIPConfig)


def check_recipe(recipe) -> None:
    """``trainer: regionblip`` needs ``gated_lora`` without ``default_route`` whose branches include ``image`` and
    ``pointcloud`` (the preset's region branches may stay; no data routes to them here)."""
    M.check_no_default_route(recipe, "regionblip")
    branches = recipe.method.config.get("branches") or []
    missing = [m for m in MODALITIES if m not in branches]
    if missing:
        raise ValueError(f"method.config.branches must include {list(MODALITIES)} (one LoRA per modality, picked "
                         f"by route_ids=<modality>); missing {missing} in {branches!r}.")
    if recipe.method.config.get("mode", "route") != "route":
        raise ValueError("method.config.mode must be 'route' for trainer 'regionblip' (one branch per call).")
    regionblip_config_from_recipe(recipe)


def route_per_modality(batch: dict) -> dict:
    """RegionBLIP's routing: the batch's modality names the branch; text-only batches run the base (-1)."""
    if batch["features"] is None:
        return {"route_ids": torch.full((len(batch["answer"]),), -1)}
    return {"route_ids": batch["modality"]}


def route_shared(batch: dict) -> dict:
    """The baseline: every modality batch through the one shared branch; text-only batches run the base."""
    if batch["features"] is None:
        return {"route_ids": torch.full((len(batch["answer"]),), -1)}
    return {"route_ids": "shared"}


def route_swapped(batch: dict) -> dict:
    """Each modality through the *other* modality's branch (a specialisation probe)."""
    other = {"image": "pointcloud", "pointcloud": "image"}
    return {"route_ids": other[batch["modality"]]}


def train_regionblip_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for RegionBLIP (https://arxiv.org/abs/2308.02299), ``trainer: {name: regionblip, ...}``.

    Writes ``pretrained/lm.safetensors``, ``per_modality/adapter`` and ``shared/adapter`` (branches + projectors),
    ``metrics.json`` and ``results.png``, each atomically; with ``resume`` a finished stage is loaded, not redone."""
    from .._io import atomic_write_json
    from ..recipe import to_dict

    check_recipe(recipe)
    config = regionblip_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = recipe.data.seed
    lm_state, pre_stats = M.load_lm_state(out, config, recipe.seed, resume, quiet)
    train = [M.caption_data(m, "train", config.train_examples, config.points, seed) for m in MODALITIES]
    test = {m: M.caption_data(m, "test", config.eval_examples, config.points, seed) for m in MODALITIES}
    test["text"] = M.count_data("test", config.eval_examples, seed)

    per_config = M.gated_config(recipe)
    variants = {"per_modality": (per_config, route_per_modality)}
    if config.shared_baseline:
        variants["shared"] = (M.gated_config(recipe, branches=["shared"], r=sum(per_config.branch_ranks()),
                                             rank_ratio=None), route_shared)
    results, runs, extra = {}, {}, {}
    for name, (peft_config, route_fn) in variants.items():
        model, runs[name] = M.run_variant(out, name, recipe, config, lm_state, peft_config, train, route_fn, resume,
                                          quiet)
        results[name] = {task: M.accuracy(model, data, route_fn) for task, data in test.items()}
        if name == "per_modality":
            extra["swapped_branch_accuracy"] = {m: M.accuracy(model, test[m], route_swapped) for m in MODALITIES}
            batch = M.subset(test["image"], slice(0, min(16, config.eval_examples)))
            model.zero_grad()
            torch.nn.functional.cross_entropy(M.answer_logits(model, batch, route_ids="image"),
                                              batch["answer"]).backward()
            extra["branch_grad_norm_image_batch"] = M.branch_grad_norms(model)
            model.zero_grad()
            extra["merge_refused"] = M.merge_refusal(model)
    base = M.build_model(config, recipe.seed, lm_state)
    extra["pretrained_text_accuracy"] = M.accuracy(base, test["text"], lambda _: {})
    metrics = {
        "name": recipe.name, "trainer": "regionblip", "paper": PAPER, "official_code": CODE, "seed": recipe.seed,
        "regionblip": asdict(config), "lora_config": dict(recipe.method.config), "pretrain": pre_stats,
        "accuracy": results, **extra, "runs": runs, "chance": 0.1,
        "budget": {"wall_time_s": time.time() - began, "threads": torch.get_num_threads()},
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics, allow_nan=False)
    if recipe.evaluation.plot:
        M.plot_accuracy(results, "RegionBLIP stand-in: per-modality vs shared LoRA", out / "results.png")
    if not quiet:
        for name, r in results.items():
            print(f"regionblip — {name}: " + ", ".join(f"{t} {a:.3f}" for t, a in r.items()))
        print("regionblip — per_modality through the other modality's branch: " + ", ".join(
            f"{t} {a:.3f}" for t, a in extra["swapped_branch_accuracy"].items()))
        print(f"metrics: {out / 'metrics.json'}")
    return metrics


RECIPE = dict(config=RegionBLIPConfig, entry=train_regionblip_recipe, data=("digits",), tasks=("multimodal",),
              models=("tiny-llava",))
