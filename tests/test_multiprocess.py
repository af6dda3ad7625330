"""Data-parallel training with two CPU processes over gloo (torchrun / accelerate launch), about a minute in all.

``tests/ddp_worker.py`` trains a tiny random Llama with DyLoRA (+ ``DyLoraRankSampler``), NOLA, or MoLA (whose
load-balancing loss the tuner adds to ``outputs.loss``), and ``LisaCallback`` in adapter mode, through
``transformers.Trainer``; or (``lisa_full``) the plain model with full-parameter LISA, whose frozen blocks DDP must
tolerate (``find_unused_parameters``, on by default in the Trainer). The tests check that both ranks end with the
same weights, followed the same rank and layer schedules, and that the gradients really were averaged across the
ranks. The command line is checked under ``torchrun`` and ``accelerate launch``: one process writes one adapter
folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with the gloo backend unavailable"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a test session itself under torchrun must not leak its own rendezvous
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    return env


def torchrun(*args) -> list:
    """``torchrun --nproc_per_node 2`` on loopback (``python -m torch.distributed.run`` is torchrun's entry point)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]


def run(cmd: list) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill that group (both ranks) and fail with the output."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S}s:\n{output[-6000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


def block_of(name: str):
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


@pytest.fixture(scope="module", params=["dylora", "nola", "mola", "lisa_full"])
def ddp_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ddp-{request.param}")
    run(torchrun(WORKER, "--method", request.param, "--out", out))

    def load(name):
        return torch.load(out / name, map_location="cpu")

    return {
        "method": request.param,
        "records": [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)],
        "init": [load(f"init{r}.pt") for r in (0, 1)],
        "final": [load(f"rank{r}.pt") for r in (0, 1)],
        "grads": [load(f"grads{r}.pt") for r in (0, 1)],
    }


def test_both_ranks_end_with_identical_trained_weights(ddp_run):
    import ddp_worker

    for rec in ddp_run["records"]:
        assert rec["world_size"] == 2 and rec["wrapper"] == "DistributedDataParallel"
        assert rec["global_step"] == ddp_worker.STEPS
        assert rec["find_unused_parameters"] is True  # what lets DDP run with LISA's frozen blocks
    init0, init1 = ddp_run["init"]
    final0, final1 = ddp_run["final"]
    assert init0.keys() == init1.keys() == final0.keys() == final1.keys() and len(final0) > 0
    for name in final0:
        assert torch.equal(init0[name], init1[name]), f"{name}: the ranks started from different weights"
        assert torch.equal(final0[name], final1[name]), f"{name}: the ranks ended with different weights"
    changed = {name for name in final0 if not torch.equal(final0[name], init0[name])}
    assert changed, "training changed no adapter weight"
    # LISA: only blocks it activated may change; blocks never activated keep their init. Outside the blocks: nothing
    # trains in adapter mode; embeddings, final norm and LM head always train in full mode.
    active = {layer for _, layers in ddp_run["records"][0]["lisa_history"] for layer in layers}
    assert active != set(range(ddp_worker.LAYERS)), "every block was active: the never-active check tests nothing"
    changed_blocks = {block_of(name) for name in changed} - {None}
    assert changed_blocks <= active and changed_blocks
    for name in final0:
        if block_of(name) is None:
            assert (name in changed) == (ddp_run["method"] == "lisa_full"), name
        elif block_of(name) not in active:
            assert torch.equal(final0[name], init0[name]), f"{name} changed though its block was never active"


