"""Saving a peft-ext adapter trained on a base model sharded with FSDP.

With FSDP2 (``torch.distributed.fsdp.fully_shard``, what accelerate's FSDP plugin applies with ``fsdp_version=2``)
every parameter of a wrapped module, base and adapter alike, is a ``DTensor`` shard between forwards. Training needs
nothing from peft-ext: each tuner layer runs inside its decoder block's forward, where FSDP has gathered the full
weights. Saving does: ``PeftModel.save_pretrained`` on a sharded model sees only this rank's shards (a ``DTensor`` has
no storage to serialise, so it fails). ``save_adapter`` gathers the full state dict (a collective: every rank calls
it), and the main process alone writes the adapter, which ``PeftModel.from_pretrained`` loads as usual, unsharded.

With accelerate the same can be written by hand: ``state = accelerator.get_state_dict(model)`` on every rank, then
``accelerator.unwrap_model(model).save_pretrained(path, state_dict=state)`` on the main process;
``transformers.Trainer`` does exactly that in ``save_model`` under FSDP.

Built on PEFT (https://github.com/huggingface/peft) and torch's distributed checkpoint API; the methods and their
papers are listed by ``peft_ext.list_methods()``.
"""

from __future__ import annotations

import os
from typing import Union

import torch
from torch import nn


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP-sharded parameters (FSDP2 ``DTensor`` s) or is wrapped by FSDP1."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    return any(isinstance(p, DTensor) for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The ``PeftModel`` inside ``model``: FSDP2 shards in place (the object is the model), FSDP1 / DDP wrap it in
    ``.module``, ``torch.compile`` in ``._orig_mod``."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def local_shard(tensor: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """The part of ``tensor`` this rank holds, and which rows (dim 0) of the full tensor they are.

    For a plain tensor: the tensor itself and every row. For an FSDP2 ``DTensor`` (sharded on dim 0 over a 1-D mesh):
    its local shard, a view whose in-place edits change the shard. For layer code that edits parameters, gradients or
    optimizer state in place outside a forward (e.g. SwitchLoRA's switches): edit ``local`` with ``[rows]`` slices of
    full-size operands, the same code for sharded and unsharded models."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor, slice(0, tensor.shape[0] if tensor.dim() else 1)
    if tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        raise NotImplementedError(
            f"peft-ext edits sharded tensors sharded on dim 0 over one mesh dimension (FSDP2 fully_shard); got "
            f"placements {tuple(tensor.placements)} on a {tensor.device_mesh.ndim}-D mesh."
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tensor.to_local(), slice(offset[0], offset[0] + shape[0])


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of ``tensor``: an all-gathered copy of an FSDP2 ``DTensor`` (a collective), the tensor itself
    otherwise (so in-place edits of the result reach an unsharded parameter directly)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def write_back(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Store ``full`` (the edited result of ``gathered(tensor)``) into ``tensor``: this rank's rows into its shard of
    a ``DTensor``; nothing for a plain tensor that ``full`` already is."""
    if full is tensor:
        return
    local, rows = local_shard(tensor)
    local.copy_(full[rows])


def full_state_dict(model: nn.Module) -> dict:
    """The full (unsharded) state dict of ``model``, on CPU, on the main process; ``{}`` on the other ranks. A
    collective when ``model`` is sharded: call it on every rank. Unsharded models return their own state dict."""
    if not (_distributed() and is_sharded(model)):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_adapter(model: nn.Module, save_directory: Union[str, os.PathLike], **kwargs) -> bool:
    """Save the adapter(s) of a possibly FSDP-sharded ``PeftModel`` once, gathered, from the main process.

    Call it on every rank (the gather is a collective); rank 0 writes ``save_directory`` through
    ``PeftModel.save_pretrained(save_directory, state_dict=..., **kwargs)`` (atomically, like every peft-ext save),
    then all ranks wait for it (also when the write fails: the main process raises after the barrier). Returns whether
    this process wrote the adapter. Without ``torch.distributed`` it is plain ``save_pretrained``.
    """
    peft_model = unwrap(model)
    if not hasattr(peft_model, "peft_config"):
        raise TypeError(
            f"save_adapter needs a PeftModel (or one wrapped by FSDP / DDP); got {type(peft_model).__name__}."
        )
    if "state_dict" in kwargs:
        raise TypeError("save_adapter gathers the state dict itself; do not pass state_dict=.")
    state = full_state_dict(model)
    main = not _distributed() or torch.distributed.get_rank() == 0
    try:
        if main:
            peft_model.save_pretrained(save_directory, state_dict=state, **kwargs)
    finally:  # a failed write still meets the other ranks here, so none of them hangs in the next collective
        if _distributed():
            torch.distributed.barrier()
    return main


__all__ = ["full_state_dict", "gathered", "is_sharded", "local_shard", "save_adapter", "unwrap", "write_back"]
