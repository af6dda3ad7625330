"""Small pieces the application recipes share: the PEFT LoRA config of a recipe and seeded index batches."""

from __future__ import annotations

import torch


def plain_lora_config(recipe):
    """``LoraConfig(**method.config)`` without a task type: the application models (a ViT tracker, a contrastive text
    tower) are wrapped as custom models, not as one of PEFT's task heads."""
    from peft import LoraConfig

    kwargs = dict(recipe.method.config)
    kwargs.pop("task_type", None)
    return LoraConfig(**kwargs)


def index_batches(n: int, batch_size: int, steps: int, seed: int):
    """``steps`` batches of ``batch_size`` indices into ``n`` examples: seeded shuffled passes, concatenated, so every
    example is seen once per pass and a batch may span two passes."""
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=g)])
        idx, order = order[:batch_size], order[batch_size:]
        yield idx
