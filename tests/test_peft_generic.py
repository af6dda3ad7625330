"""PEFT's own generic suite (``TestPeftCustomModel`` and ``TestMultipleActiveAdapters`` from the installed PEFT
version's ``tests/test_custom_models.py``) run against every registered peft-ext method.

PEFT's test module is fetched at test time from its source distribution and cached (``peft_upstream.py``); it is never
copied into this repository. Its test methods run unchanged; only their parametrisation is replaced: the cases come
from the registry (each method's ``MethodSpec.example_kwargs``, and for routed methods with ``example_call`` a case
with the conformance settings and those per-call inputs) on models of PEFT's test file: its MLP (both layers; one
layer plus ``modules_to_save``), the linear layer of its embedding model, and its embedding / conv layers where
``MethodSpec.layer_types`` lists them (an undeclared layer type must be refused with an error naming the method).

Every skip is decided by a capability the method declares once in its ``MethodSpec``, and the reason names it:
``SKIP_RULES`` below, and PEFT's own merge-skip hook ``_skip_if_merging_not_supported`` (called by PEFT's tests where
they start merging), which is extended here with ``mergeable`` and the per-call-input case.

Subset of PEFT's matrix, to keep the suite at about two minutes on two cores: every test of the two classes that is
parametrised over PEFT's ``TEST_CASES`` / ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` / config classes (the tests written
for one upstream method, such as LoRA's DoRA or trainable-token tests, are left out), three cases per method (four
for routed methods with per-call inputs), and PEFT's 12-way dtype matrix on each method's first case only.
"""

from __future__ import annotations

import functools
import inspect
import subprocess

import pytest
import torch
from conftest import METHODS
from peft.tuners.tuners_utils import BaseTunerLayer
from peft_upstream import load_peft_test_module

UP = load_peft_test_module("test_custom_models")

CASE_ARGS = "test_name, model_id, config_cls, config_kwargs"
MULTI_ARGS = "test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2"
CONFIG_ARGS = "config_cls"

# (model of PEFT's test file, target modules): the method's example settings on PEFT's MLP (both layers), on one
# layer with the other in modules_to_save, and on the linear layer of PEFT's embedding model (token ids in, embedded
# by the base). PEFT's embedding / conv layers themselves are targeted where MethodSpec.layer_types lists them.
MODEL_TARGETS = [
    ("MLP", ["lin0", "lin1"], {}),
    ("MLP", ["lin0"], {"modules_to_save": ["lin1"]}),
    ("EmbConv1D", ["lin0"], {}),
]
# the embedding / conv layers of PEFT's test models, by the layer type MethodSpec.layer_types names
LAYER_TYPE_TARGETS = {
    "embedding": ("EmbConv1D", "emb"),
    "conv1d": ("EmbConv1D", "conv1d"),
    "conv2d": ("Conv2d", "conv2d"),
}
# PEFT's 12-way dtype matrix (fp16 / bf16 / fp32 x autocast x low_cpu_mem_usage) checks the adapter weights' dtype,
# which does not depend on the targeted modules: it runs on each method's first case only
FIRST_CASE_ONLY = {"test_adapter_dtype_autocast"}
MLP_TOKENS = (9,)  # PEFT's inputs: X = arange(90).view(9, 10); the MLP's layers see 9 rows
SPECS = {spec.name: spec for spec in METHODS}
CALL_INPUTS: dict = {}  # test_name -> per-call inputs for the case's forwards


def _narrowest(model_id: str, target_modules: list) -> int:
    """min(in_features, out_features) over the target layers of PEFT's test model ``model_id``."""
    model = UP.MockTransformerWrapper.from_pretrained(model_id)
    return min(min(model.get_submodule(t).in_features, model.get_submodule(t).out_features) for t in target_modules)


def _cases():
    cases = []
    for spec in METHODS:
        targets = [(model_id, t, extra) for model_id, t, extra in MODEL_TARGETS]
        targets += [(model_id, [module], {}) for layer_type, (model_id, module) in LAYER_TYPE_TARGETS.items()
                    if layer_type in spec.layer_types]
        for model_id, target_modules, extra in targets:
            name = " ".join([spec.name, model_id, "+".join(target_modules)] + [f"{k}={v}" for k, v in extra.items()])
            kwargs = {**spec.example_kwargs, "target_modules": target_modules, **extra}
            if spec.rank_within_layer:  # MethodSpec.rank_within_layer: r <= min(in, out) of every target layer
                kwargs["r"] = min(kwargs.get("r", spec.config_cls.r), _narrowest(model_id, target_modules))
            cases.append(pytest.param(name, model_id, spec.config_cls, kwargs, id=name))
        if spec.example_call is not None:
            # the routed call the conformance suite makes: conformance settings and the per-call inputs
            name = f"{spec.name} MLP lin0+lin1 per-call inputs"
            kwargs = {**spec.example_kwargs, **spec.conformance_kwargs, "target_modules": ["lin0", "lin1"]}
            if spec.rank_within_layer:
                kwargs["r"] = min(kwargs.get("r", spec.config_cls.r), _narrowest("MLP", ["lin0", "lin1"]))
            CALL_INPUTS[name] = spec.example_call(MLP_TOKENS)
            cases.append(pytest.param(name, "MLP", spec.config_cls, kwargs, id=name))
    return cases


