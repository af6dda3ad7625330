"""Running recipes: build the model and data a recipe names, train with ``transformers.Trainer``, evaluate (at every
DyLoRA rank where asked), save the adapter with its model card, and write metrics, a results table and a plot.

Used by the ``peft-ext`` command (``peft_ext/cli.py``); each function also works from Python.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from ._io import atomic_savefig, atomic_write_json, safetensors_is_whole
from .recipe import Recipe, method_config_class, to_dict

TOY_POSITIVE = ["great", "wonderful", "superb", "moving", "delightful", "brilliant", "charming", "fun"]
TOY_NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "painful"]
TOY_NOUNS = ["film", "movie", "plot", "cast", "script", "ending", "story", "score"]


def toy_sentiment(n: int = 256, seed: int = 0):
    """A tiny synthetic sentiment set ("the plot was great") for fast tests: ``DatasetDict`` train/test."""
    from datasets import Dataset, DatasetDict

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        word = rng.choice(TOY_POSITIVE if label else TOY_NEGATIVE)
        rows.append({"text": f"the {rng.choice(TOY_NOUNS)} was {word}", "label": label})
    cut = int(0.75 * n)
    return DatasetDict(train=Dataset.from_list(rows[:cut]), test=Dataset.from_list(rows[cut:]))


def load_tokenizer_and_model(recipe: Recipe):
    """The tokenizer and the base model the recipe names (offline models or tiny random ones)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BitsAndBytesConfig,
        LlamaConfig,
    )

    from .data import minilm_path

    spec = recipe.model
    if spec.name in ("minilm", "tiny-bert", "tiny-llama"):
        folder = minilm_path()  # the tiny random models borrow MiniLM's tokenizer: offline and small
    elif spec.name == "smollm2":
        from .data.smollm import smollm2_path

        folder = smollm2_path()
    else:
        folder = Path(spec.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    auto = AutoModelForSequenceClassification if spec.task == "seq_cls" else AutoModelForCausalLM
    extra = {"num_labels": spec.num_labels} if spec.task == "seq_cls" else {}
    torch.manual_seed(recipe.seed)
    if spec.name in ("tiny-bert", "tiny-llama"):
        common = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, pad_token_id=tokenizer.pad_token_id, **extra)
        if spec.name == "tiny-bert":
            config = BertConfig(**common)
        else:
            config = LlamaConfig(num_key_value_heads=2, **common)
        model = auto.from_config(config)
    else:
        quant = None
        if spec.quantization == "4bit":
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        elif spec.quantization == "8bit":
            quant = BitsAndBytesConfig(load_in_8bit=True)
        model = auto.from_pretrained(folder, quantization_config=quant, dtype=torch.float32, **extra)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def load_raw_splits(recipe: Recipe):
    """The recipe's train and eval splits as loaded (text columns), cut to ``max_train`` / ``max_eval``."""
    spec = recipe.data
    if spec.name == "movie_reviews":
        from .data import load_movie_reviews

        data = load_movie_reviews(seed=spec.seed)
    elif spec.name == "toy_sentiment":
        data = toy_sentiment(seed=spec.seed)
    elif spec.name == "gsm":
        from .data.gsm import load_gsm

        data = load_gsm(seed=spec.seed)
    else:
        from .data.bfcl import load_bfcl

        data = load_bfcl(seed=spec.seed)
    train, test = data["train"], data["test"]
    if spec.max_train is not None:
        train = train.select(range(min(spec.max_train, len(train))))
    if spec.max_eval is not None:
        test = test.select(range(min(spec.max_eval, len(test))))
    return train, test