def test_both_ranks_follow_the_same_rank_and_layer_schedules(ddp_run):
    import ddp_worker
    from peft_ext.callbacks import DyLoraRankSampler
    from peft_ext.callbacks.lisa import LisaCallback

    rec0, rec1 = ddp_run["records"]
    assert [s["step"] for s in rec0["steps"]] == list(range(ddp_worker.STEPS))
    assert [(s["rank"], s["lisa"]) for s in rec0["steps"]] == [(s["rank"], s["lisa"]) for s in rec1["steps"]]
    assert rec0["lisa_history"] == rec1["lisa_history"]
    # the schedules are the callbacks' own functions of (seed, step)
    model = ddp_worker.build_model(ddp_run["method"])
    lisa = LisaCallback(model, n_layers=1, interval_steps=2, seed=ddp_worker.SCHEDULE_SEED,
                        mode=ddp_worker.lisa_mode(ddp_run["method"]))
    expected = [[step, lisa.sample(step // 2)] for step in range(0, ddp_worker.STEPS, 2)]
    assert rec0["lisa_history"] == expected
    assert [s["lisa"] for s in rec0["steps"]] == [lisa.sample(k // 2) for k in range(ddp_worker.STEPS)]
    ranks = [s["rank"] for s in rec0["steps"]]
    if ddp_run["method"] == "dylora":
        sampler = DyLoraRankSampler(model, seed=ddp_worker.SCHEDULE_SEED)
        assert ranks == [sampler.sample(k) for k in range(ddp_worker.STEPS)]
        assert len(set(ranks)) > 1
    else:
        assert ranks == [None] * ddp_worker.STEPS


def test_gradients_are_averaged_across_ranks(ddp_run):
    """Each rank trains on its own shard, yet the optimizer of both sees the mean of the two ranks' gradients."""
    import ddp_worker
    from peft_ext.callbacks import DyLoraRankSampler
    from peft_ext.callbacks.lisa import LisaCallback

    rec0, rec1 = ddp_run["records"]
    rows0 = {tuple(row) for s in rec0["steps"] for row in s["batch"]}
    rows1 = {tuple(row) for s in rec1["steps"] for row in s["batch"]}
    assert len(rows0) == len(rows1) == ddp_worker.STEPS * ddp_worker.BATCH and not rows0 & rows1, "shards overlap"

    synced0, synced1 = ddp_run["grads"]
    assert synced0.keys() == synced1.keys() and synced0
    for name in synced0:
        assert torch.equal(synced0[name], synced1[name]), f"{name}: step-0 gradients differ between the ranks"

    # recompute step 0 in this process: the gradient of each rank's own batch, at the same rank and LISA blocks
    model = ddp_worker.build_model(ddp_run["method"]).train()
    if ddp_run["method"] == "dylora":
        DyLoraRankSampler(model, seed=ddp_worker.SCHEDULE_SEED).step(0)
    LisaCallback(model, n_layers=1, interval_steps=2, seed=ddp_worker.SCHEDULE_SEED,
                 mode=ddp_worker.lisa_mode(ddp_run["method"])).step(0)
    local = []
    for rec in (rec0, rec1):
        ids = torch.tensor(rec["steps"][0]["batch"])
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        local.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert local[0].keys() == local[1].keys() == synced0.keys()
    differs_from_local = False
    for name, grad in synced0.items():
        mean = (local[0][name] + local[1][name]) / 2
        torch.testing.assert_close(grad, mean, rtol=1e-4, atol=1e-7, msg=f"{name}: not the mean of the ranks")
        scale = mean.abs().max().clamp_min(1e-12)
        differs_from_local |= bool(((grad - local[0][name]).abs().max() / scale) > 1e-2)
    assert differs_from_local, "the synced gradient equals rank 0's own gradient: no all-reduce happened"
    if ddp_run["method"] == "mola":
        # the auxiliary loss is part of what both ranks trained on: without it the mean gradient is different
        plain = ddp_worker.build_model("mola", balance_loss_weight=0.0).train()
        LisaCallback(plain, n_layers=1, interval_steps=2, seed=ddp_worker.SCHEDULE_SEED, adapter_mode=True).step(0)
        without = []
        for rec in (rec0, rec1):
            ids = torch.tensor(rec["steps"][0]["batch"])
            plain.zero_grad(set_to_none=True)
            plain(input_ids=ids, labels=ids).loss.backward()
            without.append({n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None})
        routers = [n for n in synced0 if "router" in n]
        assert routers, "no router gradient was synced"
        gap = max(float(((without[0][n] + without[1][n]) / 2 - synced0[n]).abs().max()) for n in routers)
        assert gap > 1e-6, "the router gradients do not contain the load-balancing loss"


LAUNCHERS = {
    "torchrun": lambda: torchrun("-m", "peft_ext.cli"),
    # on GPUs: accelerate launch --multi_gpu --num_processes N -m peft_ext.cli train RECIPE (here CPU and gloo)
    "accelerate": lambda: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
                           "-m", "peft_ext.cli"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_cli_train_under_two_processes_writes_one_adapter(tmp_path, launcher):
    if launcher == "accelerate" and importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate is not installed")
    out = tmp_path / "run"
    run(LAUNCHERS[launcher]() + ["train", "recipes/tiny.yaml", "--set", f"output_dir={out}",
                                 "--set", "training.ddp_backend=gloo", "--quiet"])
    adapters = sorted(p.parent for p in out.rglob("adapter_config.json") if "checkpoints" not in p.parts)
    assert adapters == [out / "adapter"]
    assert {p.name for p in out.iterdir() if p.is_dir()} <= {"adapter", "checkpoints", "runs"}
    assert sorted(p.name for p in (out / "adapter").glob("*.safetensors")) == ["adapter_model.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 8 and metrics["peft_config"]["peft_type"] == "DYLORA"
    last = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    # the Trainer saves one RNG state per process (rng_state.pth alone when it runs in one process)
    assert sorted(p.name for p in last.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
