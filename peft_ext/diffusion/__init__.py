"""Multi-LoRA composition for text-to-image diffusion on diffusers' PEFT backend: one pipeline, N adapters.

Needs the ``diffusion`` extra (diffusers). One file per method: ``compose`` (LoRA Merge / Switch / Composite),
``cmlora`` (CMLoRA), ``lora_composer`` (LoRA-Composer), ``clora`` (CLoRA), ``tara`` (TARA), ``gsvton`` (GS-VTON's
inpainting-LoRA stage); ``tiny`` builds offline test pipelines. The names below import lazily: ``import peft_ext`` and
``import peft_ext.diffusion`` never import diffusers; the first use of one of them imports its module. CMLoRA's entry
point is ``cmlora_generate`` here (``peft_ext.diffusion.cmlora`` is its module; ``cmlora.cmlora`` is the same function).
"""

from __future__ import annotations

import importlib

_MODULE_EXPORTS = {
    "compose": ["CompositionResult", "LoraSwitchCallback", "composite", "count_unet_evals", "merge", "save_unet_lora",
                "switch"],
    "cmlora": ["CMLoRAConfig", "cmlora_generate", "cmlora_schedule", "dominant_weights", "frequency_metric",
               "lora_frequency_metrics", "order_by_frequency", "refresh_steps"],
    "lora_composer": ["ComposerConcept", "LoraComposerAttnProcessor", "LoraComposerConfig", "composer_loss",
                      "isolation_bias", "lora_composer_generate", "reinit_latents", "token_positions"],
    "clora": ["CLoraConfig", "clora_generate", "contrastive_loss", "fuse_latents"],
    "tara": ["TaraTrainConfig", "add_tara", "alignment_loss", "cfg_routes", "compose_tara", "load_tara", "save_tara",
             "tara_config", "tara_generate", "tara_routes", "token_routes", "train_tara", "word_mask"],
    "gsvton": ["InpaintLoraConfig", "evaluate_inpaint_loss", "inpaint_loss", "make_box_mask", "save_inpaint_lora",
               "tiny_inpaint_pipeline", "train_inpaint_lora", "training_example"],
    "tiny": ["add_random_lora", "tiny_pipeline"],
}
_EXPORTS = {name: module for module, names in _MODULE_EXPORTS.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
