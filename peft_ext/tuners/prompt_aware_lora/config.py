"""Prompt-aware LoRA configuration.

Paper: *WavLLM: Towards Robust and Adaptive Speech Large Language Model* (Hu et al., https://arxiv.org/abs/2404.00656),
the prompt-aware LoRA weight adapter. Official code: https://github.com/microsoft/SpeechT5 (``WavLLM/wavllm/models/
llama.py``: ``Attention_LoRA``, ``LLAMA.forward_generate`` with ``scale_fc_1`` / ``scale_fc_2`` /
``scale_weight_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from .._shared.base import ExtConfig, bad_value

SCALE_MODES = ("rank", "output")
NO_PROMPT = ("error", "fixed", "whole_input")


@dataclass
class PromptAwareLoraConfig(ExtConfig):
    """Configuration of WavLLM's prompt-aware LoRA (https://arxiv.org/abs/2404.00656, official code
    https://github.com/microsoft/SpeechT5, ``WavLLM/``).

    A prompt pass runs the frozen model with the LoRA switched off over the prompt tokens and takes the hidden states
    ``H`` of the last block (before the final norm). A small adapter maps them to scales:
    ``S = fc2(GELU(fc1(H)))`` (d → d/4 → d), ``a = softmax_T(w·S)``, ``p = Σ_t a_t S_t``. The main pass then computes
    ``y = xWᵀ + (drop(x)AᵀBᵀ)`` scaled by ``c`` instead of ``α/r``:

    * ``scale_mode='rank'`` (default; the issue's "per-rank scales"): each adapted layer has a head ``d → r`` and
      ``c = clamp(ReLU(head(p)), max=clamp)`` scales the r rank components, ``y = xWᵀ + ((drop(x)Aᵀ) ⊙ c)Bᵀ``. Works
      for every layer shape (GQA k/v, MLP).
    * ``scale_mode='output'`` (the official code): ``c = clamp(ReLU(p), max=clamp) ∈ R^d`` scales the output
      channels, ``y = xWᵀ + (drop(x)AᵀBᵀ) ⊙ c``; needs every adapted layer's output width to be d (LLaMA-7B q/k/v/o;
      wrong for GQA k/v, which is refused).

    The prompt is given per call with ``prompt_mask=`` (bool ``[batch, tokens]``, True on the instruction tokens), as
    WavLLM pools the instruction only. A stage-2 call without it raises by default (``no_prompt='error'``): pooling over
    the whole input would let later tokens (labels, under teacher forcing) change the scales of earlier positions.
    """

    method_name: ClassVar[str] = "prompt_aware_lora"

    r: int = field(default=8, metadata={"help": "LoRA rank r (paper: 8)."})
    lora_alpha: float = field(
        default=32,
        metadata={"help": "α; the scale α/r is used in stage 1 and when no prompt scale applies (paper: 32)."},
    )
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input, in [0, 1) (paper: 0.1)."})
    scale_mode: str = field(
        default="rank",
        metadata={
            "help": "'rank': a per-layer head maps the pooled prompt vector to r per-rank scales (any layer shape). "
            "'output': the official width-d scale of the output channels (every adapted layer must be d wide)."
        },
    )
    clamp: float = field(default=3.0, metadata={"help": "Upper clamp of the scales c (official: 3)."})
    adapter_hidden: Optional[int] = field(
        default=None, metadata={"help": "Width of the adapter's hidden layer (fc1 output); None: d // 4 (official)."}
    )
    hidden_module: Optional[str] = field(
        default=None,
        metadata={
            "help": "Module (name or dotted suffix) whose output is the prompt representation H. None: the last block "
            "of the model's last nn.ModuleList (the last decoder layer, before the final norm, as WavLLM); for models "
            "without one, or without a config hidden_size (and no hidden_size set), the input of the last adapted "
            "layer."
        },
    )
    hidden_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Width d of H; None: the model config's hidden_size (or the width found from hidden_module)."
        },
    )
    stage: int = field(
        default=2,
        metadata={
            "help": "WavLLM's curriculum stage: 1 = plain LoRA with α/r (adapter frozen, unused), 2 = the prompt-aware "
            "scales replace α/r. set_stage(model, 2) switches and is saved with the adapter."
        },
    )
    freeze_lora_in_stage2: bool = field(
        default=False,
        metadata={
            "help": "Freeze A and B in stage 2 and train only the adapter (the official flag second_stage_fix_lora; "
            "whether the paper does so is UNCERTAIN)."
        },
    )
    init_scale: bool = field(
        default=False,
        metadata={
            "help": "Initialise the scale head so that c starts at min(α/r, clamp) for every prompt (no output jump at "
            "the stage switch; UNCERTAIN, not in the paper). False: PyTorch's default Linear init (official)."
        },
    )
    no_prompt: str = field(
        default="error",
        metadata={
            "help": "What a stage-2 call without prompt_mask= does (a call that continues a KV cache keeps its "
            "scales). "
            "'error' (default): raise, so no model is trained or evaluated with scales that see future tokens. "
            "'fixed': the plain LoRA scale α/r, no prompt pass (the adapter gets no gradient from such calls). "
            "'whole_input': every (attended) input token is the prompt; NOT CAUSAL: later tokens (the labels, under "
            "teacher forcing) change the logits of earlier positions, so training and generation differ and labels "
            "leak; right only when the input is the prompt alone (e.g. generate from an instruction)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_positive_int("r")
        self.check_positive("lora_alpha")
        self.check_probability("lora_dropout")
        self.check_positive("clamp")
        self.check_finite("lora_alpha")
        self.check_finite("clamp")
        self.check_bool("freeze_lora_in_stage2", "init_scale")
        if self.scale_mode not in SCALE_MODES:
            raise bad_value(self, "scale_mode", self.scale_mode, f"one of {list(SCALE_MODES)}")
        if self.no_prompt not in NO_PROMPT:
            raise bad_value(self, "no_prompt", self.no_prompt, f"one of {list(NO_PROMPT)}")
        if self.stage not in (1, 2) or isinstance(self.stage, bool):
            raise bad_value(self, "stage", self.stage, "1 or 2")
        for name in ("adapter_hidden", "hidden_size"):
            if getattr(self, name) is not None:
                self.check_positive_int(name)
        if self.hidden_module is not None and (not isinstance(self.hidden_module, str) or not self.hidden_module):
            raise bad_value(self, "hidden_module", self.hidden_module, "None or a module name")
