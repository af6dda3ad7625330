"""Arcana's MM-LoRA as a runnable recipe: *Improving Multi-modal Large Language Model through Boosting Vision
Capabilities* (https://arxiv.org/abs/2410.13733; no public code, project page only).

MM-LoRA gives the LLM decoder two LoRAs, a vision one applied to the visual tokens and a language one applied to the
text tokens of the same sequence (``y_t = xWᵀ + v_t·s_v B_v A_v x_t + (1 − v_t)·s_l B_l A_l x_t``), so the two kinds
of knowledge do not interfere. Here: our ``gated_lora`` tuner with branches ``[vision, language]`` and a per-token
``modality=`` mask (True on the projected image tokens), ``default_route`` null so merging is refused (the per-token
choice has no single merged weight). The paper's QLadder visual adapter is outside PEFT and not reproduced.

Offline stand-in (``peft_ext.apps._modality``): a tiny LLaVA-like model (an image projector → a small Llama
pre-trained here on a counting task), digit captioning from scikit-learn's bundled digits mixed with the text-only
counting task. Measured: caption and counting accuracy for MM-LoRA against one LoRA on every token with the same
total rank, and against the pre-trained language model's counting accuracy (language retention).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import _modality as M

PAPER = "Improving Multi-modal Large Language Model through Boosting Vision Capabilities (Arcana, https://arxiv.org/abs/2410.13733)"
CODE = "none public (project page only)"


@dataclass
class ArcanaConfig(M.ModalityConfig):
    """Settings of the Arcana MM-LoRA recipe (https://arxiv.org/abs/2410.13733): the shared tiny LLaVA-like model and
    training (``ModalityConfig``) plus the data sizes and the single-LoRA baseline."""

    train_examples: int = field(default=1000, metadata={"help": "Training examples per task (captions, counting)."})
    single_baseline: bool = field(
        default=True, metadata={"help": "Also train one LoRA on every token, of rank = the sum of the branch ranks."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.train_examples, bool) or not isinstance(self.train_examples, int) or \
                self.train_examples < 1:
            raise ValueError(f"ArcanaConfig.train_examples must be an integer >= 1; got {self.train_examples!r}.")


def arcana_config_from_recipe(recipe) -> ArcanaConfig:
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, ArcanaConfig)


def check_recipe(recipe) -> None:
    """``trainer: arcana`` needs ``gated_lora`` with exactly two branches (vision first: ``modality=True`` selects
    ``branches[0]``) and no ``default_route``."""
    M.check_no_default_route(recipe, "arcana")
    branches = recipe.method.config.get("branches") or []
    if len(branches) != 2:
        raise ValueError(f"method.config.branches must be two names, vision first then language (modality=True "
                         f"selects branches[0]); got {branches!r}.")
    arcana_config_from_recipe(recipe)


def route_mm(batch: dict) -> dict:
    """MM-LoRA: True (vision branch) on the image tokens, False (language branch) on the text tokens."""
    return {"modality": M.token_modality(batch)}


def route_single(batch: dict) -> dict:
    """The baseline: the one branch on every token."""
    return {"route_ids": "shared"}


def train_arcana_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for Arcana's MM-LoRA (https://arxiv.org/abs/2410.13733), ``trainer: {name: arcana, ...}``.

    Writes ``pretrained/lm.safetensors``, ``mm_lora/adapter`` and ``single_lora/adapter``, ``metrics.json`` and
    ``results.png``, each atomically; with ``resume`` a finished stage is loaded, not redone."""
    from .._io import atomic_write_json
    from ..recipe import to_dict

    check_recipe(recipe)
    config = arcana_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = recipe.data.seed
    lm_state, pre_stats = M.load_lm_state(out, config, recipe.seed, resume, quiet)
    train = [M.caption_data("image", "train", config.train_examples, config.points, seed),
             M.count_data("train", config.train_examples, seed)]
    test = {"image": M.caption_data("image", "test", config.eval_examples, config.points, seed),
            "text": M.count_data("test", config.eval_examples, seed)}
    mm_config = M.gated_config(recipe)
    variants = {"mm_lora": (mm_config, route_mm)}
    if config.single_baseline:
        variants["single_lora"] = (M.gated_config(recipe, branches=["shared"], r=sum(mm_config.branch_ranks()),
                                                  rank_ratio=None), route_single)
    results, runs, extra = {}, {}, {}
    for name, (peft_config, route_fn) in variants.items():
        model, runs[name] = M.run_variant(out, name, recipe, config, lm_state, peft_config, train, route_fn, resume,
                                          quiet)
        results[name] = {task: M.accuracy(model, data, route_fn) for task, data in test.items()}
        if name == "mm_lora":
            grads = {}
            for task in ("image", "text"):
                batch = M.subset(test[task], slice(0, min(16, config.eval_examples)))
                model.zero_grad()
                torch.nn.functional.cross_entropy(M.answer_logits(model, batch, **route_mm(batch)),
                                                  batch["answer"]).backward()
                grads[task] = M.branch_grad_norms(model)
            model.zero_grad()
            extra["branch_grad_norm"] = grads
            extra["merge_refused"] = M.merge_refusal(model)
    base = M.build_model(config, recipe.seed, lm_state)
    extra["pretrained_text_accuracy"] = M.accuracy(base, test["text"], lambda _: {})
    metrics = {
        "name": recipe.name, "trainer": "arcana", "paper": PAPER, "official_code": CODE, "seed": recipe.seed,
        "arcana": asdict(config), "lora_config": dict(recipe.method.config), "pretrain": pre_stats,
        "accuracy": results, **extra, "runs": runs, "chance": {"image": 0.1, "text": 1 / len(M.NUMBER_WORDS)},
        "budget": {"wall_time_s": time.time() - began, "threads": torch.get_num_threads()},
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics, allow_nan=False)
    if recipe.evaluation.plot:
        M.plot_accuracy(results, "Arcana stand-in: MM-LoRA vs one LoRA", out / "results.png")
    if not quiet:
        for name, r in results.items():
            print(f"arcana — {name}: " + ", ".join(f"{t} {a:.3f}" for t, a in r.items()))
        print(f"arcana — pre-trained LM counting accuracy {extra['pretrained_text_accuracy']:.3f}")
        print(f"metrics: {out / 'metrics.json'}")
    return metrics


RECIPE = dict(config=ArcanaConfig, entry=train_arcana_recipe, data=("digits",), tasks=("multimodal",),
              models=("tiny-llava",))
