"""One rank of a data-parallel training run, launched by ``tests/test_multiprocess.py`` through ``torchrun``:

    torchrun --nproc_per_node 2 tests/ddp_worker.py --method dylora --out DIR

A tiny random LlamaForCausalLM (seeded, the same on every rank) gets a peft-ext adapter (DyLoRA with its
``DyLoraRankSampler``, NOLA, or MoLA with its load-balancing auxiliary loss, which the tuner adds to
``outputs.loss``) and trains with ``transformers.Trainer`` on CPU over gloo, with ``LisaCallback`` in
adapter mode on top; ``--method lisa_full`` trains the plain model with full-parameter LISA (blocks frozen and
unfrozen between steps under DDP). Each rank writes under ``DIR``:

* ``init{RANK}.pt`` / ``rank{RANK}.pt``: ``{name: tensor}`` of the trainable parameters before / after training;
* ``grads{RANK}.pt``: the gradients of step 0 as the optimizer sees them (after DDP's all-reduce);
* ``rank{RANK}.json``: world size, the wrapper class and its ``find_unused_parameters``, and per step: the DyLoRA
  rank, LISA's active blocks and the local batch (token ids), plus LISA's switch history.

The worker ends with a barrier and ``destroy_process_group()``, then leaves through ``os._exit(0)`` once everything is
written: a run once finished training and then died at interpreter shutdown ("terminate called without an active
exception", exit -6), from torch.distributed's C++ threads being torn down.

Not collected by pytest (the name does not start with ``test_``); ``build_model`` is also used by the test to
recompute step 0 in a single process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

VOCAB, SEQ_LEN, BATCH, STEPS, LAYERS = 128, 16, 4, 6, 4
MODEL_SEED, DATA_SEED, SCHEDULE_SEED = 0, 1, 3
TARGETS = ["q_proj", "v_proj"]
METHODS = ("dylora", "nola", "mola", "lisa_full")


def lisa_mode(method: str) -> str:
    """LISA's mode in the run of ``method``: full-parameter for ``lisa_full``, adapter mode on the PEFT models."""
    return "full" if method == "lisa_full" else "adapter"


def build_model(method: str, balance_loss_weight: float = 0.05):
    """The tiny Llama (hidden 64, 4 blocks) with the method's adapter (none for ``lisa_full``); identical in every
    process.

    MoLA: 4 experts of rank 4, top-2, with the load-balancing loss at ``balance_loss_weight`` (a large weight so the
    auxiliary term visibly changes the gradients)."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_ext import DyLoraConfig, MolaConfig, NolaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(MODEL_SEED)
    base = LlamaForCausalLM(config)
    if method == "lisa_full":
        return base
    if method == "dylora":
        peft_config = DyLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    elif method == "nola":
        peft_config = NolaConfig(r=4, lora_alpha=8, num_basis_A=16, num_basis_B=16, target_modules=TARGETS)
    elif method == "mola":
        peft_config = MolaConfig(r=4, lora_alpha=8, num_experts=4, top_k=2, balance_loss_weight=balance_loss_weight,
                                 target_modules=TARGETS)
    else:
        raise ValueError(f"unknown method {method!r}")
    torch.manual_seed(MODEL_SEED + 1)
    return get_peft_model(base, peft_config)


class TokenData(torch.utils.data.Dataset):
    """Random fixed-length token rows (no padding, so every batch holds the same number of loss tokens)."""

    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(DATA_SEED)
        self.ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv=None) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from peft_ext.callbacks import DyLoraRankSampler
    from peft_ext.callbacks.lisa import LisaCallback

    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=list(METHODS), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(1)

    model = build_model(args.method)
    adapter_names = [n for n, p in model.named_parameters() if p.requires_grad]
    torch.save({n: p.detach().clone() for n, p in model.named_parameters() if n in adapter_names},
               out / f"init{rank}.pt")

    sampler = DyLoraRankSampler(seed=SCHEDULE_SEED) if args.method == "dylora" else None
    lisa = LisaCallback(n_layers=1, interval_steps=2, seed=SCHEDULE_SEED, mode=lisa_mode(args.method))
    steps: list[dict] = []

    class Record(TrainerCallback):
        """Per step: the DyLoRA rank and LISA blocks in force; at step 0, the gradients after all-reduce."""

        def on_step_begin(self, args, state, control, **kwargs):
            steps.append({"step": state.global_step, "rank": sampler.last_rank if sampler else None,
                          "lisa": list(lisa.active_layers)})

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                torch.save({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
                           out / f"grads{rank}.pt")

    class RecordingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            steps[-1]["batch"] = inputs["input_ids"].tolist()
            return super().training_step(model, inputs, num_items_in_batch)

    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        ddp_backend="gloo",
        use_cpu=True,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=0.05,
        max_grad_norm=0.0,  # no clipping: the step-0 gradients are the plain all-reduced mean
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        seed=SCHEDULE_SEED,
        data_seed=DATA_SEED,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = ([sampler] if sampler else []) + [lisa, Record()]
    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=TokenData(2 * STEPS * BATCH * 2),
                               callbacks=callbacks)
    result = trainer.train()

    final = {n: p.detach().clone() for n, p in model.named_parameters() if n in adapter_names}
    torch.save(final, out / f"rank{rank}.pt")
    record = {
        "rank": rank,
        "world_size": training_args.world_size,
        "wrapper": type(trainer.model_wrapped).__name__,
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "global_step": result.global_step,
        "steps": steps,
        "lisa_history": [[step, layers] for step, layers in lisa.history],
        "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    shutdown()


def shutdown() -> None:
    """Leave the process group cleanly (as the ``peft-ext`` command does), then exit without interpreter teardown (see
    the module docstring)."""
    from peft_ext.cli import _close_process_group

    _close_process_group(wait=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
