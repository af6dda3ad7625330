"""Helpers shared by the benchmark and reproduction scripts in ``scripts/`` (not part of the ``peft_ext`` package).

One copy of what the scripts would otherwise each define: seeding, sizes presets and common options, parameter and
optimizer-state counts, resident-set-size readings, load averages and versions for the JSON, interleaved wall-clock
timing, ``TrainingArguments`` for short CPU runs, the MiniLM sentiment data, a padding collator and markdown tables.
The scripts import it as ``benchlib`` (Python puts the running script's folder first on ``sys.path``). Importing it
sets ``HF_HUB_OFFLINE=1`` and ``TOKENIZERS_PARALLELISM=false`` unless already set, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

MIB = 2**20


# ------------------------------------------------------------------------------------------------ options, seeding
def add_common_options(p: argparse.ArgumentParser, out: str, quick_help: str) -> None:
    """``--quick``, ``--out``, ``--threads`` (default 1) and ``--seed``, as the training benchmarks take them."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=out, help=f"JSON output path (default {out})")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; on a busy machine one "
                   "thread avoids OpenMP threads spinning on descheduled siblings)")
    p.add_argument("--seed", type=int, default=0, help="seed of data splits, model init and training (default 0)")


def apply_sizes(args: argparse.Namespace, full: dict, quick: dict) -> dict:
    """Give every size option left unset (``None``) its ``--quick`` or full-run default; returns the preset used."""
    preset = quick if args.quick else full
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return preset


def parse_choices(p: argparse.ArgumentParser, option: str, value: str, allowed, kind: str) -> list[str]:
    """Split a comma-separated option value, rejecting (through ``p.error``) a ``kind`` outside ``allowed``."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in allowed:
            p.error(f"{option}: unknown {kind} {name!r}")
    return names


def set_threads(p: argparse.ArgumentParser, threads: int) -> None:
    """``torch.set_num_threads(threads)`` after checking it is at least 1."""
    if threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) global RNGs (``transformers.set_seed``)."""
    transformers.set_seed(seed)


# ------------------------------------------------------------------------------------------------ measurement
def unique_params(params) -> list[torch.nn.Parameter]:
    """The parameters of an iterable with duplicates (tied weights) removed, in first-seen order."""
    return list({id(p): p for p in params}.values())


