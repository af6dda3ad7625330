"""LoRA Merge / Switch / Composite on one diffusers pipeline holding N PEFT adapters (the multi-LoRA baselines).

After *Multi-LoRA Composition for Image Generation* (Zhong et al., 2024; https://github.com/maszhongming/Multi-LoRA-Composition).
The official code forks diffusers 0.26 and edits the pipeline's loop; here every method runs through the unmodified
``StableDiffusionPipeline.__call__``:

- **Merge**: all adapters active at once (``set_adapters`` with weights, 1.0 each as in the official run), optionally
  fused into the base weights.
- **Switch**: one adapter active at a time; a ``callback_on_step_end`` activates the next one (cyclically) after step
  ``i`` when ``i > 0 and i % switch_step == 0`` (the official condition, so the first adapter runs ``switch_step + 1``
  steps and the others ``switch_step``).
- **Composite**: at every step the UNet runs once per adapter on the CFG batch ``[uncond; cond]`` and the predictions
  are averaged before guidance. Guidance is linear, so averaging the batched outputs and letting the pipeline apply
  CFG is the official ``mean_k ε_u^k + w (mean_k ε_c^k − mean_k ε_u^k)``; we do it by temporarily replacing the UNet's
  ``forward`` for the duration of the call.

Every function returns a ``CompositionResult`` whose ``unet_evals`` counts real UNet passes (one CFG-batched pass counts
once) — the cost measure of the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch


@dataclass
class CompositionResult:
    """What a composition call returns."""

    images: Any = field(metadata={"help": "The pipeline's images (a tensor for output_type='pt' or 'latent')."})
    unet_evals: int = field(metadata={"help": "UNet passes run (a CFG-batched [uncond; cond] pass counts once)."})
    deep_evals: int = field(metadata={"help": "Passes through the deep UNet blocks (== unet_evals unless CMLoRA "
                                              "reuses cached deep features)."})
    active: list = field(default_factory=list,
                         metadata={"help": "Per denoising step: the adapter(s) active (Switch), the dominant adapter "
                                           "(CMLoRA), or all adapters (Merge, Composite)."})


def check_adapters(pipe, adapters, field_name: str = "adapters") -> list:
    """Validate a list of adapter names against the pipeline's UNet; returns it as a list of str."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or len(adapters) == 0:
        raise ValueError(f"{field_name}: expected a non-empty list of adapter names, got {adapters!r}")
    names = list(adapters)
    known = sorted(getattr(pipe.unet, "peft_config", {}) or {})
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{field_name}: adapter names are strings, got {name!r}")
        if name not in known:
            raise ValueError(f"{field_name}: unknown adapter {name!r}; the pipeline's UNet has {known}")
    if len(set(names)) != len(names):
        raise ValueError(f"{field_name}: each adapter may appear once, got {names}")
    return names


def _check_pipe_kwargs(pipe_kwargs: dict, reserved: Sequence[str]) -> None:
    for key in reserved:
        if key in pipe_kwargs:
            raise ValueError(f"{key}: set by this composition method; do not pass it through the pipeline kwargs")


@contextlib.contextmanager
def count_unet_evals(unet):
    """Count real UNet passes inside the block (a forward pre-hook on ``conv_in``, which every pass runs once)."""
    counter = {"n": 0}

    def hook(module, args):
        counter["n"] += 1

    handle = unet.conv_in.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


@contextlib.contextmanager
def patched_forward(module, make_forward: Callable[[Callable], Callable]):
    """Replace ``module.forward`` by ``make_forward(original_forward)`` inside the block (restored afterwards)."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = make_forward(module.forward)
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


@contextlib.contextmanager
def restore_adapters(pipe):
    """Put back the UNet's active adapters after a composition call, whatever it changed."""
    before = list(pipe.unet.active_adapters()) if getattr(pipe.unet, "peft_config", None) else []
    try:
        yield
    finally:
        if before:
            pipe.unet.set_adapters(before)


def _sample_of(output):
    return output[0] if isinstance(output, tuple) else output.sample


def _like(output, sample):
    if isinstance(output, tuple):
        return (sample,) + tuple(output[1:])
    output.sample = sample
    return output


def composite_forward(unet, original_forward, adapters: Sequence[str], weights: Optional[Sequence[float]] = None):
    """A UNet ``forward`` that runs ``original_forward`` once per adapter and returns the (weighted) mean prediction.

    ``weights`` multiply each adapter's prediction before the mean (CMLoRA's dominant weights); None = plain mean."""

    def forward(*args, **kwargs):
        outputs, first = [], None
        for k, name in enumerate(adapters):
            unet.set_adapters([name])
            out = original_forward(*args, **kwargs)
            first = out if first is None else first
            pred = _sample_of(out)
            outputs.append(pred if weights is None else pred * weights[k])
        return _like(first, torch.stack(outputs, dim=0).mean(dim=0))

    return forward


