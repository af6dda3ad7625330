"""Training a recipe with ``transformers.Trainer``: training arguments, the method's callbacks, crash-safe resume from
the newest complete checkpoint, and the atomic adapter save."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional


from .._io import atomic_write_json, safetensors_is_whole
from ..recipe import Recipe, to_dict
from .data import _collator, build_peft_config, load_data, load_tokenizer_and_model
from .evaluation import _accuracy, evaluate_model, generation_accuracy
from .reporting import _folder_size, _peak_memory_bytes, _plain, card_run_facts, format_table, plot_ranks


def _method_callbacks(recipe: Recipe, model) -> list:
    if recipe.method.name == "lora":
        return []
    from ..registry import get_method

    factory = get_method(recipe.method.name).train_callback
    return [factory(model=model, seed=recipe.seed)] if factory else []


def _training_args(recipe: Recipe, output_dir: Path, quiet: bool):
    import importlib.util

    from transformers import TrainingArguments

    defaults = dict(
        num_train_epochs=1,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=1e-3,
        logging_steps=10,
        save_strategy="steps",
        save_steps=50,
        save_total_limit=2,
        eval_strategy="no",
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else [],
        use_cpu=not __import__("torch").cuda.is_available(),
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",  # for tokens / s
        disable_tqdm=quiet,
    )
    return TrainingArguments(output_dir=str(output_dir / "checkpoints"), **{**defaults, **recipe.training})


def _checkpoint_tokens(checkpoint: str) -> int:
    """Tokens seen before ``checkpoint`` (its ``trainer_state.json``)."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))


def _checkpoint_complete(folder: Path) -> bool:
    """True when a checkpoint folder has a parseable ``trainer_state.json`` and every weight file in it is whole.

    A save killed midway leaves the state file missing or a weight file cut short. Whole files are recognised without
    reading their tensors: a safetensors header whose offsets fit the file size, a zip (``torch.save``) whose central
    directory, written last, is there.
    """
    import zipfile

    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = [f for f in folder.rglob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    if not any(f.suffix in (".safetensors", ".bin") for f in weights):
        return False
    for f in weights:
        if f.suffix == ".safetensors":
            if not safetensors_is_whole(f):
                return False
            continue
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (OSError, zipfile.BadZipFile):
            return False
    return True


def _last_complete_checkpoint(folder) -> Optional[str]:
    """Newest ``checkpoint-N`` under ``folder`` that is complete; incomplete newer ones are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for d in folder.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for _, d in sorted(found, reverse=True):
        if _checkpoint_complete(d):
            return str(d)
        print(f"warning: --resume skips incomplete checkpoint {d} (half-written: missing or truncated files)",
              file=sys.stderr)
    return None


def train(recipe: Recipe, resume: bool = False, quiet: bool = False, extra_callbacks: Optional[list] = None) -> dict:
    """Train the recipe's method; save adapter, model card, ``metrics.json`` and a plot under ``recipe.output_dir``.

    ``resume=True`` continues from the last checkpoint in ``output_dir/checkpoints``. Returns the metrics.
    """
    import transformers
    from peft import get_peft_model
    from transformers import Trainer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(recipe.seed)
    start = time.perf_counter()
    tokenizer, base = load_tokenizer_and_model(recipe)
    train_set, eval_set, raw_eval = load_data(recipe, tokenizer)
    model = get_peft_model(base, build_peft_config(recipe))
    args = _training_args(recipe, out, quiet)
    checkpoint = None
    if resume:
        checkpoint = _last_complete_checkpoint(args.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"--resume: no complete checkpoint in {args.output_dir}; train without --resume first.")
    # read before training: save_total_limit may rotate the resumed checkpoint away during the run
    tokens_before = _checkpoint_tokens(checkpoint) if checkpoint else 0
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=_collator(recipe, tokenizer),
        compute_metrics=_accuracy if recipe.model.task == "seq_cls" else None,
        callbacks=_method_callbacks(recipe, model) + list(extra_callbacks or []),
    )
    baseline = None
    if recipe.evaluation.baseline:
        with model.disable_adapter():
            baseline = trainer.evaluate()
            if recipe.evaluation.generate:
                baseline["eval_accuracy"] = generation_accuracy(model, tokenizer, recipe, raw_eval)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    train_time = time.perf_counter() - t0
    rows = evaluate_model(trainer, model, recipe, tokenizer, raw_eval)
    adapter_dir = out / "adapter"
    main_process = trainer.is_world_process_zero()  # several processes (torchrun / accelerate): one writes
    from .. import fsdp

    # an FSDP-sharded model holds only this rank's shards: gather the full state on every rank (a collective)
    state = fsdp.full_state_dict(model) if fsdp.is_sharded(model) else None
    if main_process:
        run_card = card_run_facts(recipe, args, len(train_set), len(eval_set), rows, baseline, result, train_time)
        save_adapter(fsdp.unwrap(model), tokenizer, adapter_dir, card_run=run_card, state_dict=state)
    trainer.accelerator.wait_for_everyone()
    trainable, total = model.get_nb_trainable_parameters()
    tokens = trainer.state.num_input_tokens_seen  # non-padding tokens since the start of the run
    tokens -= tokens_before  # a resumed run: count only what this process trained, over this process's time
    metrics = {
        "name": recipe.name,
        "method": recipe.method.name,
        "baseline": None if baseline is None else {
            "eval_loss": baseline["eval_loss"],
            **({"accuracy": baseline["eval_accuracy"]} if "eval_accuracy" in baseline else {}),
        },
        "results": rows,
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_time": train_time,
        "total_time": time.perf_counter() - start,
        "tokens_per_sec": tokens / train_time if train_time > 0 else None,
        "num_trainable_params": trainable,
        "num_total_params": total,
        "checkpoint_size": _folder_size(adapter_dir),
        "peak_memory_bytes": _peak_memory_bytes(),
        "recipe": to_dict(recipe),
        "peft_config": json.loads(json.dumps(model.peft_config["default"].to_dict(), default=_plain)),
    }
    if not main_process:
        return metrics
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot:
        plot_ranks(metrics, out / "results.png")
    if not quiet:
        print(format_table(metrics))
        print(f"adapter and model card: {adapter_dir}  metrics: {out / 'metrics.json'}")
    return metrics


def save_adapter(model, tokenizer, adapter_dir, card_run: Optional[dict] = None, state_dict=None) -> Path:
    """Save adapter, config, model card and tokenizer into ``adapter_dir``, each file atomically.

    Everything is written into a staging folder beside ``adapter_dir`` and then moved file by file with
    ``os.replace``, so a kill at any moment leaves each file either the previous run's or this run's, whole.
    ``card_run`` (``card_run_facts``) adds the run's data, training arguments and results to the model card
    (``peft_ext.card``), for peft-ext methods and PEFT's LoRA alike. ``state_dict``: the full state of an
    FSDP-sharded model (``peft_ext.fsdp.full_state_dict``), saved instead of the model's own shards.
    """
    import shutil

    adapter_dir = Path(adapter_dir)
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}-", dir=adapter_dir.parent))
    try:
        model.save_pretrained(staging, **({"state_dict": state_dict} if state_dict is not None else {}))
        if card_run is not None:
            from ..card import write_model_card

            write_model_card(model, staging, run=card_run)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for src in sorted(p for p in staging.rglob("*") if p.is_file()):
            dest = adapter_dir / src.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return adapter_dir
