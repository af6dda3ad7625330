"""The O3 unlearning recipe (https://arxiv.org/abs/2407.10223, official code https://github.com/GCYZSL/O3-LLM-UNLEARNING):
the gate's score -> weight mapping against a hand-written reference of the official ``obtain_weights``, the gate at 0
giving the base model bit for bit, bad input, and the tiny recipe end to end with resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import peft_ext.recipe as recipe_module
from peft_ext.trainers import unlearning as U
from peft_ext.trainers.continual import toy_domain

ROOT = Path(__file__).resolve().parents[1]


def load_tiny(monkeypatch, out, name="tiny_o3_unlearning.yaml", overrides=()):
    """The tiny recipe through the full recipe validation."""
    return recipe_module.load_recipe(ROOT / "recipes" / name, [f"output_dir={out}", *overrides])


# ------------------------------------------------------------------------------------------------ mapping
def _phi(x, mean, std):
    return 0.5 * (1.0 + math.erf((x - mean) / (std * math.sqrt(2.0))))


def official_reference(x, mean1, mean2, std2, x0):
    """Hand transcription of the official arithmetic for one score (eval_o3.py): mixture CDF with equal weights and the
    held-out std for both components, cp from the point and its mirror about x0, logistic of 10·cp − 2, then the
    post-processing branches in the official order."""
    def cdf(v):
        return 0.5 * _phi(v, mean1, std2) + 0.5 * _phi(v, mean2, std2)

    a, b = cdf(x), cdf(2 * x0 - x)
    cp = (1 - max(a, b) + min(a, b)) * 10
    w = math.exp(cp - 2) / (1 + math.exp(cp - 2))
    if w > 0.9:
        return 1.2, w
    if 0.3 < w <= 0.4:
        return w, w
    return 0.0, w


def test_weight_mapping_equals_official_reference():
    rng = np.random.default_rng(0)
    train, test = rng.normal(-3.0, 0.7, 200), rng.normal(1.0, 1.3, 150)
    cal = U.fit_gate_calibration(train, test)
    # the official weighting_func_gmm: norm.fit = mean and maximum-likelihood std; both components use the test std
    assert cal.mean_train == pytest.approx(train.mean(), abs=1e-12)
    assert cal.mean_test == pytest.approx(test.mean(), abs=1e-12)
    assert cal.std == pytest.approx(np.sqrt(((test - test.mean()) ** 2).mean()), abs=1e-12)
    assert cal.x0 == pytest.approx((train.mean() + test.mean()) / 2, abs=1e-12)
    gmm = cal.as_gaussian_mixture()
    assert np.allclose(gmm.covariances_.ravel(), [cal.std ** 2] * 2) and np.allclose(gmm.weights_, [0.5, 0.5])
    xs = np.linspace(cal.x0 - 8, cal.x0 + 8, 4001)
    got, raw = U.obtain_weights(xs, cal), U.raw_weights(xs, cal)
    expected = [official_reference(x, cal.mean_train, cal.mean_test, cal.std, cal.x0) for x in xs]
    # scipy's normal CDF and math.erf agree to ~1e-15; scores whose raw weight sits within 1e-9 of a branch boundary
    # could fall on either side of it, so they are left out (none on this grid in practice)
    keep = np.array([min(abs(w - b) for b in (0.3, 0.4, 0.9)) > 1e-9 for _, w in expected])
    assert keep.sum() > 3990
    np.testing.assert_allclose(raw[keep], np.array([w for _, w in expected])[keep], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[keep], np.array([e for e, _ in expected])[keep], rtol=0, atol=1e-12)
    # every branch occurs, and the mapping is non-monotone: walking away from x0 the weight goes 1.2 -> 0 -> (0.3, 0.4]
    # -> 0 (the official quirk, reproduced on purpose)
    right = got[xs >= cal.x0]
    assert right[0] == 1.2 and right[-1] == 0.0
    band = np.flatnonzero((right > 0.3) & (right <= 0.4))
    assert band.size and (right[: band[0]] == 0.0).any()
    assert U.obtain_weights(np.array([cal.x0]), cal, mapping="raw")[0] == pytest.approx(1 / (1 + math.exp(-8)))


def test_randomised_labels_are_seeded_uniform_and_keep_texts():
    rows = [(f"t{i}", 1) for i in range(2000)]
    a, b = U.randomise_labels(rows, 2, seed=3), U.randomise_labels(rows, 2, seed=3)
    assert a == b and [t for t, _ in a] == [t for t, _ in rows]
    share = np.mean([y for _, y in a])
    assert 0.45 < share < 0.55  # uniform over both labels: 2000 draws, 4.5 standard deviations of slack


# ------------------------------------------------------------------------------------------------ gate
@pytest.fixture(scope="module")
def gated_model():
    from peft import get_peft_model
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peft_ext.data import minilm_path
    from peft_ext.tuners.o3_lora import O3LoraConfig

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=2, num_labels=2)).eval()
    feature_model = BertForSequenceClassification(base.config).eval()
    feature_model.load_state_dict(base.state_dict())
    model = get_peft_model(base, O3LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "classifier"],
                                              init_weights=False)).eval()
    return tok, model, feature_model


def test_gate_zero_gives_base_outputs_exactly(gated_model):
    from peft_ext.tuners.o3_lora import set_gate_scorer

    tok, model, feature_model = gated_model
    movies, tweets = toy_domain("movies", 64), toy_domain("tweets", 64)
    texts = [t for t, _ in movies["train"]]
    cut = int(0.8 * len(texts))
    detector = U.OODDetector().fit(U.features_of(feature_model, tok, texts[:cut], 16),
                                   U.features_of(feature_model, tok, texts[cut:], 16))
    gate = U.O3Gate(feature_model, [detector])
    batch = tok([t for t, _ in movies["test"]] + [t for t, _ in tweets["test"]], padding=True, return_tensors="pt")
    with torch.no_grad():
        w = gate.weights(batch)
        with model.disable_adapter():
            base = model(**batch).logits
        set_gate_scorer(model, gate)
        try:
            gated = model(**batch).logits
        finally:
            set_gate_scorer(model, None)
        on = model(**batch, ood_weight=1.0).logits
        explicit = model(**batch, ood_weight=w).logits
    off = w == 0
    assert off.any() and (~off).any(), w  # the toy domains give both kinds of rows
    assert torch.equal(gated[off], base[off])  # gate 0: the base model bit for bit
    assert not torch.allclose(on[off], base[off])  # the adapter does act on those rows when on
    # the scorer's weights are exactly the per-sample ood_weight of each row
    assert torch.equal(gated, explicit) and not torch.allclose(gated[~off], base[~off])
    # no detector: every gate is 0
    assert torch.equal(U.O3Gate(feature_model).weights(batch), torch.zeros(batch["input_ids"].shape[0]))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"forget": ["editorials"], "domains": ["movies", "tweets"]}, "UnlearningConfig.forget"),
        ({"epochs": 0}, "UnlearningConfig.epochs"),
        ({"ood_holdout": 1.0}, "UnlearningConfig.ood_holdout"),
        ({"weight_mapping": "smooth"}, "UnlearningConfig.weight_mapping"),
        ({"covariance": "diag"}, "UnlearningConfig.covariance"),
        ({"ood_features": "merged"}, "UnlearningConfig.ood_features"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as info:
        U.UnlearningConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_recipe_and_scores_name_the_problem(monkeypatch, tmp_path):
    with pytest.raises(recipe_module.RecipeError, match="o3_lora"):
        load_tiny(monkeypatch, tmp_path, overrides=["method.name=lora", "method.config={}"])
    with pytest.raises(recipe_module.RecipeError, match="trainer.args.domains: unknown domain"):
        load_tiny(monkeypatch, tmp_path, overrides=["trainer.args.forget=[films]",
                                                    "trainer.args.domains=[films, tweets]"])
    with pytest.raises(recipe_module.RecipeError, match="request_mode"):
        load_tiny(monkeypatch, tmp_path, overrides=["method.config.request_mode=new_adapter"])
    with pytest.raises(ValueError, match="standard deviation 0"):
        U.fit_gate_calibration([1.0, 2.0], [3.0, 3.0])
    with pytest.raises(ValueError, match="mapping must be one of"):
        U.obtain_weights([0.0], U.GateCalibration(0.0, 1.0, 1.0, 0.5), mapping="smooth")


# ------------------------------------------------------------------------------------------------ recipe
GATES = []  # the O3Gate of the uninterrupted run (recorded by the fixture)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        out = tmp_path_factory.mktemp("o3_full")
        recipe = load_tiny(mp, out)

        class RecordingGate(U.O3Gate):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                GATES.append(self)

        mp.setattr(U, "O3Gate", RecordingGate)
        return out, U.train_unlearning_recipe(recipe, quiet=True)
    finally:
        mp.undo()


def test_tiny_recipe_end_to_end(uninterrupted):
    out, metrics = uninterrupted
    saved = json.loads((out / "metrics.json").read_text())
    assert [r["forget"] for r in saved["requests"]] == ["movies", "tweets"]
    assert (out / "results.png").stat().st_size > 0
    for k in (1, 2):
        assert (out / f"request_{k}" / "adapter_model.safetensors").is_file()
    # request 2 resumed the same LoRA with request 1's A frozen as a snapshot: the orthogonality term is live
    config = json.loads((out / "request_2" / "adapter_config.json").read_text())
    assert config["snapshot_ranks"] == [4]
    assert saved["requests"][0]["orthogonality_loss"] is None and saved["requests"][1]["orthogonality_loss"] > 0
    for row in saved["requests"]:
        assert set(row["gated"]) == {"movies", "tweets", "products"}
        assert all(0.0 <= v <= 1.2 for v in row["mean_gate"].values())
    assert not list(out.glob(".*.tmp"))  # nothing half-written left behind


def test_resume_equals_uninterrupted(uninterrupted, monkeypatch, tmp_path):
    out_full, full = uninterrupted
    recipe = load_tiny(monkeypatch, tmp_path)
    real, calls = U.train_classifier, []

    def crash_on_request_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # base classifier, request 1, then a crash inside request 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(U, "train_classifier", crash_on_request_two)
    with pytest.raises(KeyboardInterrupt):
        U.train_unlearning_recipe(recipe, quiet=True)
    assert not (tmp_path / "request_2").exists()
    monkeypatch.setattr(U, "train_classifier", real)
    resumed = U.train_unlearning_recipe(recipe, resume=True, quiet=True)
    for key in ("base", "summary"):
        assert resumed[key] == full[key]
    for a, b in zip(resumed["requests"], full["requests"]):
        assert {k: a[k] for k in ("gated", "ungated", "mean_gate", "orthogonality_loss")} == \
            {k: b[k] for k in ("gated", "ungated", "mean_gate", "orthogonality_loss")}
    got = load_file(tmp_path / "request_2" / "adapter_model.safetensors")
    want = load_file(out_full / "request_2" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_detector_features_come_from_the_pretrained_encoder(uninterrupted, monkeypatch, tmp_path):
    """ood_features='pretrained' (default): the gate's encoder is the model as loaded, before the classifier stage
    merged its LoRA — a model separate from the one being unlearned — not the fine-tuned classifier."""
    from peft_ext.trainers.continual import seqcls_model

    out, _ = uninterrupted
    (gate,) = GATES
    _, fresh = seqcls_model(load_tiny(monkeypatch, tmp_path))
    got = {k: v for k, v in gate.feature_model.state_dict().items() if not k.startswith("classifier")}
    want = {k: v for k, v in fresh.state_dict().items() if not k.startswith("classifier")}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # ... and not the classifier: merging the classifier stage's LoRA changes the query weights it would have
    from peft import PeftModel

    merged = PeftModel.from_pretrained(fresh, out / "base_adapter").merge_and_unload().state_dict()
    query = [k for k in got if k.endswith("query.weight")]
    assert query and not all(torch.equal(got[k], merged[k]) for k in query)