def merge(pipe, adapters: Sequence[str], weights: Optional[Sequence[float]] = None, fuse: bool = False,
          **pipe_kwargs) -> CompositionResult:
    """LoRA Merge: all ``adapters`` active together with ``weights`` (default 1.0 each, the official baseline);
    ``fuse=True`` fuses them into the base weights for the call (same images up to float rounding, no LoRA overhead;
    the base weights are restored bit-exactly afterwards)."""
    names = check_adapters(pipe, adapters)
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"weights: expected {len(names)} values (one per adapter), got {len(weights)}")
    with restore_adapters(pipe), count_unet_evals(pipe.unet) as counter:
        pipe.unet.set_adapters(names, weights=[float(w) for w in weights])
        # unfuse subtracts the delta again, which is off by float rounding: keep the base weights and put them back
        saved = [(m.base_layer.weight, m.base_layer.weight.detach().clone())
                 for m in pipe.unet.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")] if fuse else []
        if fuse:
            pipe.unet.fuse_lora(adapter_names=names)
        try:
            images = pipe(**pipe_kwargs).images
        finally:
            if fuse:
                pipe.unet.unfuse_lora()
                with torch.no_grad():
                    for weight, copy in saved:
                        weight.copy_(copy)
    steps = counter["n"]
    return CompositionResult(images, counter["n"], counter["n"], [list(names)] * steps)


class LoraSwitchCallback:
    """``callback_on_step_end`` of LoRA Switch: after step ``i`` with ``i > 0 and i % switch_step == 0`` activate the
    next adapter (cyclically). Records the adapter each step ran with in ``sequence``."""

    def __init__(self, adapters: Sequence[str], switch_step: int = 5):
        if isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 1:
            raise ValueError(f"switch_step: expected an integer >= 1, got {switch_step!r}")
        self.adapters = list(adapters)
        self.switch_step = switch_step
        self.current = 0
        self.sequence: list = []

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        self.sequence.append(self.adapters[self.current])
        if step_index > 0 and step_index % self.switch_step == 0:
            self.current = (self.current + 1) % len(self.adapters)
            pipe.unet.set_adapters([self.adapters[self.current]])
        return {}


def switch(pipe, adapters: Sequence[str], switch_step: int = 5, **pipe_kwargs) -> CompositionResult:
    """LoRA Switch: start with ``adapters[0]`` alone and activate the next one every ``switch_step`` steps."""
    names = check_adapters(pipe, adapters)
    _check_pipe_kwargs(pipe_kwargs, ["callback_on_step_end"])
    callback = LoraSwitchCallback(names, switch_step)
    with restore_adapters(pipe), count_unet_evals(pipe.unet) as counter:
        pipe.unet.set_adapters([names[0]])
        images = pipe(callback_on_step_end=callback, **pipe_kwargs).images
    return CompositionResult(images, counter["n"], counter["n"], list(callback.sequence))


def composite(pipe, adapters: Sequence[str], **pipe_kwargs) -> CompositionResult:
    """LoRA Composite: every step runs the UNet once per adapter and averages the unconditional and conditional
    predictions before classifier-free guidance (N UNet passes per step)."""
    names = check_adapters(pipe, adapters)
    unet = pipe.unet
    with restore_adapters(pipe), count_unet_evals(unet) as counter, \
            patched_forward(unet, lambda original: composite_forward(unet, original, names)):
        images = pipe(**pipe_kwargs).images
    steps = counter["n"] // len(names)
    return CompositionResult(images, counter["n"], counter["n"], [list(names)] * steps)


def save_unet_lora(pipe, adapter_name: str, folder, weight_name: str = "pytorch_lora_weights.safetensors") -> Path:
    """Save one UNet adapter in diffusers' LoRA layout (``save_lora_weights`` on the converted PEFT state dict, with
    the adapter's LoRA config as metadata), so ``pipe.load_lora_weights(folder, adapter_name=...)`` loads it back.

    Written to a temporary folder beside ``folder`` and moved into place: the file is whole or absent."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    (name,) = check_adapters(pipe, [adapter_name], "adapter_name")
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=name))
    metadata = pipe.unet.peft_config[name].to_dict()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=folder))
    try:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, weight_name=weight_name,
                                                  unet_lora_adapter_metadata=metadata)
        os.replace(tmp / weight_name, folder / weight_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / weight_name
