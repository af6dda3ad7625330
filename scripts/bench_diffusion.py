"""Cost of multi-LoRA composition on one diffusers pipeline: Merge, Switch, Composite and CMLoRA with 2, 3 and 5 LoRAs.

What it measures: ``peft_ext.diffusion.tiny.tiny_pipeline`` (a randomly initialised two-level Stable-Diffusion UNet,
``--size`` pixels square, the tiny VAE does not downsample) with N random LoRAs (``add_random_lora``, r=4 on
``to_q/k/v/out.0``), one image per call, ``--steps`` DDIM steps, classifier-free guidance ``--cfg`` (so each UNet pass
is a batch of 2), one torch thread. Per method and N:

* **UNet evaluations** per image: real UNet passes (``conv_in`` runs), a CFG-batched pass counting once; and **deep
  evaluations**: passes that ran the deep blocks (``down_blocks[1:]``, ``mid_block``, ``up_blocks[:-1]``), the part
  CMLoRA's cache skips.
* **Wall and CPU time** per image (ms), medians of ``--repeats`` interleaved repetitions (the methods take turns, so
  machine load hits them alike), and the CPU time's ratio to Composite in the same repetition (median of the
  per-repetition ratios). One thread: CPU time is the compute; on a shared machine wall time adds the waiting.

Methods: ``merge`` (all adapters active, weights 1), ``switch`` (``switch_step`` 5), ``composite``, ``cmlora`` (paper
mode: non-uniform refresh schedule c=0, N-1 high-frequency adapters and one low-frequency one, cache depth 1),
``cmlora_c3`` (refresh every 3 steps) and ``cmlora_faithful`` (the official code: c=0 never reuses features, so it
costs what Composite costs plus the dominant weighting). Adapter switching goes through diffusers' ``set_adapters``
at every pass; on this tiny UNet that overhead is a visible share of a pass (on SD1.5 it is negligible).

Rerun (from the repository root)::

    .venv/bin/python scripts/bench_diffusion.py            # ~5 CPU minutes on one thread
    .venv/bin/python scripts/bench_diffusion.py --quick    # a smoke test

Writes ``--out`` (default ``results/bench_diffusion.json``) atomically and prints the markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import benchlib
import torch

from peft_ext._io import atomic_write_json
from peft_ext.diffusion.cmlora import CMLoRAConfig, cmlora
from peft_ext.diffusion.compose import composite, merge, switch
from peft_ext.diffusion.tiny import add_random_lora, tiny_pipeline

METHODS = ["merge", "switch", "composite", "cmlora", "cmlora_c3", "cmlora_faithful"]


def run_method(pipe, method: str, names: list, kwargs: dict):
    """One image with ``method`` over adapters ``names``; returns the CompositionResult."""
    if method == "merge":
        return merge(pipe, names, **kwargs)
    if method == "switch":
        return switch(pipe, names, switch_step=5, **kwargs)
    if method == "composite":
        return composite(pipe, names, **kwargs)
    config = {"cmlora": CMLoRAConfig(cache_interval=0), "cmlora_c3": CMLoRAConfig(cache_interval=3),
              "cmlora_faithful": CMLoRAConfig(cache_interval=0, faithful_quirks=True)}[method]
    return cmlora(pipe, names[:-1], names[-1:], config, **kwargs)


def interleaved_wall_and_cpu(calls: dict, repeats: int):
    """Wall and process-CPU ms per call, the callables taking turns (first one rotating) in each repetition. On a
    shared machine the CPU time of this one-thread process is the steadier cost measure; wall time includes waiting."""
    keys = list(calls)
    wall: dict = {k: [] for k in keys}
    cpu: dict = {k: [] for k in keys}
    with benchlib.no_gc():
        for rep in range(repeats):
            for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:
                w0, c0 = time.perf_counter(), time.process_time()
                calls[key]()
                cpu[key].append((time.process_time() - c0) * 1000)
                wall[key].append((time.perf_counter() - w0) * 1000)
    return wall, cpu


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_common_options(p, "results/bench_diffusion.json", "2 repeats, 10 steps, N = 2 and 3")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per image (default 20)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing repetitions (default 5)")
    p.add_argument("--size", type=int, default=16, help="image side in pixels (default 16)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--n-adapters", default=None, help="comma-separated adapter counts (default 2,3,5)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    args = p.parse_args(argv)
    benchlib.apply_sizes(args, dict(steps=20, repeats=5, n_adapters="2,3,5"),
                         dict(steps=10, repeats=2, n_adapters="2,3"))
    benchlib.set_threads(p, args.threads)
    methods = benchlib.parse_choices(p, "--methods", args.methods, METHODS, "method")
    counts = [int(n) for n in args.n_adapters.split(",")]
    if "composite" not in methods:
        p.error("--methods: composite is the reference and must be included")
    if any(n < 2 for n in counts):
        p.error("--n-adapters: compose at least 2 adapters")

    benchlib.seed_everything(args.seed)
    started = time.time()
    pipe = tiny_pipeline(seed=args.seed, sample_size=args.size)
    for k in range(max(counts)):
        add_random_lora(pipe.unet, f"lora{k}", seed=args.seed + 100 + k)
    rows, table = [], []
    for n in counts:
        names = [f"lora{k}" for k in range(n)]

        def kwargs():
            return dict(prompt="a photo", num_inference_steps=args.steps, guidance_scale=args.cfg, output_type="pt",
                        height=args.size, width=args.size, generator=torch.Generator().manual_seed(args.seed))

        counts_of = {m: run_method(pipe, m, names, kwargs()) for m in methods}  # warm-up + the counters
        times, cpu = interleaved_wall_and_cpu(
            {m: (lambda m=m: run_method(pipe, m, names, kwargs())) for m in methods}, args.repeats)
        for m in methods:
            res = counts_of[m]
            row = dict(method=m, n_adapters=n, steps=args.steps, unet_evals=res.unet_evals, deep_evals=res.deep_evals,
                       ms_per_image=statistics.median(times[m]), ms_all=[round(t, 2) for t in times[m]],
                       cpu_ms_per_image=statistics.median(cpu[m]), cpu_ms_all=[round(t, 2) for t in cpu[m]],
                       time_vs_composite=benchlib.paired_ratio(times[m], times["composite"]),
                       cpu_vs_composite=benchlib.paired_ratio(cpu[m], cpu["composite"]),
                       deep_evals_vs_composite=res.deep_evals / counts_of["composite"].deep_evals)
            rows.append(row)
            table.append([m, str(n), str(row["unet_evals"]), str(row["deep_evals"]),
                          benchlib.fmt(row["ms_per_image"], ".0f"), benchlib.fmt(row["cpu_ms_per_image"], ".0f"),
                          benchlib.fmt(row["cpu_vs_composite"], ".2f"),
                          benchlib.fmt(row["deep_evals_vs_composite"], ".2f")])
            print(f"N={n} {m}: {row['unet_evals']} UNet / {row['deep_evals']} deep evals, "
                  f"{row['ms_per_image']:.0f} ms wall, {row['cpu_ms_per_image']:.0f} ms CPU "
                  f"({row['cpu_vs_composite']:.2f}x composite)", flush=True)
    md = benchlib.markdown(["method", "N", "UNet evals", "deep evals", "wall ms / image", "CPU ms / image",
                            "CPU time vs Composite", "deep evals vs Composite"], table)
    print(md)
    payload = dict(benchmark="diffusion multi-LoRA composition cost", args=vars(args), rows=rows, table=md,
                   wall_s=round(time.time() - started, 1), load_average=benchlib.load_average(),
                   versions=benchlib.versions())
    atomic_write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
