"""The O3 unlearning recipe: sequential unlearning requests on one orthogonal LoRA, and the out-of-distribution gate
that decides, per input, how much of the unlearning adapter to apply.

Paper: *Practical Unlearning for Large Language Models* (O3, https://arxiv.org/abs/2407.10223); official code
https://github.com/GCYZSL/O3-LLM-UNLEARNING (``train_unlearn_lora_o.py``, ``train_ood.py``, ``eval_o3.py``).

Training (per request, ``train_unlearning_recipe``): cross-entropy on the forget set with **randomised labels** (one
label drawn uniformly per example, once; no gradient ascent) plus ``orth_weight · o_loss`` against the A matrices of
the earlier requests — the ``o3_lora`` tuner adds that term to ``outputs.loss``. Requests follow the official
workflow: one LoRA trained continually, ``start_new_request`` freezing its A before each new request.

Gate (per request, ``OODDetector``): features of a detector encoder (mean-pooled hidden states of every layer; by
default the pre-trained encoder the classifier was fine-tuned from, ``ood_features="pretrained"``), per layer
the official score ``−½·Mahalanobis² − 1000·max cosine`` against the forget set (the embedding layer dropped), a
one-class SVM over those layer scores (``nu=0.1``, linear kernel), and the official score → weight mapping
(``obtain_weights``): a two-component Gaussian mixture placed on the training-in and held-out-in scores gives
``cp = 1 − |CDF(x) − CDF(2·x₀ − x)|``, ``w = sigmoid(10·cp − 2)``, then the **non-monotone** post-processing
``1.2 if w > 0.9``, ``w if 0.3 < w ≤ 0.4``, ``0 otherwise``. At inference the gate of an input is the largest weight
over the requests' detectors and becomes its ``ood_weight`` (``O3Gate``, installed with ``set_gate_scorer``).

Quirks of the official code, reproduced (and flagged): the mixture is not fitted by EM — its means are the means of
the two score sets, **both** variances are the held-out scores' variance and the weights are 0.5; the mapping is
non-monotone (weights between 0.4 and 0.9 become 0, values in (0.3, 0.4] are kept, confident ones become 1.2 > 1).
Deviations: features are masked means over real tokens (the official code pads to 512 tokens and averages the padding
too); the pre-trained encoder (a model separate from the one being unlearned, as the official RoBERTa detector is)
stands in for the contrastively fine-tuned RoBERTa — the fine-tuned classifier's own features
(``ood_features="classifier"``) are shaped by the sentiment task and barely separate the domains (on the VADER
snippets the official detector on them scores held-out forget inputs and other domains alike); the calibration scores
are a held-out part of the forget *training* set (the official code uses the forget test set); the mapping is computed
per input (the official ``gmm_cdf`` sums over the batch, so it is only right at batch size 1, which its evaluation
uses).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .continual import (
    DATA_NAMES,
    _save_adapter,
    accuracy,
    adapter_kwargs,
    batches,
    check_domains,
    load_domains,
    load_progress,
    save_progress,
    seqcls_model,
    train_classifier,
)

PAPER = "https://arxiv.org/abs/2407.10223"
CODE = "https://github.com/GCYZSL/O3-LLM-UNLEARNING"
MAPPINGS = ("official", "raw")
COVARIANCES = ("empirical", "ledoit_wolf")
OOD_FEATURES = ("pretrained", "classifier")


# ---------------------------------------------------------------------------------------------------------- mapping
@dataclass
class GateCalibration:
    """The official two-component Gaussian mixture over OOD scores (``weighting_func_gmm``): means at the mean of the
    training-in scores and of the held-out-in scores, both with the held-out scores' standard deviation (a quirk: the
    training scores' spread is ignored), equal weights; ``x0`` = the midpoint of the two means."""

    mean_train: float
    mean_test: float
    std: float
    x0: float

    def as_gaussian_mixture(self):
        """The same mixture as a scikit-learn ``GaussianMixture`` with its parameters set by hand (as the official code
        does; it is never fitted)."""
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(n_components=2)
        gmm.means_ = np.array([[self.mean_train], [self.mean_test]])
        gmm.covariances_ = np.array([[[self.std ** 2]], [[self.std ** 2]]])
        gmm.weights_ = np.array([0.5, 0.5])
        gmm.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(gmm.covariances_))
        return gmm


