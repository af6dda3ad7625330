"""Sentiment snippets from the VADER paper (movie reviews, tweets, product reviews, NYT editorials), loaded offline
from a PyPI source archive.

Source: C.J. Hutto and E. Gilbert, *VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media
Text*, Eighth International AAAI Conference on Weblogs and Social Media (ICWSM-14), Ann Arbor, MI, June 2014.

The paper's data set ships inside the *source* distribution of ``vaderSentiment==3.3.2`` (not inside its wheel), as
``additional_resources/hutto_ICWSM_2014.tar.gz``. That inner archive holds
``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``: 10,605 sentence-level snippets of rottentomatoes.com
reviews (derived from the 2,000 reviews of Pang & Lee, 2004), tab separated as ``ID<TAB>MEAN-RATING<TAB>TEXT``,
where the mean rating of at least 20 human raters lies in -4 (extremely negative) .. +4 (extremely positive). The
same archive holds three more domains in the same layout (``VADER_DOMAINS``): 4,200 tweets, 3,708 amazon.com
product-review snippets and 5,190 New York Times editorial snippets; ``load_vader_domain`` loads any of the four.

``ensure_vader_archive`` downloads the sdist once with ``pip download`` (PyPI is enough; the Hugging Face Hub is never
contacted). ``load_movie_reviews`` reads the snippets straight from the two nested tar files, caches the parsed rows
as JSON next to the archive, and returns a seeded train / test ``datasets.DatasetDict``.
"""

from __future__ import annotations

from .._io import atomic_write_json

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Union

VADER_VERSION = "3.3.2"
VADER_REQUIREMENT = f"vaderSentiment=={VADER_VERSION}"
ARCHIVE_NAME = f"vaderSentiment-{VADER_VERSION}.tar.gz"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
ROWS_FILE = f"vader_{VADER_VERSION}_movie_reviews.json"
NUM_SNIPPETS = 10605
# The four snippet domains of the paper's ground truth: name -> (file in the inner archive, number of snippets, what).
VADER_DOMAINS = {
    "movies": ("movieReviewSnippets_GroundTruth.txt", 10605, "rottentomatoes.com movie-review snippets"),
    "tweets": ("tweets_GroundTruth.txt", 4200, "tweets"),
    "products": ("amazonReviewSnippets_GroundTruth.txt", 3708, "amazon.com product-review snippets"),
    "editorials": ("nytEditorialSnippets_GroundTruth.txt", 5190, "New York Times opinion-editorial snippets"),
}
LABEL_NAMES = ("negative", "positive")

CITATION = (
    "Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social "
    "Media Text. Eighth International Conference on Weblogs and Social Media (ICWSM-14). Ann Arbor, MI, June 2014."
)
DESCRIPTION = (
    "Movie-review snippets (rottentomatoes.com, via Pang & Lee 2004) with mean human sentiment ratings in -4..+4, "
    f"from the data set of the VADER paper (Hutto & Gilbert, ICWSM 2014), shipped in the {VADER_REQUIREMENT} sdist. "
    "label = 1 (positive) if rating > 0 else 0 (negative)."
)

_ROWS_SCHEMA = 1  # bump when the cached JSON layout changes


def default_cache_dir() -> Path:
    """The peft-ext cache folder: ``$PEFT_EXT_CACHE`` if set, else ``~/.cache/peft-ext``."""
    env = os.environ.get("PEFT_EXT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft-ext"


def _cache_dir(cache_dir: Optional[Union[str, os.PathLike]]) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pip_command(dest: Union[str, os.PathLike]) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
        VADER_REQUIREMENT, "-d", str(dest),
    ]


def _read_inner_archive(sdist: Path) -> bytes:
    """The bytes of ``hutto_ICWSM_2014.tar.gz`` inside the sdist; a ValueError if the sdist does not hold it."""
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            for member in outer.getmembers():
                if member.isfile() and member.name.endswith("/" + INNER_ARCHIVE):
                    handle = outer.extractfile(member)
                    if handle is not None:
                        return handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{sdist} is not a readable tar.gz archive ({exc}).") from exc
    raise ValueError(f"{sdist} does not contain {INNER_ARCHIVE}; is it the {VADER_REQUIREMENT} source archive?")


