"""Prompt-aware LoRA: WavLLM's prompt-aware LoRA weight adapter, *WavLLM: Towards Robust and Adaptive Speech Large
Language Model* (https://arxiv.org/abs/2404.00656); official code https://github.com/microsoft/SpeechT5
(``WavLLM/``)."""

import torch

from .config import PromptAwareLoraConfig
from .layer import PromptAwareLoraLayer, PromptAwareLoraLinear
from .model import PromptAwareLoraModel, PromptPooler, prompt_aware_lora_layers, set_stage
from ...spec import MethodSpec


def _example_call(shape: tuple) -> dict:
    # the first half of every sample's tokens is the instruction
    return {"prompt_mask": (torch.arange(shape[-1]) < (shape[-1] + 1) // 2).expand(shape)}


SPEC = MethodSpec(
    name="prompt_aware_lora",
    config_cls=PromptAwareLoraConfig,
    model_cls=PromptAwareLoraModel,
    paper_title="WavLLM: Towards Robust and Adaptive Speech Large Language Model",
    paper_url="https://arxiv.org/abs/2404.00656",
    code_url="https://github.com/microsoft/SpeechT5",
    # no_prompt: callers without prompt_mask= (TRL, the benchmark) pool over the whole input
    example_kwargs={"r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "no_prompt": "whole_input"},
    example_call=_example_call,
    mergeable=False,
    lora_convertible=False,
    routed=True,
    saturating_scales=True,  # c = clamp(relu(.), max=clamp), as WavLLM
    summary="WavLLM's prompt-aware LoRA: a prompt pass without LoRA predicts per-prompt LoRA scales (`prompt_mask=`).",
)

__all__ = ["SPEC", "PromptAwareLoraConfig", "PromptAwareLoraLayer", "PromptAwareLoraLinear", "PromptAwareLoraModel",
           "PromptPooler", "prompt_aware_lora_layers", "set_stage"]
