"""Crash-safe runs: a SIGKILLed ``peft-ext train`` resumed with ``--resume`` ends like the uninterrupted run."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS, SAVE = 16, 4
ROOT = Path(__file__).resolve().parent.parent


def _cmd(out, resume=False, keep_all=False):
    """The tiny run; ``keep_all`` turns checkpoint rotation off (the runner keeps 2), so the checkpoint a test kills
    after still exists however fast the run goes on (a fast machine does all 16 steps in well under a second)."""
    cmd = [sys.executable, "-m", "peft_ext.cli", "train", str(ROOT / "recipes/tiny.yaml"),
           "--set", f"output_dir={out}", "--set", f"training.max_steps={STEPS}",
           "--set", f"training.save_steps={SAVE}", "--set", "evaluation.plot=false"]
    return cmd + (["--set", "training.save_total_limit=null"] if keep_all else []) + (["--resume"] if resume else [])


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def _weights(out):
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(out), check=True, env=_env(), capture_output=True, timeout=900)
    return _weights(out)


def _kill_at(out, step, delay=0.0):
    """Start a run (rotation off); SIGKILL it ``delay`` seconds after checkpoint-``step`` is complete
    (trainer_state.json written). The resumed run rotates as usual."""
    log = Path(str(out) + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(_cmd(out, keep_all=True), env=_env(), stdout=sink, stderr=subprocess.STDOUT)
    marker = Path(out) / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.time() + 900  # generous: a heavily loaded machine starves the run
    # transformers writes trainer_state.json last but not atomically: wait until it is whole, so the checkpoint the
    # test counts on is complete (a kill before that leaves nothing to resume from, which --resume reports as such)
    while not _whole_json(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    ended = proc.poll()  # None: still running, as it should be
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _whole_json(marker), (f"no complete checkpoint-{step} (run exit status {ended}, None = killed after "
                                 f"the deadline):\n{log.read_text()[-3000:]}")


def _whole_json(path) -> bool:
    try:
        json.loads(Path(path).read_text())
        return True
    except (OSError, ValueError):
        return False


def _drop_checkpoints_after(out, step):
    """Remove every checkpoint newer than ``step``: the state of a run killed right after saving checkpoint-step."""
    for folder in (Path(out) / "checkpoints").glob("checkpoint-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)


def _resume_and_check(out, reference):
    res = subprocess.run(_cmd(out, resume=True), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (Path(out) / "metrics.json").is_file()
    got = _weights(out)
    assert got.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=0, atol=1e-6)
    return res


def test_sigkill_at_random_step_then_resume(tmp_path, reference):
    """Killed at a seeded random moment after a seeded random checkpoint: between steps, or while saving the next."""
    rng = random.Random(22)
    step = rng.choice(range(SAVE, STEPS - SAVE + 1, SAVE))
    _kill_at(tmp_path / "run", step, delay=rng.uniform(0.0, 0.5))
    _resume_and_check(tmp_path / "run", reference)


def test_resume_survives_rotation_of_the_resumed_checkpoint(tmp_path, reference):
    """Resumed from the first checkpoint, the run saves three more; save_total_limit=2 deletes the one it resumed from
    before the run ends, and the run still finishes with metrics."""
    out = tmp_path / "run"
    _kill_at(out, SAVE)
    _drop_checkpoints_after(out, SAVE)  # resume from checkpoint-4 whatever step the kill landed at
    _resume_and_check(out, reference)
    assert not (out / "checkpoints" / f"checkpoint-{SAVE}").exists(), "rotation did not happen; the test checks nothing"


def test_resume_skips_truncated_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    _kill_at(out, SAVE)
    _drop_checkpoints_after(out, SAVE)
    ckpts = out / "checkpoints"
    good = ckpts / f"checkpoint-{SAVE}"
    bad = ckpts / f"checkpoint-{SAVE * 2}"  # a save killed midway: newest number, no state, truncated weights
    shutil.copytree(good, bad)
    (bad / "trainer_state.json").unlink()
    w = bad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    res = _resume_and_check(out, reference)
    assert f"skips incomplete checkpoint {bad}" in res.stderr
