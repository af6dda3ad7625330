"""One rank of an FSDP2 training run over every registered method, launched by ``tests/test_fsdp.py``:

    accelerate launch --multi_gpu --num_processes 2 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_state_dict_type FULL_STATE_DICT \
        tests/fsdp_worker.py --out DIR [--methods a,b]

For each method: a tiny random Llama (the same on every rank) gets the method's conformance adapter and is prepared by
accelerate's FSDP2 path (``Accelerator.prepare``: ``fully_shard`` on every decoder layer, the embedding / tail group
and the root, so base and adapter parameters both become sharded ``DTensor`` s); ``STEPS`` optimizer steps follow, each
rank on its own batch, with the method's training callback (DyLoRA's rank sampler, CoDyRA's thresholds, SMoRA's bias,
SwitchLoRA's switches) driven through its ``Trainer`` events. The adapter is then saved once:
``peft_ext.fsdp.save_adapter`` gathers the full state dict (a collective, every rank calls it) and the main process
writes ``DIR/<method>/adapter``. Each rank writes ``DIR/<method>/rank{RANK}.json``: world size, how many parameters are
sharded, whether it wrote the adapter, the losses, or the error the method raised.

CPU note: accelerate (1.16) enables its FSDP plugin only on accelerator devices; on CPU (``MULTI_CPU``) it silently
drops the plugin and wraps the model in DDP. ``enable_fsdp_on_cpu`` points accelerate's state at FSDP after it
started, so that ``prepare`` / ``get_state_dict`` run the same FSDP2 code a GPU run takes; torch's ``fully_shard``
itself supports CPU tensors over gloo.

Not collected by pytest; ``reference_run`` (the same training in one process, two micro-batches per step with their
gradients averaged, which is what FSDP's reduce-scatter computes) is imported by the test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_worker import shutdown  # noqa: E402  (leave the process group, exit without interpreter teardown)

VOCAB, SEQ_LEN, BATCH, STEPS, WORLD = 128, 12, 2, 3, 2
DATA_SEED, LR = 7, 1e-2
TARGETS = ["q_proj", "v_proj"]
ROOT = Path(__file__).resolve().parents[1]
# Config overrides that make a STEPS-step run exercise what the method does during training: SwitchLoRA's paper
# interval (40 steps per r switches) would switch about once in these three steps; every step switches here.
TRAINING_OVERRIDES = {"switchlora": {"switch_interval": 2.0, "fixed_interval": True, "adam_warm_step": 1}}


def build_model(name: str):
    """Tiny random Llama (conftest's, hidden 64, 2 blocks) with ``name``'s conformance adapter (auxiliary losses on,
    routed methods with per-call routes); identical in every process."""
    from peft import get_peft_model

    import peft_ext
    from conftest import conformance_config, tiny_llama

    spec = peft_ext.get_method(name)
    torch.manual_seed(1)
    config = conformance_config(spec, TARGETS, **TRAINING_OVERRIDES.get(name, {}))
    return spec, get_peft_model(tiny_llama(), config).train()


def batch(step: int, rank: int) -> torch.Tensor:
    """The token rows ``rank`` trains on at ``step`` (no padding: every rank has the same number of loss tokens)."""
    gen = torch.Generator().manual_seed(DATA_SEED * 1000 + step * WORLD + rank)
    return torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=gen)


def make_optimizer(model):
    # AdamW without weight decay; SwitchLoRA's callback resets Adam state, so every method uses Adam alike
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)


class Events:
    """The method's training callback (if any) driven through its Trainer events, as ``transformers.Trainer`` does."""

    def __init__(self, spec, model):
        from transformers import TrainerControl, TrainerState

        self.cb = spec.train_callback(model=model, seed=0) if spec.train_callback is not None else None
        self.state, self.control = TrainerState(), TrainerControl()
        self.state.max_steps = STEPS
        self.model = model

    def __call__(self, event: str, step: int, optimizer=None):
        if self.cb is None:
            return
        self.state.global_step = step
        getattr(self.cb, event)(None, self.state, self.control, model=self.model, optimizer=optimizer)


def reference_run(name: str) -> dict:
    """The FSDP run's training in one process: at each step, the two ranks' batches as two micro-batches whose losses
    are halved (their gradients averaged, as FSDP's reduce-scatter averages over ranks). Returns the trained model's
    adapter state dict (``get_peft_model_state_dict``) and the model."""
    from peft import get_peft_model_state_dict

    from conftest import call_kwargs

    spec, model = build_model(name)
    optimizer = make_optimizer(model)
    events = Events(spec, model)
    events("on_train_begin", 0)
    for step in range(STEPS):
        events("on_step_begin", step)
        for rank in range(WORLD):
            ids = batch(step, rank)
            out = model(input_ids=ids, labels=ids, **call_kwargs(spec, ids.shape))
            (out.loss / WORLD).backward()
        events("on_pre_optimizer_step", step, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        events("on_optimizer_step", step, optimizer)
    return {"state": get_peft_model_state_dict(model), "model": model, "spec": spec}


def enable_fsdp_on_cpu(accelerator) -> None:
    """Make accelerate take its FSDP2 path on CPU (see the module docstring): set the distributed type of its shared
    state to FSDP and give it the plugin that ``accelerate launch --use_fsdp`` described in the environment."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.FSDP:
        return  # a GPU run: accelerate did it itself
    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with accelerate launch --use_fsdp"
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin()
    assert accelerator.is_fsdp2, "the plugin from the environment is not FSDP2 (pass --fsdp_version 2)"


@torch.no_grad()
def check_shard_helpers(model) -> bool:
    """``peft_ext.fsdp.local_shard`` / ``gathered`` / ``write_back`` on this run's sharded parameters: the local
    shard is the full tensor's ``rows``, and a written-back edit is what the next gather sees (then undone exactly)."""
    from peft_ext.fsdp import gathered, local_shard, write_back

    ok = True
    for param in (p for p in model.parameters() if p.dim() == 2):
        local, rows = local_shard(param)
        full = gathered(param)
        ok &= full.shape == param.shape and rows.stop - rows.start == local.shape[0]
        ok &= torch.equal(full[rows], local)
        write_back(param, full + 1)
        ok &= torch.equal(gathered(param), full + 1)
        write_back(param, full)
        ok &= torch.equal(gathered(param), full)
    return bool(ok)


def train_one(accelerator, name: str, out: Path) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from conftest import call_kwargs
    from peft_ext.fsdp import save_adapter

    rank = dist.get_rank()
    spec, model = build_model(name)
    optimizer = make_optimizer(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "process_index": accelerator.process_index,
        "wrapper": type(model).__name__,
        "sharded": sum(isinstance(p, DTensor) for p in model.parameters()),
        "parameters": sum(1 for _ in model.parameters()),
        "losses": [],
    }
    record["local_shard_ok"] = check_shard_helpers(model)
    events = Events(spec, accelerator.unwrap_model(model))
    events("on_train_begin", 0)
    for step in range(STEPS):
        events("on_step_begin", step)
        ids = batch(step, rank)
        loss = model(input_ids=ids, labels=ids, **call_kwargs(spec, ids.shape)).loss
        accelerator.backward(loss)
        events("on_pre_optimizer_step", step, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        events("on_optimizer_step", step, optimizer)
        record["losses"].append(float(loss.detach()))
    record["wrote"] = save_adapter(model, out / "adapter")
    return record


def watchdog(seconds: float) -> None:
    """Exit this rank after ``seconds``: torch's launcher starts each rank in its own session, so a rank stuck in a
    collective (the other rank failed between two) would outlive the test's kill of the launcher."""
    import threading

    timer = threading.Timer(seconds, lambda: os._exit(3))
    timer.daemon = True
    timer.start()


def main(argv=None) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator

    import peft_ext

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="", help="comma-separated method names (default: every method)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds after which this rank exits (code 3)")
    args = parser.parse_args(argv)
    watchdog(args.timeout)
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    enable_fsdp_on_cpu(accelerator)
    names = [n for n in args.methods.split(",") if n] or [spec.name for spec in peft_ext.list_methods()]
    for name in names:
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        try:
            record = train_one(accelerator, name, out)
        except Exception as exc:  # noqa: BLE001 - recorded for the test, which names the method and the error
            record = {"rank": dist.get_rank(), "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()}
        accelerator.free_memory()
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
        dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