def fit_gate_calibration(train_scores, test_scores) -> GateCalibration:
    """``GateCalibration`` from the detector's scores on the forget training set and on held-out forget examples
    (maximum-likelihood mean and standard deviation, as ``scipy.stats.norm.fit``)."""
    train = np.asarray(train_scores, dtype=np.float64).ravel()
    test = np.asarray(test_scores, dtype=np.float64).ravel()
    if train.size < 1 or test.size < 2:
        raise ValueError(f"fit_gate_calibration needs >= 1 training score and >= 2 held-out scores; got {train.size} "
                         f"and {test.size}.")
    if not (np.isfinite(train).all() and np.isfinite(test).all()):
        raise ValueError("fit_gate_calibration: scores must be finite.")
    std = float(test.std())
    if not std > 0:
        raise ValueError("fit_gate_calibration: the held-out scores are all equal (standard deviation 0); the mixture "
                         "needs a spread. Use more or more varied held-out examples (ood_holdout).")
    mean_train, mean_test = float(train.mean()), float(test.mean())
    return GateCalibration(mean_train, mean_test, std, (mean_train + mean_test) / 2)


def mixture_cdf(x, cal: GateCalibration) -> np.ndarray:
    """CDF of the calibration mixture at ``x`` (element-wise)."""
    from scipy.stats import norm

    x = np.asarray(x, dtype=np.float64)
    return 0.5 * norm.cdf(x, cal.mean_train, cal.std) + 0.5 * norm.cdf(x, cal.mean_test, cal.std)


def raw_weights(x, cal: GateCalibration) -> np.ndarray:
    """The official weight before post-processing: ``sigmoid(10·cp − 2)`` with ``cp = 1 − |CDF(x) − CDF(2·x₀ − x)|``
    (in [sigmoid(−2), sigmoid(8)] ≈ [0.119, 0.99966])."""
    x = np.asarray(x, dtype=np.float64)
    cp = 1.0 - np.abs(mixture_cdf(x, cal) - mixture_cdf(2.0 * cal.x0 - x, cal))
    return 1.0 / (1.0 + np.exp(-(10.0 * cp - 2.0)))


def postprocess_weights(w) -> np.ndarray:
    """The official post-processing of ``eval_o3.py`` (``obtain_weights``), non-monotone as in the official code:
    ``1.2`` where ``w > 0.9``, ``w`` where ``0.3 < w <= 0.4``, ``0`` elsewhere (0.35 stays, 0.6 becomes 0)."""
    w = np.asarray(w, dtype=np.float64)
    return np.where(w > 0.9, 1.2, np.where((w > 0.3) & (w <= 0.4), w, 0.0))


def obtain_weights(x, cal: GateCalibration, mapping: str = "official") -> np.ndarray:
    """Gate weights ``ood_weight`` of OOD scores ``x`` (element-wise): ``mapping="official"`` reproduces the official
    ``obtain_weights`` (raw weight, then ``postprocess_weights``); ``"raw"`` returns the smooth sigmoid weight."""
    if mapping not in MAPPINGS:
        raise ValueError(f"obtain_weights: mapping must be one of {list(MAPPINGS)}; got {mapping!r}.")
    w = raw_weights(x, cal)
    return postprocess_weights(w) if mapping == "official" else w


