"""Shared fixtures: tiny random models (Llama with hidden 64 so bitsandbytes works on CPU, and an MLP), the registry's
methods as test parameters, and helpers that build configs and make adapters non-trivial."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import peft_ext  # noqa: E402,F401  (registers every method)
from peft_ext import list_methods  # noqa: E402

METHODS = list_methods()
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
MLP_TARGETS = ["lin0", "lin1"]


def method_params(predicate=lambda spec: True):
    """Registry specs as pytest params with readable ids; a new method is covered the moment it is registered."""
    return [pytest.param(spec, id=spec.name) for spec in METHODS if predicate(spec)]


def make_config(spec, target_modules, **overrides):
    """The spec's example config on ``target_modules``."""
    return spec.config_cls(**{**spec.example_kwargs, "target_modules": list(target_modules), **overrides})


def conformance_config(spec, target_modules, **overrides):
    """The example config with the spec's ``conformance_kwargs`` on top (auxiliary losses on, routed branches)."""
    return make_config(spec, target_modules, **{**spec.conformance_kwargs, **overrides})


def call_kwargs(spec, token_shape):
    """The spec's per-call inputs (route ids, masks) for a call whose layers see ``token_shape``; {} when none."""
    return spec.example_call(tuple(token_shape)) if spec.example_call is not None else {}


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def tiny_llama(seed: int = 0):
    """A tiny random LlamaForCausalLM in eval mode; the same seed gives the same weights in any process."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


class MLP(nn.Module):
    """A tiny MLP with 64-wide linear layers (bitsandbytes-compatible)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(64, 64)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


def tiny_mlp(seed: int = 0):
    torch.manual_seed(seed)
    return MLP().eval()


def randomize_adapter(model, seed: int = 1, std: float = 0.1):
    """Give every trainable adapter parameter random values so that merges and reloads test something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error used for the fp32 ≤ 1e-5 merge promise."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def llama_inputs():
    torch.manual_seed(123)
    return torch.randint(0, 128, (2, 12))


@pytest.fixture
def mlp_inputs():
    torch.manual_seed(123)
    return torch.randn(5, 64)



@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run several times faster on one thread than on two contended ones
    (thread hand-off dominates); the previous setting is restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ---------------------------------------------------------------------------------------------------------------------
# PEFT's generic suite (tests/test_peft_generic.py): its pass / skip counts per method are published in the README's
# methods table (docs/peft_generic_suite.json, rendered by scripts/gen_docs.py). When a session runs that whole module
# (nothing deselected), the counts it saw must equal the published ones, or the session fails with the difference;
# PEFT_EXT_WRITE_SUITE_COUNTS=1 writes the new counts instead (then rerun scripts/gen_docs.py).

SUITE_MODULE = "test_peft_generic.py"
SUITE_COUNTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "peft_generic_suite.json"
)
_suite = {"collected": 0, "deselected": 0, "seen": set(), "counts": {}}
# a word of a test's parameter id -> its method: the method name, or its config class (PEFT's config-class tests)
_SUITE_NAMES = {spec.name: spec.name for spec in METHODS} | {spec.config_cls.__name__: spec.name for spec in METHODS}


def _suite_method(nodeid: str):
    """The registered method a generic-suite test belongs to (a word of its parameter id: the method's name, or its
    config class for PEFT's tests parametrised over config classes), else None."""
    import re

    if SUITE_MODULE not in nodeid or "[" not in nodeid:
        return None
    found = {_SUITE_NAMES[w] for w in re.split(r"[ \-\[\]]", nodeid.split("[", 1)[1]) if w in _SUITE_NAMES}
    return found.pop() if len(found) == 1 else None


def pytest_collection_modifyitems(config, items):
    _suite["collected"] = sum(SUITE_MODULE in item.nodeid for item in items)


def pytest_deselected(items):
    _suite["deselected"] += sum(SUITE_MODULE in item.nodeid for item in items)


def pytest_runtest_logreport(report):
    method = _suite_method(report.nodeid)
    if SUITE_MODULE in report.nodeid and report.when == "teardown":
        _suite["seen"].add(report.nodeid)
    if method is None:
        return
    counts = _suite["counts"].setdefault(method, {"passed": 0, "skipped": 0, "failed": 0})
    if report.skipped:
        counts["skipped"] += 1
    elif report.failed:
        counts["failed"] += 1
    elif report.when == "call":
        counts["passed"] += 1


def pytest_sessionfinish(session, exitstatus):
    import json

    complete = _suite["collected"] and len(_suite["seen"]) == _suite["collected"] and not _suite["deselected"]
    if not complete or exitstatus != 0:
        return
    got = {name: [c["passed"], c["skipped"]] for name, c in sorted(_suite["counts"].items())}
    if os.environ.get("PEFT_EXT_WRITE_SUITE_COUNTS") == "1":
        from peft_ext._io import atomic_write_json

        atomic_write_json(SUITE_COUNTS, got)
        return
    try:
        with open(SUITE_COUNTS, encoding="utf-8") as f:
            published = json.load(f)
    except (OSError, ValueError):
        published = None
    if got != published:
        session.config._peft_ext_suite_mismatch = (published, got)
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    mismatch = getattr(config, "_peft_ext_suite_mismatch", None)
    if mismatch:
        published, got = mismatch
        terminalreporter.write_line(
            f"FAILED: PEFT generic suite pass/skip counts per method changed; published in {SUITE_COUNTS}: "
            f"{published}; this run: {got}. Rerun with PEFT_EXT_WRITE_SUITE_COUNTS=1, then scripts/gen_docs.py.",
            red=True,
        )
