"""Multi-LoRA composition for text-to-image diffusion on diffusers' PEFT backend: one pipeline, N adapters.

Needs the ``diffusion`` extra (diffusers). One file per method; ``tiny`` builds offline test pipelines.
"""