def load_data(recipe: Recipe, tokenizer):
    """Tokenized train and eval splits of the recipe's data set, and the eval split as loaded (for generation)."""
    spec = recipe.data
    train, test = load_raw_splits(recipe)
    if recipe.model.task == "seq_cls":
        def encode(batch):
            out = tokenizer(batch["text"], truncation=True, max_length=spec.max_length)
            out["labels"] = batch["label"]
            return out
    else:
        def encode(batch):
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for prompt, target in causal_lm_pairs(spec.name, batch):
                p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                a = tokenizer(target + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
                ids = (p + a)[: spec.max_length]
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(([-100] * len(p) + a)[: spec.max_length])  # loss on the answer only
            return out
    columns = train.column_names
    return (
        train.map(encode, batched=True, remove_columns=columns),
        test.map(encode, batched=True, remove_columns=columns),
        test,
    )


def causal_lm_pairs(data_name: str, batch: dict) -> list[tuple[str, str]]:
    """(prompt, target) pairs of a batch: GSM question → worked solution ending in ``#### answer``; BFCL question
    with the function specs → one valid call (``ground_truth_call``)."""
    if data_name == "gsm":
        return [(f"Question: {q}\nAnswer: ", cot) for q, cot in zip(batch["question"], batch["answer_cot"])]
    from .data.bfcl import ground_truth_call

    return [
        (f"Functions: {fns}\nRequest: {q}\nCall: ", ground_truth_call(ans))
        for q, fns, ans in zip(batch["question"], batch["functions"], batch["answer"])
    ]


def build_peft_config(recipe: Recipe):
    """The PEFT config of the recipe's method, with the task type of its model."""
    from peft import TaskType

    cls = method_config_class(recipe.method.name)
    kwargs = dict(recipe.method.config)
    kwargs.setdefault("task_type", TaskType.SEQ_CLS if recipe.model.task == "seq_cls" else TaskType.CAUSAL_LM)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"method.config: {exc}") from exc


def _takes_prompt_mask(recipe: Recipe) -> bool:
    """Whether the recipe's method reads a per-call ``prompt_mask=`` (prompt-aware LoRA, WavLLM)."""
    if recipe.method.name == "lora":
        return False
    from .registry import get_method

    return "prompt_mask" in get_method(recipe.method.name).model_cls.call_args


class _PromptMaskCollator:
    """Pads a batch and adds ``prompt_mask``: the instruction tokens a prompt-aware method pools over.

    Causal LM: the tokens without a loss (label -100) that are not padding, i.e. the question; the answer never shapes
    its own scale. Sequence classification: every token of the input (the label is not a token).
    """

    def __init__(self, inner, causal: bool):
        self.inner, self.causal = inner, causal

    def __call__(self, features):
        batch = self.inner(features)
        attended = batch["attention_mask"].bool()
        batch["prompt_mask"] = (batch["labels"].eq(-100) & attended) if self.causal else attended
        return batch


def _collator(recipe: Recipe, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if recipe.model.task == "seq_cls":
        inner = DataCollatorWithPadding(tokenizer)
    else:
        inner = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    return _PromptMaskCollator(inner, causal=recipe.model.task != "seq_cls") if _takes_prompt_mask(recipe) else inner


def _accuracy(eval_pred) -> dict:
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_pred.label_ids).mean())}


def _method_callbacks(recipe: Recipe, model) -> list:
    if recipe.method.name == "lora":
        return []
    from .registry import get_method

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


def ranks_to_evaluate(recipe: Recipe, model) -> list:
    """The DyLoRA ranks the recipe asks to evaluate ('all' → 1..r), or [None] for a single evaluation."""
    ranks = recipe.evaluation.ranks
    if ranks is None:
        return [None]
    from .tuners.dylora import dylora_layers, max_rank

    if not dylora_layers(model):
        raise ValueError(f"evaluation.ranks applies to DyLoRA adapters; method.name is {recipe.method.name!r}.")
    r = max_rank(model)
    ranks = list(range(1, r + 1)) if ranks == "all" else ranks
    bad = [b for b in ranks if b > r]
    if bad:
        raise ValueError(f"evaluation.ranks must be within 1..r (1..{r}); got {bad}.")
    return ranks