def _multi_cases():
    cases = []
    for spec in METHODS:
        base = {**spec.example_kwargs, "init_weights": False}
        if spec.rank_within_layer:  # both cases put an adapter on lin0 or lin1 of PEFT's MLP
            base["r"] = min(base.get("r", spec.config_cls.r), _narrowest("MLP", ["lin0", "lin1"]))
        for label, second in (("Same", ["lin0"]), ("Different", ["lin1"])):
            name = f"{spec.name} {label}"
            cases.append(pytest.param(name, spec.name, spec.config_cls, {**base, "target_modules": ["lin0"]},
                                      {**base, "target_modules": second}, id=name))
    return cases


def _config_cases():
    # PEFT builds these configs from the class alone (config_cls(target_modules=...)): the method's example settings
    # are bound in, so that e.g. a method whose defaults need a larger layer still gets its registered settings
    return [pytest.param(functools.partial(spec.config_cls, **spec.example_kwargs), id=spec.name) for spec in METHODS]


CASES = {CASE_ARGS: _cases(), MULTI_ARGS: _multi_cases(), CONFIG_ARGS: _config_cases()}
FIRST_CASES = [next(c for c in CASES[CASE_ARGS] if c.values[2] is spec.config_cls) for spec in METHODS]


def _spec_of(params: dict):
    if "tuner_method" in params:
        return SPECS[params["tuner_method"]]
    if "test_name" in params:
        return SPECS[params["test_name"].split(" ", 1)[0]]
    config_cls = getattr(params["config_cls"], "func", params["config_cls"])
    return next(spec for spec in METHODS if spec.config_cls is config_cls)


CURRENT: dict = {}  # the running test: {"test": name, "params": its parameters}


def _merge_refusal(spec) -> str:
    if not spec.mergeable:
        return f"MethodSpec.mergeable=False: {spec.name} has no single ΔW to fold into the base weight"
    if CURRENT.get("params", {}).get("test_name") in CALL_INPUTS:
        return (f"MethodSpec.example_call: {spec.name}'s per-call inputs route tokens, which a merged ΔW cannot "
                "(PEFT's MLP takes X only once merged and unloaded)")
    return ""


def _skip_if_merging_not_supported(model_id, config_cls, config_kwargs):
    """PEFT's own merge-skip hook (its tests call it where they start merging), extended by the capabilities the
    method declares: mergeable=False, or a case whose per-call inputs a merged weight cannot honour."""
    _upstream_merge_skip(model_id, config_cls, config_kwargs)
    reason = _merge_refusal(_spec_of(CURRENT.get("params", {"config_cls": config_cls})))
    if reason:
        pytest.skip(reason)


_upstream_merge_skip = UP._skip_if_merging_not_supported
for _module in (UP, load_peft_test_module("testing_common")):
    _module._skip_if_merging_not_supported = _skip_if_merging_not_supported

# tests that need a capability from the first line: (name predicate, refusal of the method or "")
SKIP_RULES = [
    (lambda test: "merg" in test, _merge_refusal),
    (
        lambda test: test in ("test_disable_adapters", "test_disable_adapters_with_merging"),
        lambda spec: f"MethodSpec.identity_at_init=False: a fresh {spec.name} adapter changes the output, and these "
        "tests first assert that it does not" if not spec.identity_at_init else "",
    ),
    (
        lambda test: test == "test_only_params_are_updated",
        lambda spec: f"MethodSpec.sparse_routing=True: {spec.name}'s experts / router rows that no token of the "
        "batch selects get no gradient, so PEFT's 'every adapter weight moved' check does not apply"
        if spec.sparse_routing else "",
    ),
    (
        lambda test: test == "test_only_params_are_updated",
        lambda spec: f"MethodSpec.saturating_scales=True: {spec.name}'s clamped per-input scales pass no gradient "
        "where they saturate (PEFT's inputs arange(90) saturate them), so PEFT's 'every adapter weight moved' check "
        "does not apply" if spec.saturating_scales else "",
    ),
]


def _skip_by_capability(test: str, params: dict) -> None:
    spec = _spec_of(params)
    for needs, refusal in SKIP_RULES:
        reason = needs(test) and refusal(spec)
        if reason:
            pytest.skip(reason)