def trainable_param_count(model_or_params) -> int:
    """Number of elements of the (unique) parameters that require grad, of a module or an iterable of tensors."""
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    return sum(p.numel() for p in unique_params(p for p in params if p.requires_grad))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (unwrapping accelerate's ``AcceleratedOptimizer``)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )


def rss_mib() -> Optional[float]:
    """Current resident set size of this process in MiB (``/proc/self/status`` VmRSS), None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def load_average() -> Optional[list[float]]:
    """The 1/5/15-minute load averages, or None where the OS has none: other processes skew CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions() -> dict:
    """Library versions and machine facts every benchmark JSON records."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
    }


def sync(device: str) -> None:
    """Wait for queued device work (CUDA) so wall-clock timings are complete; no-op on CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_gc():
    """Collect once, then keep Python's cyclic garbage collector off while timing (its pauses land on whichever
    variant happens to run; tensors are freed by reference counting regardless)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def interleaved_times(calls: dict[str, Callable[[], Any]], repeats: int, inner: int = 1,
                      device: str = "cpu") -> dict[str, list[float]]:
    """Wall time (ms per call) of every callable: ``repeats`` repetitions of ``inner`` calls each.

    Within a repetition the callables take turns call by call (round-robin, the first one rotating every
    repetition), so every variant's repetition spans the same stretch of time and a change in machine load hits all
    of them alike; that is what makes the per-repetition ratios of ``paired_ratio`` meaningful.
    """
    keys = list(calls)
    times: dict[str, list[float]] = {k: [] for k in keys}
    with no_gc():
        for rep in range(repeats):
            order = keys[rep % len(keys):] + keys[: rep % len(keys)]
            total = dict.fromkeys(keys, 0.0)
            for _ in range(inner):
                for key in order:
                    sync(device)
                    t0 = time.perf_counter()
                    calls[key]()
                    sync(device)
                    total[key] += time.perf_counter() - t0
            for key in keys:
                times[key].append(total[key] * 1000 / inner)
    return times


def paired_ratio(times: list[float], ref_times: list[float]) -> float:
    """Median over repetitions of ``times[i] / ref_times[i]`` (both measured in the same interleaved repetition)."""
    return statistics.median(t / r for t, r in zip(times, ref_times))


# ------------------------------------------------------------------------------------------------ training, data
def training_arguments(output_dir: str, seed: int, **overrides) -> transformers.TrainingArguments:
    """``TrainingArguments`` for short benchmark runs: CPU, no saving, no reporting, no progress bars, linear
    schedule without warm-up, weight decay 0, seeded; ``overrides`` replace or add any argument."""
    kwargs = dict(
        output_dir=output_dir,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        logging_strategy="steps",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def accuracy_metrics(pred) -> dict:
    """``compute_metrics`` for ``Trainer``: accuracy of the argmax of the logits (the first output when a tuple)."""
    import numpy as np

    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(pred.label_ids)).mean())}


def sentiment_data(tokenizer, n_train: int, n_eval: int, seed: int, max_length: int = 64):
    """The first ``n_train`` / ``n_eval`` VADER movie-review snippets (``peft_ext.data.load_movie_reviews(seed)``)
    tokenized to ``max_length`` for a sequence classifier: ``(train, test)`` with ``labels`` 0/1."""
    from peft_ext.data import load_movie_reviews

    data = load_movie_reviews(seed=seed)
    if n_train > len(data["train"]) or n_eval > len(data["test"]):
        raise SystemExit(f"asked for {n_train}/{n_eval} snippets; the splits have "
                         f"{len(data['train'])}/{len(data['test'])}")

    def tok(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    train = data["train"].select(range(n_train)).map(tok, batched=True, remove_columns=["text", "rating"])
    test = data["test"].select(range(n_eval)).map(tok, batched=True, remove_columns=["text", "rating"])
    return train.rename_column("label", "labels"), test.rename_column("label", "labels")


def pad_batch(rows: list[dict], pad_id: int) -> dict:
    """Right-pad the ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) of ``rows`` to the longest one;
    returns ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ reporting
def fmt(value: Any, spec: str = "", missing: str = "–") -> str:
    """Format a table cell: ``None`` as ``missing`` (an en dash), numbers with ``spec``, anything else with str."""
    if value is None:
        return missing
    if isinstance(value, (int, float)) and spec:
        return format(value, spec)
    return str(value)


def markdown(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table from a header and rows of cell strings."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_training_benchmark(name: str, args: argparse.Namespace, argv: Optional[list[str]], part: str, title: str,
                           run: Callable[[argparse.Namespace, str], dict], table: Callable[[dict], str]) -> int:
    """Run one training benchmark, print its table and write the JSON.

    ``run(args, workdir)`` gets a temporary folder and returns the result stored under ``part`` (with its
    ``wall_s``); the JSON also holds the command line, ``--quick``, versions, thread count and the load averages at
    start and end. Written to ``args.out`` with ``peft_ext._io.atomic_write_json``.
    """
    import tempfile

    from peft_ext._io import atomic_write_json

    t_start = time.perf_counter()
    payload: dict = {
        "benchmark": name, "argv": sys.argv[1:] if argv is None else argv, "quick": args.quick,
        "environment": {**versions(), "torch_threads": torch.get_num_threads()}, "load_average_start": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix=f"{name}_") as workdir:
        t0 = time.perf_counter()
        payload[part] = run(args, workdir)
        payload[part]["wall_s"] = time.perf_counter() - t0
    payload["load_average_end"] = load_average()
    payload["wall_s"] = time.perf_counter() - t_start
    print(f"\n### {title}\n\n{table(payload[part])}")
    print(f"\nwall time {payload['wall_s']:.0f} s; load average start {payload['load_average_start']}, end "
          f"{payload['load_average_end']}")
    path = atomic_write_json(args.out, payload)
    print(f"wrote {path}")
    return 0
