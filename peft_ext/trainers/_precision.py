"""The bf16 default of peft-ext's TRL configs."""

from __future__ import annotations

BF16_HELP = ("bf16 mixed precision. null = on only on a CUDA GPU with bf16. TRL's own default turns it on everywhere; "
             "on a CPU without native bf16 (AVX2 machines) every matmul then takes PyTorch's scalar fallback, about "
             "10x slower than fp32.")


def default_bf16(use_cpu: bool = False) -> bool:
    """True on a CUDA device with bf16 support (unless ``use_cpu``), else False: fp32 on CPU."""
    import torch

    return bool(not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