# ---------------------------------------------------------------------------------------------------------- detector
@torch.no_grad()
def hidden_features(feature_model, batch: dict) -> list[np.ndarray]:
    """Per layer (embeddings first) the mean of the hidden states over the real tokens of each input: a list of
    ``[batch, hidden]`` float64 arrays."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    out = feature_model(**inputs, output_hidden_states=True)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(inputs["input_ids"].shape, dtype=torch.long)
    m = mask.unsqueeze(-1).to(out.hidden_states[0].dtype)
    return [((h * m).sum(1) / m.sum(1).clamp(min=1)).double().cpu().numpy() for h in out.hidden_states]


def features_of(feature_model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> list[np.ndarray]:
    """``hidden_features`` of ``texts``, batched and concatenated per layer."""
    parts = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        batch = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        parts.append(hidden_features(feature_model, batch))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


class OODDetector:
    """One request's detector: per layer (the embedding layer dropped, as the official ``[:, 1:]``) the score
    ``−½·(f − μ)ᵀΣ⁻¹(f − μ) − cosine_weight · max_j cos(f, f_j)`` against the forget training features ``f_j``, a
    one-class SVM over the layer scores (official: ``nu=0.1``, linear kernel; ``score_samples``), and the
    ``GateCalibration`` of its training and held-out scores."""

    def __init__(self, nu: float = 0.1, kernel: str = "linear", cosine_weight: float = 1000.0,
                 covariance: str = "empirical", mapping: str = "official"):
        if covariance not in COVARIANCES:
            raise ValueError(f"OODDetector: covariance must be one of {list(COVARIANCES)}; got {covariance!r}.")
        if mapping not in MAPPINGS:
            raise ValueError(f"OODDetector: mapping must be one of {list(MAPPINGS)}; got {mapping!r}.")
        self.nu, self.kernel, self.cosine_weight = nu, kernel, cosine_weight
        self.covariance, self.mapping = covariance, mapping
        self.means: list[np.ndarray] = []
        self.precisions: list[np.ndarray] = []
        self.normalized: list[np.ndarray] = []
        self.svm = None
        self.calibration: Optional[GateCalibration] = None

    def layer_scores(self, feats: list[np.ndarray]) -> np.ndarray:
        """``[n, layers − 1]`` per-layer scores of features ``feats`` (one array per layer, embeddings first)."""
        if len(feats) != len(self.means) + 1:
            raise ValueError(f"OODDetector: expected features of {len(self.means) + 1} layers; got {len(feats)}.")
        columns = []
        for f, mean, precision, train in zip(feats[1:], self.means, self.precisions, self.normalized):
            centred = f - mean
            gaussian = -0.5 * np.einsum("nd,de,ne->n", centred, precision, centred)
            unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            columns.append(gaussian - self.cosine_weight * (unit @ train.T).max(axis=1))
        return np.stack(columns, axis=1)

    def fit(self, train_feats: list[np.ndarray], heldout_feats: list[np.ndarray]) -> "OODDetector":
        """Fit on the forget training features and calibrate the mapping on held-out forget features."""
        from sklearn.covariance import EmpiricalCovariance, LedoitWolf
        from sklearn.svm import OneClassSVM

        self.means, self.precisions, self.normalized = [], [], []
        for f in train_feats[1:]:
            estimator = (EmpiricalCovariance if self.covariance == "empirical" else LedoitWolf)(assume_centered=False)
            estimator.fit(f - f.mean(axis=0))
            self.means.append(f.mean(axis=0))
            self.precisions.append(estimator.precision_)
            self.normalized.append(f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12))
        train_layer = self.layer_scores(train_feats)
        self.svm = OneClassSVM(nu=self.nu, kernel=self.kernel).fit(train_layer)
        train_scores = self.svm.score_samples(train_layer)
        held_scores = self.svm.score_samples(self.layer_scores(heldout_feats))
        self.calibration = fit_gate_calibration(train_scores, held_scores)
        return self

    def scores(self, feats: list[np.ndarray]) -> np.ndarray:
        """One-class SVM scores of features ``feats``."""
        if self.svm is None:
            raise RuntimeError("OODDetector: call fit() first.")
        return self.svm.score_samples(self.layer_scores(feats))

    def weights(self, feats: list[np.ndarray]) -> np.ndarray:
        """The gate weight of each input (``obtain_weights`` of its score)."""
        return obtain_weights(self.scores(feats), self.calibration, self.mapping)

    def summary(self) -> dict:
        return {"nu": self.nu, "kernel": self.kernel, "covariance": self.covariance, "mapping": self.mapping,
                "calibration": asdict(self.calibration) if self.calibration else None}


class O3Gate:
    """The inference gate: ``ood_weight`` of each input = the largest weight over the requests' detectors (0 with no
    detector), computed from a frozen copy of the base model. Install with ``set_gate_scorer(model, gate)``: an
    eval-mode call without ``ood_weight`` is then gated per input."""

    def __init__(self, feature_model, detectors: Optional[list[OODDetector]] = None):
        self.feature_model = feature_model.eval()
        self.detectors = list(detectors or [])

    def weights(self, batch: dict) -> torch.Tensor:
        """``[batch]`` gate weights for a tokenized batch."""
        n = batch["input_ids"].shape[0]
        if not self.detectors:
            return torch.zeros(n)
        feats = hidden_features(self.feature_model, batch)
        w = np.max(np.stack([d.weights(feats) for d in self.detectors]), axis=0)
        return torch.as_tensor(w, dtype=torch.float32)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return self.weights(batch)


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class UnlearningConfig:
    """Settings of the O3 unlearning recipe (https://arxiv.org/abs/2407.10223): the domains the classifier learns, the
    unlearning requests, their training and the OOD gate."""

    domains: list = field(
        default_factory=lambda: ["movies", "tweets", "products", "editorials"],
        metadata={"help": "Domains the classifier is first trained on (VADER domains for data.name movie_reviews; the "
                  "synthetic toy domains for toy_sentiment)."},
    )
    forget: list = field(
        default_factory=lambda: ["movies", "tweets", "products"],
        metadata={"help": "Unlearning requests, in order: each forgets one of `domains` (the others are kept)."},
    )
    max_examples: Optional[int] = field(
        default=1000, metadata={"help": "Examples per domain before the train/test split (seeded subset); null = all."}
    )
    neutral_margin: float = field(
        default=0.5, metadata={"help": "VADER domains: drop snippets with |rating| <= this (near-neutral ones)."}
    )
    base_epochs: int = field(
        default=2, metadata={"help": "Epochs of the stage that trains the classifier on every domain (a LoRA on "
                             "query/value plus the head, merged into the base before unlearning)."}
    )
    base_learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of that stage."})
    base_rank: int = field(default=8, metadata={"help": "LoRA rank of that stage."})
    epochs: int = field(default=3, metadata={"help": "Epochs per unlearning request (the paper: 15 on ScienceQA)."})
    batch_size: int = field(default=16, metadata={"help": "Examples per optimizer step (both stages)."})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate of the unlearning requests (paper: 3e-4 at batch 128)."}
    )
    ood_holdout: float = field(
        default=0.2,
        metadata={"help": "Fraction of each forget training set kept out of the detector fit; its scores are the "
                  "held-out-in scores that calibrate the mixture (official: the forget test set)."},
    )
    ood_nu: float = field(default=0.1, metadata={"help": "One-class SVM nu (official 0.1)."})
    ood_kernel: str = field(default="linear", metadata={"help": "One-class SVM kernel (official 'linear')."})
    cosine_weight: float = field(
        default=1000.0, metadata={"help": "Weight of the max-cosine term of the layer score (official 1000)."}
    )
    covariance: str = field(
        default="empirical",
        metadata={"help": "Covariance estimator of the Mahalanobis term: 'empirical' (official) or 'ledoit_wolf' "
                  "(shrunk; better conditioned when examples are few against the hidden size)."},
    )
    weight_mapping: str = field(
        default="official",
        metadata={"help": "'official': obtain_weights with its non-monotone post-processing (1.2 / kept in (0.3, 0.4] "
                  "/ 0); 'raw': the smooth sigmoid(10·cp − 2) weight."},
    )
    ood_features: str = field(
        default="pretrained",
        metadata={"help": "Which model gives the detectors' features: 'pretrained' = the pre-trained encoder before "
                  "the classifier stage (a model separate from the one being unlearned, like the official RoBERTa "
                  "detector); 'classifier' = the fine-tuned classifier itself (its sentiment-shaped features separate "
                  "domains poorly)."},
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of evaluation and feature extraction."})

    def __post_init__(self):
        for name in ("base_epochs", "base_rank", "epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UnlearningConfig.{name} must be an integer >= 1; got {value!r}.")
        if self.max_examples is not None and (
            isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 8
        ):
            raise ValueError(
                f"UnlearningConfig.max_examples must be null or an integer >= 8; got {self.max_examples!r}.")
        for name, low, high in (("base_learning_rate", 0, None), ("learning_rate", 0, None), ("ood_nu", 0, 1),
                                ("ood_holdout", 0, 1), ("cosine_weight", None, None), ("neutral_margin", None, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (low is not None and not value > low) or (high is not None and not value < high) \
                    or (low is None and value < 0):
                what = f"in ({low}, {high})" if high is not None else ("> 0" if low is not None else ">= 0")
                raise ValueError(f"UnlearningConfig.{name} must be a finite number {what}; got {value!r}.")
        if self.covariance not in COVARIANCES:
            raise ValueError(
                f"UnlearningConfig.covariance must be one of {list(COVARIANCES)}; got {self.covariance!r}.")
        if self.weight_mapping not in MAPPINGS:
            raise ValueError(f"UnlearningConfig.weight_mapping must be one of {list(MAPPINGS)}; got "
                             f"{self.weight_mapping!r}.")
        if self.ood_features not in OOD_FEATURES:
            raise ValueError(f"UnlearningConfig.ood_features must be one of {list(OOD_FEATURES)}; got "
                             f"{self.ood_features!r}.")
        if self.ood_kernel not in ("linear", "rbf", "poly", "sigmoid"):
            raise ValueError(f"UnlearningConfig.ood_kernel must be one of ['linear', 'rbf', 'poly', 'sigmoid']; got "
                             f"{self.ood_kernel!r}.")
        for name in ("domains", "forget"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"UnlearningConfig.{name} must be a non-empty list of domains; got {value!r}.")
            setattr(self, name, list(value))
        outside = [d for d in self.forget if d not in self.domains]
        if outside:
            raise ValueError(f"UnlearningConfig.forget names {outside}, which are not in domains {self.domains}.")


def unlearning_config_from_recipe(recipe) -> UnlearningConfig:
    """``UnlearningConfig`` from ``trainer.args`` (unknown keys: a ValueError naming them and the allowed ones)."""
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, UnlearningConfig)


def check_recipe(recipe) -> None:
    """What ``trainer: unlearning`` needs besides its ``trainer.args``: an ``o3_lora`` adapter (request_mode 'resume',
    the official workflow) on a seq-cls model, sentiment domains (``movie_reviews`` = VADER, ``toy_sentiment``)."""
    if recipe.method.name != "o3_lora":
        raise ValueError(f"trainer 'unlearning' needs method.name 'o3_lora'; got {recipe.method.name!r}.")
    if recipe.model.task != "seq_cls" or recipe.data.name not in DATA_NAMES:
        raise ValueError(f"trainer 'unlearning' needs model.task 'seq_cls' and data.name one of {list(DATA_NAMES)}; "
                         f"got {recipe.model.task!r} with {recipe.data.name!r}.")
    mode = recipe.method.config.get("request_mode", "resume")
    if mode != "resume":
        raise ValueError(f"trainer 'unlearning' supports method.config.request_mode 'resume' (the official workflow: "
                         f"one LoRA trained request after request); got {mode!r}.")
    config = unlearning_config_from_recipe(recipe)
    check_domains("trainer.args.domains", config.domains, recipe.data.name)
    check_domains("trainer.args.forget", config.forget, recipe.data.name)


# ---------------------------------------------------------------------------------------------------------- recipe
def randomise_labels(rows, num_labels: int, seed: int) -> list:
    """The official forget data: every example gets a label drawn uniformly from all classes (it may equal the true
    one), once, from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [(text, int(label)) for (text, _), label in zip(rows, rng.integers(0, num_labels, size=len(rows)))]


def _base_classifier(recipe, config: UnlearningConfig, tokenizer, base, data: dict, out: Path, resume: bool,
                     quiet: bool):
    """Stage 0: a LoRA (query/value) plus the head trained on every domain, merged into the base."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from .._io import adapter_folder_is_whole

    folder = out / "base_adapter"
    if resume and adapter_folder_is_whole(folder):
        return PeftModel.from_pretrained(base, folder).merge_and_unload().eval()
    rows = [r for d in config.domains for r in data[d]["train"]]
    torch.manual_seed(recipe.seed)
    model = get_peft_model(base, LoraConfig(r=config.base_rank, lora_alpha=2 * config.base_rank,
                                            target_modules=["query", "value"], modules_to_save=["classifier"]))
    train_classifier(model, tokenizer, rows, epochs=config.base_epochs, batch_size=config.batch_size,
                     learning_rate=config.base_learning_rate, max_length=recipe.data.max_length, seed=recipe.seed,
                     progress=None if quiet else "base classifier (all domains)")
    _save_adapter(model, folder)
    return model.merge_and_unload().eval()


def _fit_detector(config: UnlearningConfig, feature_model, tokenizer, rows, max_length: int, seed: int) -> OODDetector:
    texts = [t for t, _ in rows]
    order = np.random.default_rng(seed).permutation(len(texts))
    n_held = max(2, int(round(config.ood_holdout * len(texts))))
    if len(texts) - n_held < 2:
        raise ValueError(f"UnlearningConfig.ood_holdout: {len(texts)} forget examples leave fewer than 2 to fit the "
                         "detector; use more examples or a smaller ood_holdout.")
    held = [texts[i] for i in order[:n_held]]
    fit = [texts[i] for i in order[n_held:]]
    detector = OODDetector(config.ood_nu, config.ood_kernel, config.cosine_weight, config.covariance,
                           config.weight_mapping)
    return detector.fit(features_of(feature_model, tokenizer, fit, max_length, config.eval_batch_size),
                        features_of(feature_model, tokenizer, held, max_length, config.eval_batch_size))


def _mean_gate(gate: O3Gate, tokenizer, rows, max_length: int, batch_size: int) -> float:
    values = [gate.weights(tokenizer([t for t, _ in chunk], truncation=True, max_length=max_length, padding=True,
                                     return_tensors="pt")) for chunk in batches(rows, batch_size)]
    return float(torch.cat(values).mean()) if values else 0.0


def _plot(rows: list[dict], domains: list[str], base_row: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .._io import atomic_savefig

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = list(range(len(rows) + 1))
    labels = ["base"] + [f"-{r['forget']}" for r in rows]
    for k, domain in enumerate(domains):
        color = f"C{k}"
        ax.plot(x, [base_row[domain]] + [r["gated"][domain] for r in rows], color=color, marker="o", label=domain)
        ax.plot(x, [base_row[domain]] + [r["ungated"][domain] for r in rows], color=color, linestyle="--")
    ax.set_xticks(x, labels)
    ax.set_ylabel("test accuracy")
    ax.set_title("O3 unlearning: solid = with the OOD gate, dashed = adapter always on", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def train_unlearning_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for O3 unlearning (https://arxiv.org/abs/2407.10223), ``trainer: {name: unlearning, args:
    {...UnlearningConfig...}}``: trains the classifier on every domain (``base_adapter/``, merged), then one request per
    ``forget`` domain — randomised-label CE plus the orthogonality loss on one ``o3_lora`` adapter
    (``request_<k>/``), and that request's OOD detector; after each request, test accuracy on every domain with the
    gate (``O3Gate``) and with the adapter always on (``ood_weight=1``). Writes ``metrics.json`` and ``results.png``
    atomically; ``resume`` continues after the last saved request (detectors are refitted: they are deterministic)."""
    from peft import PeftModel, get_peft_model

    from .._io import atomic_write_json
    from ..recipe import to_dict
    from ..runner.reporting import device_name
    from ..tuners.o3_lora import O3LoraConfig, set_gate_scorer, start_new_request

    check_recipe(recipe)
    config = unlearning_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    max_length = recipe.data.max_length
    tokenizer, base = seqcls_model(recipe)
    # the detectors' encoder: a copy taken before the classifier stage injects and merges its LoRA (ood_features)
    pretrained = copy.deepcopy(base) if config.ood_features == "pretrained" else None
    data = load_domains(recipe, config.domains, config.max_examples, config.neutral_margin)
    base = _base_classifier(recipe, config, tokenizer, base, data, out, resume, quiet)
    feature_model = (pretrained if pretrained is not None else copy.deepcopy(base)).eval()
    for p in feature_model.parameters():
        p.requires_grad_(False)

    def evaluate(model, **kw):
        return {d: accuracy(model, tokenizer, data[d]["test"], max_length, config.eval_batch_size, **kw)
                for d in config.domains}

    progress = load_progress(out) if resume else {}
    rows = progress.get("requests", [])
    base_row = progress.get("base") or evaluate(base)
    if not quiet:
        print("base classifier: " + ", ".join(f"{d} {a:.3f}" for d, a in base_row.items()), flush=True)
    start = len(rows)
    if start:
        model = PeftModel.from_pretrained(base, out / f"request_{start}", is_trainable=True)
    else:
        torch.manual_seed(recipe.seed)
        model = get_peft_model(base, O3LoraConfig(**adapter_kwargs(recipe)))
    gate = O3Gate(feature_model)
    for k in range(start):  # refit the finished requests' detectors (deterministic)
        gate.detectors.append(_fit_detector(config, feature_model, tokenizer, data[config.forget[k]]["train"],
                                            max_length, recipe.seed * 100 + k))
    n_requests = len(config.forget)
    for k in range(start, n_requests):
        domain = config.forget[k]
        t0 = time.time()
        if k > 0:
            start_new_request(model)  # freeze this LoRA's A: later requests stay orthogonal to it
        forget_rows = randomise_labels(data[domain]["train"], recipe.model.num_labels, recipe.seed * 100 + k)
        history = train_classifier(model, tokenizer, forget_rows, epochs=config.epochs, batch_size=config.batch_size,
                                   learning_rate=config.learning_rate, max_length=max_length,
                                   seed=recipe.seed * 100 + k,
                                   progress=None if quiet else f"request {k + 1}/{n_requests} (forget {domain})")
        orth = model.base_model.orthogonality_loss()
        _save_adapter(model, out / f"request_{k + 1}")
        gate.detectors.append(_fit_detector(config, feature_model, tokenizer, data[domain]["train"], max_length,
                                            recipe.seed * 100 + k))
        set_gate_scorer(model, gate)
        gated = evaluate(model)
        set_gate_scorer(model, None)
        row = {
            "forget": domain,
            "gated": gated,
            "ungated": evaluate(model, ood_weight=1.0),
            "mean_gate": {d: _mean_gate(gate, tokenizer, data[d]["test"], max_length, config.eval_batch_size)
                          for d in config.domains},
            "orthogonality_loss": None if orth is None else float(orth.detach()),
            "detector": gate.detectors[-1].summary(),
            "history": history,
            "time_s": time.time() - t0,
        }
        rows.append(row)
        save_progress(out, {"base": base_row, "requests": rows})
        if not quiet:
            print(f"after forgetting {domain}: gated " + ", ".join(f"{d} {a:.3f}" for d, a in gated.items())
                  + " | ungated " + ", ".join(f"{d} {a:.3f}" for d, a in row["ungated"].items()), flush=True)
    set_gate_scorer(model, gate)  # the returned state: every request's detector installed
    forgotten = set(config.forget)
    final = rows[-1] if rows else None
    summary = None
    if final:
        kept = [d for d in config.domains if d not in forgotten]
        summary = {
            "forgotten_gated": float(np.mean([final["gated"][d] for d in config.forget])),
            "forgotten_ungated": float(np.mean([final["ungated"][d] for d in config.forget])),
            "kept_base": float(np.mean([base_row[d] for d in kept])) if kept else None,
            "kept_gated": float(np.mean([final["gated"][d] for d in kept])) if kept else None,
            "kept_ungated": float(np.mean([final["ungated"][d] for d in kept])) if kept else None,
        }
    chance = {d: max(np.mean([y for _, y in data[d]["test"]]), 1 - np.mean([y for _, y in data[d]["test"]]))
              for d in config.domains}
    metrics = {
        "name": recipe.name,
        "trainer": "unlearning",
        "method": recipe.method.name,
        "seed": recipe.seed,
        "paper": PAPER,
        "official_code": CODE,
        "unlearning": asdict(config),
        "domain_sizes": {d: {"train": len(data[d]["train"]), "test": len(data[d]["test"])} for d in config.domains},
        "majority_class_rate": {d: float(v) for d, v in chance.items()},
        "base": base_row,
        "requests": rows,
        "summary": summary,
        "budget": {"wall_time_s": time.time() - began, "epochs_per_request": config.epochs,
                   "base_epochs": config.base_epochs, "batch_size": config.batch_size},
        "device": device_name(),
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot and rows:
        _plot(rows, config.domains, base_row, out / "results.png")
    if not quiet and summary:
        print(f"unlearning — forgotten domains: gated {summary['forgotten_gated']:.3f}, ungated "
              f"{summary['forgotten_ungated']:.3f}; kept domains: base {summary['kept_base']}, gated "
              f"{summary['kept_gated']}, ungated {summary['kept_ungated']}")
        print(f"adapter: {out / f'request_{len(rows)}'}  metrics: {out / 'metrics.json'}")
    return metrics