def ensure_vader_archive(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Return the path of the ``vaderSentiment==3.3.2`` source archive, downloading it once if needed.

    The archive (from PyPI, via ``sys.executable -m pip download --no-binary :all: --no-deps``) carries the data set of
    Hutto & Gilbert, *VADER* (ICWSM 2014). It is kept in ``cache_dir`` (default: ``$PEFT_EXT_CACHE`` or
    ``~/.cache/peft-ext``) as ``vaderSentiment-3.3.2.tar.gz``. The download goes to a temporary folder inside the cache
    folder, is checked to contain the data set, and is then moved into place with ``os.replace``, so an interrupted
    download never leaves a partial archive behind. Offline, copy the sdist into the cache folder under that name.

    Raises:
        RuntimeError: ``pip download`` failed or did not produce a usable archive; the message names the command.
    """
    folder = _cache_dir(cache_dir)
    target = folder / ARCHIVE_NAME
    if target.is_file():
        try:
            _read_inner_archive(target)
            return target
        except ValueError:
            pass  # a damaged or foreign file: download again and replace it
    manual = " ".join(_pip_command(folder)).replace(":all:", "':all:'")
    tmp = Path(tempfile.mkdtemp(prefix=".vader-download-", dir=folder))
    try:
        try:
            proc = subprocess.run(_pip_command(tmp), capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(
                f"Could not download the {VADER_REQUIREMENT} source archive ({exc!r}). Run `{manual}` by hand (or copy "
                f"{ARCHIVE_NAME} into {folder}) and try again."
            ) from exc
        found = sorted(p for p in tmp.iterdir() if p.name.lower().endswith(".tar.gz"))
        if proc.returncode != 0 or not found:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(
                f"`pip download` of the {VADER_REQUIREMENT} source archive failed (exit code {proc.returncode}). "
                f"It needs PyPI (or a mirror) to be reachable. Run `{manual}` by hand (or copy {ARCHIVE_NAME} into "
                f"{folder}) and try again. pip said:\n{tail}"
            )
        try:
            _read_inner_archive(found[0])
        except ValueError as exc:
            raise RuntimeError(f"pip downloaded {found[0].name}, but it is not usable: {exc}") from exc
        os.replace(found[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_domain(domain: str) -> tuple:
    if domain not in VADER_DOMAINS:
        raise ValueError(f"VADER domain must be one of {sorted(VADER_DOMAINS)}; got {domain!r}.")
    return VADER_DOMAINS[domain]


def _source_id(value: str):
    """Movie and tweet ids are integers; product and editorial ids are ``review_sentence`` strings such as ``3_12``."""
    return int(value) if value.isdigit() else value


def _id_order(row: dict) -> tuple:
    return tuple(int(part) for part in str(row["id"]).split("_"))


def parse_vader_snippets(sdist: Union[str, os.PathLike], domain: str) -> list[dict]:
    """Parse all snippets of one VADER ground-truth domain (``movies``, ``tweets``, ``products``, ``editorials``) from
    the ``vaderSentiment`` sdist.

    Reads ``additional_resources/hutto_ICWSM_2014.tar.gz`` from the sdist in memory and, from it, the domain's
    ``*_GroundTruth.txt`` (UTF-8, ``ID<TAB>MEAN-RATING<TAB>TEXT``). Returns one dict per line, in file order:
    ``{"id": int or str, "rating": float, "text": str}``.
    """
    filename, expected, _ = _check_domain(domain)
    member = f"hutto_ICWSM_2014/{filename}"
    inner = _read_inner_archive(Path(sdist))
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as tar:
        try:
            handle = tar.extractfile(member)
        except KeyError:
            handle = None
        if handle is None:
            raise ValueError(f"{INNER_ARCHIVE} in {sdist} has no file {member}.")
        text = handle.read().decode("utf-8")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{member}, line {lineno}: expected ID<TAB>RATING<TAB>TEXT; got {line[:80]!r}.")
        rows.append({"id": _source_id(parts[0].strip()), "rating": float(parts[1]), "text": parts[2].strip()})
    if len(rows) != expected:
        raise ValueError(f"{member} holds {len(rows)} snippets; expected {expected}.")
    return rows


def parse_movie_reviews(sdist: Union[str, os.PathLike]) -> list[dict]:
    """The 10,605 movie-review snippets (``parse_vader_snippets(sdist, "movies")``)."""
    return parse_vader_snippets(sdist, "movies")


def vader_domain_rows(domain: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> list[dict]:
    """All snippets (``id``, ``rating``, ``text``) of one VADER domain of Hutto & Gilbert (ICWSM 2014).

    Served from the JSON cache (``vader_3.3.2_movie_reviews.json``, ``vader_3.3.2_<domain>.json``) in ``cache_dir``
    when present; otherwise parsed from the sdist (``ensure_vader_archive``, downloading it if needed) and cached with
    an atomic write.
    """
    filename, expected, _ = _check_domain(domain)
    folder = _cache_dir(cache_dir)
    cache = folder / (ROWS_FILE if domain == "movies" else f"vader_{VADER_VERSION}_{domain}.json")
    if cache.is_file():
        try:
            with open(cache, encoding="utf-8") as f:
                payload = json.load(f)
            if payload.get("schema") == _ROWS_SCHEMA and len(payload.get("rows", ())) == expected:
                return payload["rows"]
        except (OSError, ValueError, AttributeError):
            pass  # unreadable or stale cache: parse again
    rows = parse_vader_snippets(ensure_vader_archive(folder), domain)
    payload = {
        "schema": _ROWS_SCHEMA,
        "source": f"{VADER_REQUIREMENT} sdist: {INNER_ARCHIVE} -> hutto_ICWSM_2014/{filename}",
        "citation": CITATION,
        "rows": rows,
    }
    atomic_write_json(cache, payload, indent=None)
    return rows


def movie_review_rows(cache_dir: Optional[Union[str, os.PathLike]] = None) -> list[dict]:
    """All 10,605 movie-review snippets (``vader_domain_rows("movies", cache_dir)``)."""
    return vader_domain_rows("movies", cache_dir)


def load_movie_reviews(
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    test_size: Union[float, int] = 0.2,
    seed: int = 0,
    max_examples: Optional[int] = None,
    neutral_margin: float = 0.0,
):
    """Binary movie-review sentiment (``load_vader_domain("movies", ...)``), a train / test ``DatasetDict``."""
    return load_vader_domain("movies", cache_dir, test_size, seed, max_examples, neutral_margin)


def load_vader_domain(
    domain: str,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    test_size: Union[float, int] = 0.2,
    seed: int = 0,
    max_examples: Optional[int] = None,
    neutral_margin: float = 0.0,
):
    """Binary sentiment of one VADER domain (``movies``, ``tweets``, ``products``, ``editorials``) from Hutto &
    Gilbert, *VADER* (ICWSM 2014), as a train / test ``DatasetDict``.

    Works offline once the ``vaderSentiment==3.3.2`` sdist (or the parsed JSON cache) is in ``cache_dir`` (default
    ``$PEFT_EXT_CACHE`` or ``~/.cache/peft-ext``); otherwise the sdist is downloaded once from PyPI with pip.

    Each row has ``text`` (str), ``rating`` (float, the mean human rating in -4..+4) and ``label``
    (``ClassLabel``: 1 = positive if ``rating > 0``, 0 = negative if ``rating < 0``).

    Args:
        domain: which ground-truth file (``VADER_DOMAINS``).
        cache_dir: where the sdist and the parsed rows are cached.
        test_size: fraction of the examples in ``test`` (float in (0, 1)) or their number (int); fractions round up.
        seed: seed of the shuffle; the same seed (and arguments) always gives the same splits.
        max_examples: keep only this many examples (a seeded random subset, taken before splitting); None keeps all.
        neutral_margin: drop snippets with ``abs(rating) <= neutral_margin`` (>= 0). The default 0.0 drops only
            the snippets rated exactly 0; e.g. 1.0 keeps only clearly polar ones.

    Snippets whose text occurs more than once are kept once, so no text is in both splits. Rows are ordered by source
    id, shuffled with ``numpy.random.default_rng(seed)``, cut to ``max_examples``, and the first ``n_test`` go to
    ``test``; a larger ``max_examples`` with the same seed therefore extends the smaller selection.
    """
    import numpy as np

    _, _, what = _check_domain(domain)
    fn = "load_movie_reviews" if domain == "movies" else "load_vader_domain"
    try:
        from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Value
    except ImportError as exc:  # not a core dependency of peft-ext
        raise ImportError(f"{fn} needs the `datasets` package: pip install datasets") from exc

    if isinstance(neutral_margin, bool) or not isinstance(neutral_margin, (int, float)) or not neutral_margin >= 0:
        raise ValueError(f"{fn}: neutral_margin must be a number >= 0; got {neutral_margin!r}.")
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 2
    ):
        raise ValueError(f"{fn}: max_examples must be an integer >= 2 or None; got {max_examples!r}.")
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise ValueError(f"{fn}: test_size must be a float in (0, 1) or an int; got {test_size!r}.")
    if isinstance(test_size, float) and not 0 < test_size < 1:
        raise ValueError(f"{fn}: a float test_size must lie in (0, 1); got {test_size!r}.")

    seen: set[str] = set()
    kept = []
    for row in sorted(vader_domain_rows(domain, cache_dir), key=_id_order):
        key = " ".join(row["text"].split())
        if abs(row["rating"]) <= neutral_margin or key in seen:
            continue
        seen.add(key)
        kept.append(row)

    order = np.random.default_rng(seed).permutation(len(kept))
    if max_examples is not None:
        order = order[:max_examples]
    n = len(order)
    n_test = math.ceil(n * test_size) if isinstance(test_size, float) else test_size
    if not 1 <= n_test <= n - 1:
        raise ValueError(
            f"{fn}: test_size={test_size!r} gives {n_test} test examples out of {n}; both splits need "
            f"at least one (neutral_margin={neutral_margin}, max_examples={max_examples})."
        )

    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=list(LABEL_NAMES)), "rating": Value("float64")}
    )

    def build(indices, split: str):
        rows = [kept[i] for i in indices]
        columns = {
            "text": [r["text"] for r in rows],
            "label": [int(r["rating"] > 0) for r in rows],
            "rating": [float(r["rating"]) for r in rows],
        }
        info = DatasetInfo(
            description=DESCRIPTION if domain == "movies" else DESCRIPTION.replace(
                "Movie-review snippets (rottentomatoes.com, via Pang & Lee 2004)", what[0].upper() + what[1:]),
            citation=CITATION,
            homepage="https://github.com/cjhutto/vaderSentiment",
            features=features,
        )
        return Dataset.from_dict(columns, info=info, split=split)

    return DatasetDict({"train": build(order[n_test:], "train"), "test": build(order[:n_test], "test")})
