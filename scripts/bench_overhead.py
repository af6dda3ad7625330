"""Training-step and merged-inference overhead of every peft-ext method against plain PEFT LoRA.

What is measured, for every method in ``peft_ext.list_methods()`` (config built as
``spec.config_cls(**spec.example_kwargs, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])``) and for a plain
PEFT ``LoraConfig`` baseline with the same ``r`` and ``lora_alpha`` (one baseline per distinct pair):

* **Training-step time.** Every variant gets its own deep copy of one seeded, randomly initialised
  ``LlamaForCausalLM`` and its own AdamW optimizer over the trainable parameters. All variants live in the same
  process. After warm-up steps, ``--repeats`` repetitions are timed; one repetition is ``--steps`` optimizer steps
  (forward + loss, backward, ``AdamW.step``, ``zero_grad``) on one fixed batch for every variant, the variants
  taking turns step by step (round-robin, the first one rotating every repetition), so a change in machine load
  hits all variants of a repetition alike. Reported: the median over repetitions of the mean step time, and the
  ratio to the LoRA baseline of the same rank and alpha as the median of the per-repetition ratios (the ratio of
  the medians is in the JSON too).
  Extra variants: every ``(label, overrides[, target])`` of ``spec.bench_variants`` runs too (e.g. NOLA with
  ``cache_bases=False``, the paper's mode, which regenerates the random bases in every forward and backward; MoLA
  with 8 experts top-2). A method with a ``spec.train_callback`` (DyLoRA rank sampling, SwitchLoRA switching,
  CoDyRA thresholding, SMoRA bias updates) trains with it: the callback receives the Trainer's events
  (``on_train_begin``, ``on_step_begin``, ``on_pre_optimizer_step``, ``on_optimizer_step``, ``on_step_end``) with
  ``model=`` and ``optimizer=`` in the order ``transformers.Trainer`` sends them, so switch and threshold steps are
  inside the timed steps.
* **Peak memory of one training step**, measured per variant in isolation (see ``measure_memory``): on CPU from the
  allocation events of ``torch.profiler`` (``profile_memory=True``), on CUDA from ``torch.cuda`` memory statistics.
  It is the variant's own footprint: model copy, adapter, optimizer state, method caches, plus the step's peak of
  activations and gradients. Reported in MiB and as a ratio to the LoRA baseline.
* **Merged-inference time.** After training, each mergeable variant is ``merge_and_unload()``-ed (after checking that
  the merged logits match the unmerged ones) and its no-grad forward time on the batch is compared with that of
  the base model (frozen, eval mode), interleaved and summarised the same way (``--infer-iters`` forwards per
  repetition). A merged model is a plain ``LlamaForCausalLM``, so the ratio should be ~1.0.

Targets from the issues (reported, never asserted; the exit status is 0 whatever the numbers): the step-time
target of each method is ``spec.overhead_target`` (e.g. DyLoRA <= 1.10x LoRA, NOLA with ``cache_bases=True``
<= 1.30x, MoLA 8 experts top-2 <= 1.35x), merged inference <= 1.02x base (applied to every mergeable peft-ext
variant). Each row carries ``meets_target``: true when every target that
applies to the row is met, ``null`` when none applies (the LoRA baselines).

Rerun (from the repository root)::

    .venv/bin/python scripts/bench_overhead.py              # full run, 1-2 minutes on 2 idle CPU cores
    .venv/bin/python scripts/bench_overhead.py --threads 1  # the same on a machine other processes keep busy
    .venv/bin/python scripts/bench_overhead.py --quick      # tiny model, one thread: a smoke test (< 30 s)
    .venv/bin/python scripts/bench_overhead.py --hidden-size 512 --num-layers 8 --repeats 9 --out results/big.json

A markdown table is printed; everything (settings, environment and load average, per-repetition timings, memory
breakdown, merge checks) is written to ``--out`` (default ``results/bench_overhead.json``) through a temporary file
and ``os.replace``. Timings on a shared machine are noisy; the two LoRA baselines of identical cost (different
alpha) give a rough idea of the noise level. When other processes use the CPUs, torch's default of one OpenMP
thread per core can make every step many times slower (threads spin waiting for a descheduled sibling), so use
``--threads 1`` there. ``HF_HUB_OFFLINE=1`` is set by the script; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import benchlib  # first: it sets HF_HUB_OFFLINE before transformers is imported
import torch
from benchlib import MIB, fmt, interleaved_times, paired_ratio, seed_everything
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peft_ext
from peft_ext._io import atomic_write_json

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]

MERGED_INFERENCE_TARGET = 1.02

FULL_SIZES = dict(
    hidden_size=256, num_layers=4, intermediate_size=688, num_heads=8, vocab_size=2000, seq_len=128, batch_size=8,
    repeats=7, steps=3, warmup=2, infer_iters=5, threads=None,
)
QUICK_SIZES = dict(
    hidden_size=64, num_layers=2, intermediate_size=172, num_heads=4, vocab_size=256, seq_len=32, batch_size=2,
    repeats=5, steps=1, warmup=1, infer_iters=2, threads=1,
)


@dataclass
class Variant:
    """One thing to benchmark: a PEFT config plus how it trains."""

    key: str
    method: str
    label: str
    make_config: Callable[[], Any]
    mergeable: bool
    baseline_key: Optional[str] = None  # the LoRA variant it is compared with; None for LoRA itself
    callback: Optional[Callable] = None  # the method's spec.train_callback, driven with Trainer events
    step_time_target: Optional[float] = None
    config_kwargs: dict = field(default_factory=dict)


class Trainee:
    """A variant's PEFT model, optimizer and (if its method has one) training callback, ready to take steps."""

    def __init__(self, variant: Variant, base_model: nn.Module, lr: float, seed: int, max_steps: int = 1000):
        """Deep-copy ``base_model``, wrap it with the variant's config and set up AdamW over the trainable params."""
        torch.manual_seed(seed)  # adapter initialisation does not depend on the order variants are built in
        self.variant = variant
        self.model = get_peft_model(copy.deepcopy(base_model), variant.make_config())
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.callback = variant.callback(model=self.model, seed=0) if variant.callback else None
        if self.callback is not None:
            from transformers import TrainerControl, TrainerState

            self.state, self.control = TrainerState(max_steps=max_steps, global_step=0), TrainerControl()
            self._event("on_train_begin")
        self.last_loss = float("nan")

    def _event(self, name: str) -> None:
        getattr(self.callback, name)(_trainer_args(), self.state, self.control, model=self.model,
                                     optimizer=self.optimizer)

    def step(self, batch: dict) -> None:
        """One optimizer step on ``batch`` with the callback events ``transformers.Trainer`` sends around it."""
        if self.callback is not None:
            self._event("on_step_begin")
        loss = self.model(**batch).loss
        loss.backward()
        if self.callback is not None:
            self._event("on_pre_optimizer_step")
        self.optimizer.step()
        if self.callback is not None:
            self._event("on_optimizer_step")
        self.optimizer.zero_grad(set_to_none=True)
        if self.callback is not None:
            self.state.global_step += 1
            self._event("on_step_end")
        self.last_loss = loss.detach()

    def trainable_params(self) -> int:
        """Number of trainable parameters (unique tensors)."""
        return benchlib.trainable_param_count(self.params)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse the command line; sizes left unset take the full-run or ``--quick`` defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and minimal steps: a smoke test in well under 30 s")
    p.add_argument("--hidden-size", type=int, help=f"default {FULL_SIZES['hidden_size']}")
    p.add_argument("--num-layers", type=int, help=f"default {FULL_SIZES['num_layers']}")
    p.add_argument("--intermediate-size", type=int, help=f"default {FULL_SIZES['intermediate_size']}")
    p.add_argument("--num-heads", type=int, help=f"default {FULL_SIZES['num_heads']}")
    p.add_argument("--vocab-size", type=int, help=f"default {FULL_SIZES['vocab_size']}")
    p.add_argument("--seq-len", type=int, help=f"default {FULL_SIZES['seq_len']}")
    p.add_argument("--batch-size", type=int, help=f"default {FULL_SIZES['batch_size']}")
    p.add_argument("--repeats", type=int, help=f"timed repetitions per variant (>= 5); default {FULL_SIZES['repeats']}")
    p.add_argument("--steps", type=int, help=f"optimizer steps per timed repetition; default {FULL_SIZES['steps']}")
    p.add_argument("--warmup", type=int, help=f"untimed steps per variant first; default {FULL_SIZES['warmup']}")
    p.add_argument("--infer-iters", type=int, help=f"forwards per timed inference repetition; default "
                   f"{FULL_SIZES['infer_iters']}")
    p.add_argument("--rank", type=int, default=None, help="override r of every method and of LoRA (default: each "
                   "method's example_kwargs)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base model, the batch and adapter inits")
    p.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's own choice (--quick: 1).\n"
                   "Use 1 on a machine other processes are busy on: OpenMP threads that wait for a descheduled\n"
                   "sibling can make every step 10x slower and the timings meaningless")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'")
    p.add_argument("--out", default="results/bench_overhead.json", help="JSON output path")
    args = p.parse_args(argv)
    preset = benchlib.apply_sizes(args, FULL_SIZES, QUICK_SIZES)
    for name in preset:
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    if args.hidden_size % args.num_heads:
        p.error("--hidden-size must be divisible by --num-heads")
    if args.repeats < 5:
        print(f"warning: --repeats {args.repeats} < 5; the issue asks for the median of at least 5", file=sys.stderr)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def build_base_model(args: argparse.Namespace) -> LlamaForCausalLM:
    """A seeded, randomly initialised ``LlamaForCausalLM`` of the requested size on ``args.device``."""
    seed_everything(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=max(args.seq_len, 128),
        tie_word_embeddings=False,
        use_cache=False,
    )
    return LlamaForCausalLM(config).to(args.device)