def _regenerate(func):
    """``func`` (a PEFT test method) with its case parametrisation replaced by the registry's; None when it is not
    parametrised over PEFT's case lists (a test written for one upstream method)."""
    marks = list(getattr(func, "pytestmark", []))
    case_marks = [m for m in marks if m.name == "parametrize" and m.args[0] in CASES]
    if not case_marks:
        return None
    argnames = case_marks[0].args[0]

    @functools.wraps(func)
    def test(self, *args, **kwargs):
        CURRENT.update(test=func.__name__, params=kwargs)
        try:
            _skip_by_capability(func.__name__, kwargs)
            return func(self, *args, **kwargs)
        finally:
            CURRENT.clear()

    cases = FIRST_CASES if func.__name__ in FIRST_CASE_ONLY else CASES[argnames]
    test.pytestmark = [m for m in marks if m not in case_marks] + [pytest.mark.parametrize(argnames, cases)]
    return test


class _Models:
    """PEFT's test models (its MockTransformerWrapper). In a case with per-call inputs the model's forward also takes
    them and ignores them, as a transformers model takes and passes on extra keyword arguments: PEFT's tests call the
    base model and the PeftModel with the same inputs, and only the tuner reads the routes."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        model = UP.MockTransformerWrapper.from_pretrained(model_id, dtype=dtype)
        names = CALL_INPUTS.get(CURRENT.get("params", {}).get("test_name"))
        if names:
            base_cls = type(model)

            def forward(self, *args, **kwargs):
                return base_cls.forward(self, *args, **{k: v for k, v in kwargs.items() if k not in names})

            model.__class__ = type(base_cls.__name__, (base_cls,), {"forward": forward})
        return model


def _generic(upstream_cls):
    """A subclass of PEFT's test class whose test methods run on the registry's cases."""
    namespace = {"__doc__": f"PEFT's {upstream_cls.__name__} on every registered peft-ext method."}
    for name, func in inspect.getmembers(upstream_cls, inspect.isfunction):
        if name.startswith("test"):
            namespace[name] = _regenerate(func)

    def prepare_inputs_for_testing(self):
        inputs = upstream_cls.prepare_inputs_for_testing(self)
        return {**inputs, **CALL_INPUTS.get(CURRENT.get("params", {}).get("test_name"), {})}

    namespace["prepare_inputs_for_testing"] = prepare_inputs_for_testing
    if hasattr(upstream_cls, "transformers_class"):
        namespace["transformers_class"] = _Models
    return type(upstream_cls.__name__, (upstream_cls,), namespace)


TestPeftCustomModel = _generic(UP.TestPeftCustomModel)
TestMultipleActiveAdapters = _generic(UP.TestMultipleActiveAdapters)


def _unsupported_layer_types():
    return [pytest.param(spec, layer_type, id=f"{spec.name}-{layer_type}") for spec in METHODS
            for layer_type in LAYER_TYPE_TARGETS if layer_type not in spec.layer_types]


@pytest.mark.parametrize("spec, layer_type", _unsupported_layer_types())
def test_undeclared_layer_types_are_refused(spec, layer_type):
    """A layer type the method does not declare (MethodSpec.layer_types) is refused at get_peft_model time with an
    error naming the method, the module and its type; nothing is left half-injected on the base model."""
    from peft import get_peft_model

    model_id, module = LAYER_TYPE_TARGETS[layer_type]
    base = UP.MockTransformerWrapper.from_pretrained(model_id)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = spec.config_cls(**{**spec.example_kwargs, "target_modules": [module]})
    kind = type(getattr(base, module)).__name__
    with pytest.raises(TypeError, match=rf"^{spec.name} \(.*\): {kind} is not supported \(target module '{module}'\)"):
        get_peft_model(base, config)
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_peft_tests_are_fetched_once_into_a_complete_cache(monkeypatch, tmp_path):
    """The cached copy is reused without a download, holds the generic suite, and a named folder that lacks it is a
    clear error; a failed download leaves no partial cache behind."""
    import peft
    import peft_upstream

    folder = peft_upstream.peft_tests_dir()
    assert all((folder / name).is_file() for name in peft_upstream.REQUIRED)
    assert folder.name == f"peft-{peft.__version__}-tests" and not (folder / "__init__.py").exists()

    def no_download(*args, **kwargs):
        raise AssertionError("the cache was complete; nothing should be downloaded")

    monkeypatch.setattr(peft_upstream.subprocess, "run", no_download)
    assert peft_upstream.peft_tests_dir() == folder
    monkeypatch.setenv("PEFT_EXT_PEFT_TESTS", str(tmp_path))
    with pytest.raises(RuntimeError, match="PEFT_EXT_PEFT_TESTS=.* lacks one of"):
        peft_upstream.peft_tests_dir()
    monkeypatch.delenv("PEFT_EXT_PEFT_TESTS")
    monkeypatch.setenv("PEFT_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(peft_upstream.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(RuntimeError, match="Could not fetch PEFT .*no network"):
        peft_upstream.peft_tests_dir()
    assert list((tmp_path / "cache").iterdir()) == []  # the staging folder is gone, no cache entry was made