def generation_accuracy(model, tokenizer, recipe: Recipe, rows) -> float:
    """Greedy-generate answers for the first ``evaluation.generate`` eval rows and score them with the data set's
    own scorer (``score_gsm`` / ``score_bfcl``); returns the mean score."""
    import torch

    from .data.bfcl import score_bfcl
    from .data.gsm import score_gsm

    score = score_gsm if recipe.data.name == "gsm" else score_bfcl
    rows = rows.select(range(min(recipe.evaluation.generate, len(rows))))
    prompts = [prompt for prompt, _ in causal_lm_pairs(recipe.data.name, rows[:])]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    scores = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), 8):
            enc = tokenizer(prompts[start : start + 8], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            if _takes_prompt_mask(recipe):
                enc["prompt_mask"] = enc["attention_mask"].bool()  # the whole (left-padded) question is the prompt
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=recipe.evaluation.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            scores += [score(text, answer) for text, answer in zip(texts, rows["answer"][start : start + 8])]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return float(np.mean(scores)) if scores else float("nan")


def evaluate_model(trainer, model, recipe: Recipe, tokenizer=None, raw_eval=None) -> list[dict]:
    """One row per evaluated rank: ``{"rank", "eval_loss", "accuracy"?}`` (accuracy from the classifier, or from
    scored generations when ``evaluation.generate`` is set)."""
    rows = []
    ranks = ranks_to_evaluate(recipe, model)
    keep = model.get_rank() if ranks != [None] else None
    for b in ranks:
        if b is not None:
            model.set_rank(b)
        metrics = trainer.evaluate()
        row = {"rank": b, "eval_loss": metrics["eval_loss"]}
        if "eval_accuracy" in metrics:
            row["accuracy"] = metrics["eval_accuracy"]
        if recipe.evaluation.generate:
            row["accuracy"] = generation_accuracy(model, tokenizer, recipe, raw_eval)
        rows.append(row)
    if keep is not None:
        model.set_rank(keep)
    return rows


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
    from . import fsdp

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


def evaluate(recipe: Recipe, adapter_dir: str, quiet: bool = False) -> dict:
    """Evaluate a saved adapter on the recipe's evaluation split (at every rank the recipe asks for)."""
    from peft import PeftModel
    from transformers import Trainer

    tokenizer, base = load_tokenizer_and_model(recipe)
    _, eval_set, raw_eval = load_data(recipe, tokenizer)
    model = PeftModel.from_pretrained(base, adapter_dir)
    with tempfile.TemporaryDirectory() as scratch:
        args = _training_args(recipe, Path(scratch), quiet=True)
        trainer = Trainer(model=model, args=args, eval_dataset=eval_set, data_collator=_collator(recipe, tokenizer),
                          compute_metrics=_accuracy if recipe.model.task == "seq_cls" else None)
        rows = evaluate_model(trainer, model, recipe, tokenizer, raw_eval)
    metrics = {"name": recipe.name, "method": recipe.method.name, "adapter": str(adapter_dir), "baseline": None,
               "results": rows}
    if not quiet:
        print(format_table(metrics))
    return metrics


def format_table(metrics: dict) -> str:
    """A plain-text table of the evaluated ranks, with the untrained baseline beside it."""
    has_acc = any("accuracy" in row for row in metrics["results"])
    head = f"{'rank':>10} | {'eval loss':>9}" + (f" | {'accuracy':>8}" if has_acc else "")
    lines = [f"{metrics['method']} — {metrics['name']}", head, "-" * len(head)]
    rows = ([{"rank": "untrained", **metrics["baseline"]}] if metrics.get("baseline") else []) + metrics["results"]
    for row in rows:
        rank = "adapter" if row["rank"] is None else row["rank"]
        line = f"{rank!s:>10} | {row['eval_loss']:9.4f}"
        if has_acc:
            line += f" | {row.get('accuracy', float('nan')):8.4f}"
        lines.append(line)
    return "\n".join(lines)


def plot_ranks(metrics: dict, path: Path) -> Optional[Path]:
    """A PNG of accuracy (or eval loss) by rank, the untrained baseline as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = metrics["results"]
    key = "accuracy" if "accuracy" in rows[0] else "eval_loss"
    xs = [row["rank"] if row["rank"] is not None else 0 for row in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [row[key] for row in rows], marker="o", label=metrics["method"])
    if metrics.get("baseline") and key in metrics["baseline"]:
        ax.axhline(metrics["baseline"][key], linestyle="--", color="grey", label="untrained")
    ax.set_xlabel("evaluation rank" if rows[0]["rank"] is not None else "")
    ax.set_ylabel(key)
    ax.set_title(metrics["name"])
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


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
            from .card import write_model_card

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


TINY_MODELS = {
    "tiny-bert": "a randomly initialised 2-layer BERT (hidden size 64) that peft-ext builds from its config for tests",
    "tiny-llama": "a randomly initialised 2-layer Llama (hidden size 64) that peft-ext builds from its config for "
                  "tests",
}


def card_run_facts(recipe: Recipe, args, n_train: int, n_eval: int, rows: list, baseline: Optional[dict], result,
                   train_time: float) -> dict:
    """What the model card records about a run: data and split, training arguments, results (``peft_ext.card``)."""
    import torch

    from .card import TRAINING_ARGS, dataset_facts

    values = args.to_dict()
    chosen = [k for k in TRAINING_ARGS if k in values] + sorted(k for k in recipe.training if k not in TRAINING_ARGS)
    training = {}
    for key in chosen:
        value = values.get(key, recipe.training.get(key))
        if key == "max_steps" and value is not None and value <= 0:
            continue
        if "dir" in key or "path" in key or "token" in key or "hub" in key:  # never the machine's paths or secrets
            continue
        training[key] = value
    base = None if baseline is None else {
        "eval_loss": baseline["eval_loss"],
        **({"accuracy": baseline["eval_accuracy"]} if "eval_accuracy" in baseline else {}),
    }
    return {
        "name": recipe.name,
        "base_description": TINY_MODELS.get(recipe.model.name, ""),
        "data": dataset_facts(recipe.data.name, recipe.data.seed, n_train, n_eval, recipe.data.max_length),
        "training": training,
        "results": rows,
        "baseline": base,
        "generate": recipe.evaluation.generate or None,
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_time": train_time,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
    }


def _plain(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix == ".safetensors")


def _peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def comparison_record(metrics: dict, status: str = "success", error_msg: str = "") -> dict:
    """One run in the layout of PEFT's ``method_comparison`` results (``run_info``, ``train_info``, ``meta_info``)."""
    import peft
    import torch
    import transformers

    from . import __version__

    final = metrics.get("results", [{}])[-1] if metrics.get("results") else {}
    return {
        "run_info": {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "total_time": metrics.get("total_time"),
            "experiment_name": f"{metrics.get('method')}/{metrics.get('name')}",
            "train_config": metrics.get("recipe"),
            "peft_config": metrics.get("peft_config"),
            "error_msg": error_msg,
        },
        "train_info": {
            "cpu_memory_max" if not torch.cuda.is_available() else "cuda_memory_max": metrics.get("peak_memory_bytes"),
            "train_time": metrics.get("train_time"),
            "file_size": metrics.get("checkpoint_size"),
            "num_trainable_params": metrics.get("num_trainable_params"),
            "num_total_params": metrics.get("num_total_params"),
            "status": status,
            "metrics": [
                {
                    "step": metrics.get("train_steps"),
                    "test accuracy": final.get("accuracy"),
                    "test loss": final.get("eval_loss"),
                    "train loss": metrics.get("train_loss"),
                    "tokens / sec": metrics.get("tokens_per_sec"),
                    "rank": final.get("rank"),
                }
            ],
            "results_by_rank": metrics.get("results"),
        },
        "meta_info": {
            "package_info": {
                "peft-ext-version": __version__,
                "peft-version": peft.__version__,
                "transformers-version": transformers.__version__,
                "torch-version": torch.__version__,
            },
            "system_info": {
                "system": platform.system(),
                "release": platform.release(),
                "machine": platform.machine(),
                "processor": platform.processor(),
                "python": sys.version.split()[0],
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
            },
        },
    }


def derive_method_recipe(recipe: Recipe, method: str) -> Recipe:
    """The recipe with ``method`` swapped in: keeps the config keys the new method accepts (target modules, rank,
    alpha, ...) and fills the rest from the method's example settings; evaluation ranks only for DyLoRA."""
    cls = method_config_class(method)
    accepted = {f.name for f in dataclasses.fields(cls) if f.init}
    config = {}
    if method != "lora":
        from .registry import get_method

        config.update(get_method(method).example_kwargs)
    config.update({k: v for k, v in recipe.method.config.items() if k in accepted})
    ranks = recipe.evaluation.ranks if method == "dylora" else None
    return dataclasses.replace(
        recipe,
        output_dir=str(Path(recipe.output_dir) / method),
        method=dataclasses.replace(recipe.method, name=method, config=config),
        evaluation=dataclasses.replace(recipe.evaluation, ranks=ranks, plot=False),
    )