def make_batch(args: argparse.Namespace) -> dict:
    """A fixed random batch of token ids (labels = inputs, causal LM loss), on ``args.device``."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(args.device)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


@functools.lru_cache(maxsize=1)
def _trainer_args():
    """One ``TrainingArguments`` for the callbacks' events (built once: it is slow to construct)."""
    import tempfile

    from transformers import TrainingArguments

    return TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-overhead-"), report_to=[], use_cpu=True)


def _config_fields(config_cls: type) -> set[str]:
    """Names of the dataclass fields of a config class."""
    return {f.name for f in dataclasses.fields(config_cls)}


def build_variants(args: argparse.Namespace) -> tuple[list[Variant], list[dict]]:
    """The LoRA baselines and the peft-ext variants to benchmark, plus the methods skipped (with the reason)."""
    lora: dict[str, Variant] = {}
    ext: list[Variant] = []
    skipped = []
    for spec in peft_ext.list_methods():
        fields = _config_fields(spec.config_cls)
        rows = [("example_kwargs", {}, spec.overhead_target)]
        for entry in spec.bench_variants:
            label, extra = entry[0], entry[1]
            rows.append((label, extra, entry[2] if len(entry) > 2 else spec.overhead_target))
        for label, extra, target in rows:
            kwargs = {**spec.example_kwargs, **extra}
            if args.rank is not None and "r" in fields:
                kwargs["r"] = args.rank
            r = kwargs.get("r") if isinstance(kwargs.get("r"), int) else (args.rank or 8)
            alpha = kwargs.get("lora_alpha", r) if isinstance(kwargs.get("lora_alpha", r), (int, float)) else r
            dropout = kwargs.get("lora_dropout", 0.0)
            base_key = f"lora[r={r},alpha={alpha:g}]"
            if base_key not in lora:
                lora_kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=dropout)
                lora[base_key] = Variant(
                    key=base_key, method="lora", label=f"PEFT LoraConfig r={r} α={alpha:g}",
                    make_config=lambda kw=lora_kwargs: LoraConfig(**kw, target_modules=list(TARGET_MODULES)),
                    mergeable=True, config_kwargs=lora_kwargs,
                )
            key = spec.name if not extra else f"{spec.name}[{label}]"
            if spec.train_callback is not None:
                label = f"{label}, with {spec.train_callback.__name__}"
            ext.append(Variant(
                key=key, method=spec.name, label=label,
                make_config=lambda cls=spec.config_cls, kw=kwargs: cls(**kw, target_modules=list(TARGET_MODULES)),
                mergeable=spec.mergeable, baseline_key=base_key, callback=spec.train_callback,
                step_time_target=target, config_kwargs=kwargs,
            ))
    return list(lora.values()) + ext, skipped


