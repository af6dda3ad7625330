"""MoLA's fused forward (two GEMMs for all experts) against the official per-expert loop, same process.

Paper: *Higher Layers Need More LoRA Experts* (https://arxiv.org/abs/2402.08562). Official code:
https://github.com/GCYZSL/MoLA — its ``Linear_MoE.forward`` loops over the experts in Python, gathers the tokens that
picked each expert, runs that expert's LoRA on them and scatters the weighted result back with ``index_add_``. The
oracle below re-implements that algorithm (our own code) on the same weights; ``peft_ext``'s ``MolaLayer`` computes
``h = x A_allᵀ`` for all experts at once, scales each rank by its expert's routing weight (0 when not selected) and
applies ``B_all`` in one more GEMM.

Measured: one training step of the adapter branch (forward + backward w.r.t. router, A and B) at each setting, the
two implementations taking turns (interleaved, median over repetitions; ``benchlib.interleaved_times``, which pauses
Python's cyclic garbage collector while timing), plus a plain LoRA of the same rank r for scale. The outputs and
gradients are checked to agree before timing. Timings are reported, never asserted.

Rerun (from the repository root)::

    .venv/bin/python scripts/bench_mola_loop.py                 # ~20 s on 2 CPU cores
    .venv/bin/python scripts/bench_mola_loop.py --threads 1 --tokens 2048 --hidden 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys

import benchlib  # first: it sets HF_HUB_OFFLINE before transformers is imported
import torch
import torch.nn.functional as F
from torch import nn

import peft_ext  # noqa: F401
from peft_ext.tuners.mola import MolaConfig, MolaLinear


def loop_branch(x, Wr, A, B, E, k, r, scale):
    """The official algorithm: softmax router in fp32, top-k, renormalise (for k >= 2; peft-ext's default uses the raw
    probability for k = 1, where renormalising freezes the router), then a Python loop over experts."""
    probs = torch.softmax(x @ Wr.T, dim=-1, dtype=torch.float)
    top_p, top_i = probs.topk(k, dim=-1)
    if k >= 2:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    top_p = top_p.to(x.dtype)
    out = torch.zeros(x.shape[0], B.shape[0], dtype=x.dtype)
    for e in range(E):
        tok, slot = torch.where(top_i == e)
        if tok.numel() == 0:
            continue
        y = F.linear(F.linear(x[tok], A[e * r : (e + 1) * r]), B[:, e * r : (e + 1) * r]) * scale
        out = out.index_add(0, tok, y * top_p[tok, slot, None])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="tokens per batch (batch x sequence); default 1024")
    p.add_argument("--hidden", type=int, default=512, help="in = out features; default 512")
    p.add_argument("--rank", type=int, default=8, help="rank of each expert; default 8")
    p.add_argument("--settings", default="4:2,8:2,16:2,8:1", help="experts:top_k pairs; default 4:2,8:2,16:2,8:1")
    p.add_argument("--repeats", type=int, default=15, help="timed repetitions; default 15")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, r = args.hidden, args.rank
    x = torch.randn(args.tokens, d)
    print(f"tokens={args.tokens} hidden={d} r={r} threads={torch.get_num_threads()}")
    print("| experts | top-k | fused ms | loop ms | loop / fused | LoRA r ms | fused / LoRA |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        E, k = (int(v) for v in setting.split(":"))
        layer = MolaLinear(nn.Linear(d, d), "default", MolaConfig(r=r, lora_alpha=2 * r, num_experts=E, top_k=k,
                                                                  target_modules=["x"]))
        layer.train()
        Wr = layer.mola_router["default"].weight
        A = layer.mola_experts_down["default"].weight
        B = layer.mola_experts_up["default"].weight
        with torch.no_grad():
            B.normal_(0, 0.02)
        lora_A = nn.Parameter(torch.randn(r, d) * 0.02)
        lora_B = nn.Parameter(torch.randn(d, r) * 0.02)
        params = [Wr, A, B]
        g = torch.randn(args.tokens, d)

        def fused():
            return torch.autograd.grad((layer.adapter_forward("default", x) * g).sum(), params)

        def loop():
            return torch.autograd.grad((loop_branch(x, Wr, A, B, E, k, r, 2.0) * g).sum(), params)

        def lora():
            return torch.autograd.grad((F.linear(F.linear(x, lora_A), lora_B) * 2.0 * g).sum(), [lora_A, lora_B])

        with torch.no_grad():
            diff = (layer.adapter_forward("default", x) - loop_branch(x, Wr, A, B, E, k, r, 2.0)).abs().max().item()
        # relative to the largest entry: the two sum ~tokens terms in different orders (fp32: ~1e-6)
        grads_match = all(((a - b).abs().max() / b.abs().max()).item() < 1e-5 for a, b in zip(fused(), loop()))
        if diff > 1e-4 or not grads_match:
            print(f"MISMATCH at E={E} k={k}: max |fused - loop| = {diff:.2e}, gradients match: {grads_match}")
            return 1
        calls = {"fused": fused, "loop": loop, "lora": lora}
        for fn in calls.values():
            fn()
        times = benchlib.interleaved_times(calls, args.repeats)
        med = {key: statistics.median(v) for key, v in times.items()}
        ratio = benchlib.paired_ratio(times["loop"], times["fused"])
        print(f"| {E} | {k} | {med['fused']:.2f} | {med['loop']:.2f} | {ratio:.2f}x | {med['lora']:.2f} | "
              f"{med['fused'] / med['lora']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
