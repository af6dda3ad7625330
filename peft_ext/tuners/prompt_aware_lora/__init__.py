"""Prompt-aware LoRA: WavLLM's prompt-aware LoRA weight adapter, *WavLLM: Towards Robust and Adaptive Speech Large
Language Model* (https://arxiv.org/abs/2404.00656); official code https://github.com/microsoft/SpeechT5 (``WavLLM/``)."""

from .config import PromptAwareLoraConfig
from .layer import PromptAwareLoraLayer, PromptAwareLoraLinear
from .model import PromptAwareLoraModel, PromptPooler, prompt_aware_lora_layers, set_stage
from ...spec import MethodSpec


SPEC = MethodSpec(
    name="prompt_aware_lora",
    config_cls=PromptAwareLoraConfig,
    model_cls=PromptAwareLoraModel,
    paper_title="WavLLM: Towards Robust and Adaptive Speech Large Language Model",
    paper_url="https://arxiv.org/abs/2404.00656",
    code_url="https://github.com/microsoft/SpeechT5",
    example_kwargs={"r": 8, "lora_alpha": 32, "lora_dropout": 0.0},
    mergeable=False,
    lora_convertible=False,
    routed=True,
    summary="WavLLM's prompt-aware LoRA: a prompt pass without LoRA predicts per-prompt LoRA scales (`prompt_mask=`).",
)

__all__ = ["SPEC", "PromptAwareLoraConfig", "PromptAwareLoraLayer", "PromptAwareLoraLinear", "PromptAwareLoraModel",
           "PromptPooler", "prompt_aware_lora_layers", "set_stage"]