def _memory_events(prof) -> list[int]:
    """Signed sizes of the CPU allocation (+) and free (-) events a ``torch.profiler`` run recorded, in time order.

    These are the profiler's raw ``[memory]`` events (from ``prof.profiler.kineto_results``); ``prof.events()`` only
    has them aggregated per operator, which loses the order needed for a running peak.
    """
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())  # stable: simultaneous events keep their recorded order
    return [int(e.nbytes()) for e in events]


def _state_bytes(trainee: Trainee) -> dict:
    """Bytes of the variant's parameters + buffers and of its optimizer state (unique storages), for cross-checks."""
    seen, model_bytes = set(), 0
    for t in list(trainee.model.parameters()) + list(trainee.model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            model_bytes += t.untyped_storage().nbytes()
    opt_bytes = benchlib.optimizer_state_bytes(trainee.optimizer)
    return {"params_and_buffers_mib": model_bytes / MIB, "optimizer_state_mib": opt_bytes / MIB}


def measure_memory(variant: Variant, base_model: nn.Module, batch: dict, args: argparse.Namespace) -> dict:
    """Peak memory (MiB) of one training step of ``variant``, measured with nothing else of the variant alive.

    CPU: PyTorch's CPU allocator keeps no statistics, so the profiler's allocation events are used. A first profile
    covers building the variant (deep copy of the base model, adapter injection, optimizer) and ``--warmup`` steps
    (at least one, so AdamW state and method caches such as NOLA's cached bases exist); the sum of its events is the
    memory the variant holds between steps (``state``). A second profile covers exactly one training step; the
    maximum of the running sum of its events is the step's extra peak (activations, gradients, transient buffers).
    Peak = state + step peak. Every tensor the variant owns is allocated inside the first profile, so the figure
    includes the base-model copy, which is identical for all variants; memory that is not a tensor (Python
    objects) is not counted. CUDA: the same split from ``torch.cuda.memory_allocated`` / ``max_memory_allocated``.
    """
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        trainee = Trainee(variant, base_model, args.lr, args.seed)
        for _ in range(max(1, args.warmup)):
            trainee.step(batch)
        torch.cuda.synchronize()
        state = torch.cuda.memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        trainee.step(batch)
        torch.cuda.synchronize()
        step_peak = torch.cuda.max_memory_allocated() - before - state
        source = "torch.cuda.memory_allocated / max_memory_allocated"
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainee = Trainee(variant, base_model, args.lr, args.seed)
            for _ in range(max(1, args.warmup)):
                trainee.step(batch)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof_step:
            trainee.step(batch)
        try:
            state = sum(_memory_events(prof))
            running, step_peak = 0, 0
            for nbytes in _memory_events(prof_step):
                running += nbytes
                step_peak = max(step_peak, running)
        except AttributeError as exc:  # the raw event API moved in this torch version: report no figure
            del trainee
            gc.collect()
            return {"peak_mib": None, "error": f"profiler memory events unavailable: {exc}"}
        source = "torch.profiler profile_memory=True, running sum of [memory] events"
    result = {
        "peak_mib": (state + step_peak) / MIB,
        "state_mib": state / MIB,
        "step_peak_above_state_mib": step_peak / MIB,
        "source": source,
        **_state_bytes(trainee),
    }
    del trainee
    gc.collect()
    return result


def time_training(trainees: list[Trainee], batch: dict, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per-step wall time (ms) of every trainee after ``args.warmup`` steps each: ``args.repeats`` repetitions of
    ``args.steps`` optimizer steps, interleaved step by step (see ``interleaved_times``)."""
    for trainee in trainees:
        for _ in range(args.warmup):
            trainee.step(batch)
    calls = {t.variant.key: (lambda t=t: t.step(batch)) for t in trainees}
    return interleaved_times(calls, args.repeats, args.steps, args.device)


@torch.no_grad()
def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """No-grad logits of ``model`` on the batch's inputs."""
    return model(input_ids=batch["input_ids"], use_cache=False).logits


def merge_models(trainees: list[Trainee], batch: dict) -> dict[str, dict]:
    """``merge_and_unload()`` every mergeable trainee; returns, per variant, the merged model, the largest absolute
    difference between its logits and the unmerged adapter's (eval mode) and the logits' largest magnitude."""
    merged = {}
    for trainee in trainees:
        if not trainee.variant.mergeable:
            continue
        trainee.model.eval()
        before = _logits(trainee.model, batch)
        model = trainee.model.merge_and_unload()
        model.eval()
        after = _logits(model, batch)
        merged[trainee.variant.key] = {
            "model": model,
            "merge_max_abs_diff": float((after - before).abs().max()),
            "logit_max_abs": float(before.abs().max()),
            "adapter_changed_output": None,
        }
    return merged


@torch.no_grad()
def time_inference(models: dict[str, nn.Module], batch: dict, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per-forward wall time (ms) of no-grad inference of every model, interleaved like ``time_training``."""
    for model in models.values():
        model.eval()
        for _ in range(max(1, args.warmup)):
            _logits(model, batch)
    calls = {key: (lambda m=model: _logits(m, batch)) for key, model in models.items()}
    return interleaved_times(calls, args.repeats, args.infer_iters, args.device)


def _fmt(value: Optional[float], spec: str) -> str:
    """Format a number for the table, '—' (an em dash) for missing."""
    return fmt(value, spec, missing="—")


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    head = ["method", "variant", "trainable params", "step ms (median)", "× LoRA", "peak mem MiB", "mem × LoRA",
            "merged inf × base", "target", "meets target"]
    cells = []
    for r in rows:
        targets = []
        if r["step_time_target"] is not None:
            targets.append(f"step ≤ {r['step_time_target']:.2f}×")
        if r["merged_inference_target"] is not None:
            targets.append(f"merged ≤ {r['merged_inference_target']:.2f}×")
        meets = {True: "yes", False: "**no**", None: "—"}[r["meets_target"]]
        cells.append([
            r["method"], r["variant"], f"{r['trainable_params']:,}", _fmt(r["step_ms_median"], ".1f"),
            _fmt(r["step_time_ratio_vs_lora"], ".3f"), _fmt(r["peak_mem_mib"], ".1f"),
            _fmt(r["mem_ratio_vs_lora"], ".3f"), _fmt(r["merged_inference_ratio_vs_base"], ".3f"),
            ", ".join(targets) or "—", meets,
        ])
    return benchlib.markdown(head, cells)


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (``peft_ext._io``); NaN is refused, so the JSON stays standard."""
    atomic_write_json(path, payload, allow_nan=False)


LOAD_AT_START = benchlib.load_average()


def environment(args: argparse.Namespace) -> dict:
    """Versions and machine facts that matter for reading the timings."""
    env = {
        **benchlib.versions(),
        "peft_ext": peft_ext.__version__,
        "device": args.device,
        "torch_num_threads": torch.get_num_threads(),
        "load_average_at_start": LOAD_AT_START,
        "load_average_at_end": benchlib.load_average(),
    }
    if args.device.startswith("cuda"):
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def _finite(x: float) -> Optional[float]:
    """``x`` if it is a finite float, else ``None`` (JSON has no NaN)."""
    return x if x == x and abs(x) != float("inf") else None


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark, print the table and write the JSON; always returns 0 (targets are reported only)."""
    t_start = time.perf_counter()
    args = parse_args(argv)
    variants, skipped = build_variants(args)
    base_model = build_base_model(args)
    batch = make_batch(args)
    if LOAD_AT_START and LOAD_AT_START[0] > (os.cpu_count() or 1) * 0.5:
        print(f"note: load average {LOAD_AT_START} on {os.cpu_count()} CPUs; other processes will add timing noise"
              + ("" if torch.get_num_threads() == 1 else " (consider --threads 1)"), file=sys.stderr)
    print(f"{len(variants)} variants on {args.device}: {', '.join(v.key for v in variants)}", file=sys.stderr)

    phases = {}
    phase_start = time.perf_counter()

    def phase_done(name: str) -> None:
        """Record and print how long the phase that just ended took."""
        nonlocal phase_start
        phases[name] = round(time.perf_counter() - phase_start, 2)
        phase_start = time.perf_counter()
        print(f"  {name}: {phases[name]:.1f} s", file=sys.stderr)

    print("measuring peak memory (one variant at a time) ...", file=sys.stderr)
    memory = {v.key: measure_memory(v, base_model, batch, args) for v in variants}

    phase_done("memory")
    print("timing training steps (interleaved) ...", file=sys.stderr)
    trainees = [Trainee(v, base_model, args.lr, args.seed) for v in variants]
    train_times = time_training(trainees, batch, args)
    losses = {t.variant.key: _finite(float(t.last_loss)) for t in trainees}
    trainable = {t.variant.key: t.trainable_params() for t in trainees}

    phase_done("training")
    print("timing merged inference (interleaved) ...", file=sys.stderr)
    base_eval = copy.deepcopy(base_model).eval().requires_grad_(False)  # frozen, like a merged model
    base_logits = _logits(base_eval, batch)
    merged = merge_models(trainees, batch)
    for key, m in merged.items():
        m["adapter_changed_output"] = bool(not torch.equal(_logits(m["model"], batch), base_logits))
    del trainees
    gc.collect()
    infer_times = time_inference({"base": base_eval, **{k: m["model"] for k, m in merged.items()}}, batch, args)

    phase_done("inference")
    base_infer = statistics.median(infer_times["base"])
    rows = []
    for v in variants:
        ref = v.baseline_key or v.key
        step = statistics.median(train_times[v.key])
        step_ratio = paired_ratio(train_times[v.key], train_times[ref])
        mem, mem_ref = memory[v.key]["peak_mib"], memory[ref]["peak_mib"]
        merged_ratio = paired_ratio(infer_times[v.key], infer_times["base"]) if v.key in merged else None
        merged_target = MERGED_INFERENCE_TARGET if v.baseline_key is not None and v.mergeable else None
        checks = []
        if v.step_time_target is not None:
            checks.append(step_ratio <= v.step_time_target)
        if merged_target is not None:
            checks.append(merged_ratio <= merged_target)
        m = merged.get(v.key, {})
        rows.append({
            "key": v.key,
            "method": v.method,
            "variant": v.label,
            "config_kwargs": v.config_kwargs,
            "baseline": ref,
            "trainable_params": trainable[v.key],
            "step_ms_median": step,
            "step_ms_all": train_times[v.key],
            "step_time_ratio_vs_lora": step_ratio,
            "step_time_ratio_of_medians_vs_lora": step / statistics.median(train_times[ref]),
            "peak_mem_mib": mem,
            "mem_ratio_vs_lora": mem / mem_ref if mem is not None and mem_ref else None,
            "memory": memory[v.key],
            "mergeable": v.mergeable,
            "merged_inference_ms_median": statistics.median(infer_times[v.key]) if v.key in merged else None,
            "merged_inference_ms_all": infer_times.get(v.key),
            "merged_inference_ratio_vs_base": merged_ratio,
            "merged_inference_ratio_of_medians_vs_base": (
                statistics.median(infer_times[v.key]) / base_infer if v.key in merged else None
            ),
            "merge_max_abs_diff": m.get("merge_max_abs_diff"),
            "merge_logit_max_abs": m.get("logit_max_abs"),
            "merged_differs_from_base": m.get("adapter_changed_output"),
            "final_train_loss": losses[v.key],
            "step_time_target": v.step_time_target,
            "merged_inference_target": merged_target,
            "meets_step_time_target": (step_ratio <= v.step_time_target) if v.step_time_target else None,
            "meets_merged_inference_target": (merged_ratio <= merged_target) if merged_target else None,
            "meets_target": all(checks) if checks else None,
        })

    table = markdown_table(rows)
    print(table)
    runtime = time.perf_counter() - t_start
    print(f"\nbase model inference: {base_infer:.1f} ms/forward (median); total runtime {runtime:.1f} s")
    bad_merge = [r["key"] for r in rows if r["merge_max_abs_diff"] is not None
                 and r["merge_max_abs_diff"] > 1e-3 * max(1.0, merged[r["key"]]["logit_max_abs"])]
    if bad_merge:
        print(f"WARNING: merged logits differ from the unmerged adapter's for {bad_merge}", file=sys.stderr)

    payload = {
        "description": "Training-step time, peak memory and merged-inference time of peft-ext methods vs PEFT LoRA; "
        "see the docstring of scripts/bench_overhead.py.",
        "command": " ".join(["python", *(sys.argv if argv is None else ["scripts/bench_overhead.py", *argv])]),
        "settings": {k: v for k, v in vars(args).items()},
        "model": {"class": "LlamaForCausalLM", "target_modules": TARGET_MODULES,
                  "params": sum(p.numel() for p in base_model.parameters())},
        "environment": environment(args),
        "targets": {
            "step_time_ratio_vs_lora_max": {v.key: v.step_time_target for v in variants if v.step_time_target},
            "merged_inference_ratio_vs_base_max": MERGED_INFERENCE_TARGET,
        },
        "base_inference_ms_median": base_infer,
        "base_inference_ms_all": infer_times["base"],
        "rows": rows,
        "skipped_methods": skipped,
        "merge_mismatch": bad_merge,
        "runtime_s": runtime,
        "phase_runtime_s": phases,
        "table_markdown": table,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
