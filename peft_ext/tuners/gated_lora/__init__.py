"""Gated LoRA: LoRA branches switched on per token by per-call route inputs. One tuner for the gated LoRA of
*Your LLM Knows the Future* (MTP, https://arxiv.org/abs/2507.11851; no official code, unofficial
https://github.com/siihwanpark/MTP-GLoRA), TARA (https://arxiv.org/abs/2508.08812; https://github.com/YuqiPeng77/TARA),
Arcana's MM-LoRA (https://arxiv.org/abs/2410.13733; no public code) and RegionBLIP (https://arxiv.org/abs/2308.02299;
https://github.com/mightyzau/RegionBLIP)."""

import torch

from .config import GatedLoraConfig
from .layer import GatedLoraLayer, GatedLoraLinear
from .model import GatedLoraModel, gated_lora_layers, save_branch_as_lora
from ...spec import MethodSpec


def _example_call(shape: tuple) -> dict:
    # route ids cycling -1 (base only), 0, 1 over the tokens; TARA's align_mask on as many (mirrored) tokens
    route = (torch.arange(torch.Size(shape).numel()) % 3 - 1).reshape(shape)
    return {"route_ids": route, "align_mask": (route >= 0).flip(-1)}


SPEC = MethodSpec(
    name="gated_lora",
    config_cls=GatedLoraConfig,
    model_cls=GatedLoraModel,
    paper_title="Your LLM Knows the Future: Uncovering Its Multi-Token Prediction Potential (gated LoRA; also TARA, "
    "Arcana MM-LoRA, RegionBLIP)",
    paper_url="https://arxiv.org/abs/2507.11851",
    code_url="",
    # one branch applied to every token when no route input is given: the conformance suite, TRL and the benchmark
    # call the model without route inputs, so the adapter trains there; merged == unmerged-without-route-inputs.
    example_kwargs={"r": 8, "lora_alpha": 16, "branches": ["default"], "default_route": "default"},
    # the conformance suite's forwards route per token over two branches and train TARA's alignment loss
    example_call=_example_call,
    conformance_kwargs={"branches": ["default", "other"], "alignment_loss_weight": 0.1},
    mergeable=True,
    lora_convertible=True,
    routed=True,
    summary="LoRA branches switched on per token (`route_ids=`/`modality=`/`gate=`): MTP gated LoRA, TARA, MM-LoRA, "
    "RegionBLIP.",
    overhead_target=1.10,
    bench_variants=(("2 branches, mode='sum' (MM-LoRA)", {"branches": ["vision", "language"], "mode": "sum",
                                                           "default_route": None}),),
)

__all__ = ["SPEC", "GatedLoraConfig", "GatedLoraLayer", "GatedLoraLinear", "GatedLoraModel", "gated_lora_layers",
           "save_branch_as_lora"]
