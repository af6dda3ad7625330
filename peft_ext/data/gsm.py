"""GSM8K-style grade-school math word problems, generated offline by the PyPI package ``reasoning-gym``.

Source: the ``gsm_symbolic`` procedural data set of *Reasoning Gym* (Open-Thought, https://github.com/open-thought/
reasoning-gym; ``pip install reasoning-gym``), after I. Mirzadeh et al., *GSM-Symbolic: Understanding the Limitations
of Mathematical Reasoning in Large Language Models* (arXiv:2410.05229, 2024), whose templates turn GSM8K test
problems (K. Cobbe et al., *Training Verifiers to Solve Math Word Problems*, arXiv:2110.14168, 2021) into generators
with random names and numbers. ``reasoning-gym`` 0.1.25 ships 100 such generators and samples from the 85 it marks as
correct. Each example has a question (ending in "Give the result as your final answer. Do not include units."), the
final answer as a string and a GSM8K-style worked solution (``answer_cot``, ending in ``#### <answer>``).

``load_gsm`` generates the rows (fast: no download, no Hugging Face Hub), caches them as JSON in the peft-ext cache
folder (``$PEFT_EXT_CACHE`` or ``~/.cache/peft-ext``) with an atomic write, and returns a train / test
``datasets.DatasetDict``. ``score_gsm`` grades a model's free-form output against an answer.
"""

from __future__ import annotations

from .._io import atomic_write_json

import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Union

from .sentiment import default_cache_dir

DATASET_NAME = "gsm_symbolic"
RG_PACKAGE = "reasoning-gym"
_TEST_SEED_OFFSET = 10_000_000  # test rows use generator seeds seed + 10**7 + i: never the train seeds seed + i
_ROWS_SCHEMA = 1  # bump when the cached JSON layout or the selection rules change

CITATION = (
    "Mirzadeh, I., Alizadeh, K., Shahrokhi, H., Tuzel, O., Bengio, S. & Farajtabar, M. (2024). GSM-Symbolic: "
    "Understanding the Limitations of Mathematical Reasoning in Large Language Models. arXiv:2410.05229. "
    "Generated with Reasoning Gym (Open-Thought, https://github.com/open-thought/reasoning-gym)."
)
DESCRIPTION = (
    "GSM8K-style math word problems from the gsm_symbolic generators of the reasoning-gym package: question, final "
    "answer (string), worked solution (answer_cot, ending in '#### <answer>'), generator template id and variables."
)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _cache_dir(cache_dir: Optional[Union[str, os.PathLike]]) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rg_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(RG_PACKAGE)
    except PackageNotFoundError:
        return None


def _import_reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError(
            f"load_gsm needs the `{RG_PACKAGE}` package: pip install -c constraints.txt {RG_PACKAGE}"
        ) from exc
    return reasoning_gym


def _generate(base_seed: int, n: int, exclude: frozenset = frozenset()) -> list[dict]:
    """The first ``n`` usable rows of the gsm_symbolic stream with seed ``base_seed`` (item i uses ``base_seed + i``).

    Skipped: questions already taken (duplicates within the stream) or in ``exclude``, and rows with a negative answer
    (a few templates, e.g. the comet-age one, then produce nonsensical problems such as "-1 years old").
    """
    rg = _import_reasoning_gym()
    rows: list[dict] = []
    seen = set(exclude)
    size = max(16, n + n // 8 + 8)
    start = 0
    while True:
        # reasoning-gym draws the template ids with Random(seed).choices(k=size), a prefix of any longer draw, and item
        # i with Random(seed + i); so growing `size` keeps the items already read and the result is deterministic.
        ds = rg.create_dataset(DATASET_NAME, seed=base_seed, size=size)
        for idx in range(start, size):
            ex = ds[idx]
            question = ex["question"].strip()
            answer = str(ex["answer"]).strip()
            if question in seen or answer.startswith("-"):
                continue
            seen.add(question)
            meta = ex.get("metadata", {})
            rows.append(
                {
                    "question": question,
                    "answer": answer,
                    "answer_cot": str(meta.get("answer_cot", "")),
                    "template": int(ds.task_indices[idx]),
                    "generator_seed": int(base_seed),
                    "source_index": int(idx),
                    "variables": json.dumps(meta.get("variables", {}), ensure_ascii=False, sort_keys=True, default=str),
                }
            )
            if len(rows) == n:
                return rows
        start = size
        size *= 2


def gsm_rows(
    n_train: int, n_test: int, seed: int = 0, cache_dir: Optional[Union[str, os.PathLike]] = None
) -> dict[str, list[dict]]:
    """The rows of ``load_gsm`` as ``{"train": [...], "test": [...]}`` lists of dicts (see ``load_gsm``).

    Served from ``gsm_symbolic_<reasoning-gym version>_seed<seed>_train<n_train>_test<n_test>.json`` in ``cache_dir``
    (default ``$PEFT_EXT_CACHE`` or ``~/.cache/peft-ext``) when present; otherwise generated with ``reasoning-gym`` and
    cached with an atomic write. A cache file is only used while the installed ``reasoning-gym`` version matches.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"load_gsm: {name} must be an integer >= 1; got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _TEST_SEED_OFFSET:
        raise ValueError(f"load_gsm: seed must be an integer in [0, {_TEST_SEED_OFFSET}); got {seed!r}.")
    if n_train >= _TEST_SEED_OFFSET // 2 or n_test >= _TEST_SEED_OFFSET // 2:
        raise ValueError(f"load_gsm: at most {_TEST_SEED_OFFSET // 2 - 1} rows per split.")
    version = _rg_version()
    folder = _cache_dir(cache_dir)
    cache = folder / f"gsm_symbolic_{version or 'none'}_seed{seed}_train{n_train}_test{n_test}.json"
    if version is not None and cache.is_file():
        try:
            with open(cache, encoding="utf-8") as f:
                payload = json.load(f)
            if (
                payload.get("schema") == _ROWS_SCHEMA
                and payload.get("reasoning_gym") == version
                and len(payload["train"]) == n_train
                and len(payload["test"]) == n_test
            ):
                return {"train": payload["train"], "test": payload["test"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable or stale cache: generate again
    _import_reasoning_gym()
    # The test split depends only on (seed, n_test), so evaluations stay comparable across training-set sizes; the
    # train stream then skips every question that is in the test split.
    test = _generate(seed + _TEST_SEED_OFFSET, n_test)
    train = _generate(seed, n_train, exclude=frozenset(r["question"] for r in test))
    payload = {
        "schema": _ROWS_SCHEMA,
        "source": f"{RG_PACKAGE}=={version}: create_dataset({DATASET_NAME!r})",
        "reasoning_gym": version,
        "citation": CITATION,
        "train": train,
        "test": test,
    }
    atomic_write_json(cache, payload, indent=None)
    return {"train": train, "test": test}


def load_gsm(
    n_train: int = 1000,
    n_test: int = 200,
    seed: int = 0,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
):
    """GSM8K-style math word problems (GSM-Symbolic templates, via ``reasoning-gym``) as a train / test ``DatasetDict``.

    Needs the PyPI package ``reasoning-gym`` (no network at run time, no Hugging Face Hub) unless the rows are already
    cached in ``cache_dir`` (default ``$PEFT_EXT_CACHE`` or ``~/.cache/peft-ext``).

    Columns: ``question`` (str, ends in "Give the result as your final answer. Do not include units."), ``answer`` (the
    final answer as a string, e.g. ``"28080"`` or ``"9281.25"``), ``answer_cot`` (a GSM8K-style worked solution ending
    in ``#### <answer>``; a few templates write e.g. ``44.0`` there for the answer ``44``), ``template`` (the generator
    id, 0..99), ``generator_seed`` and ``source_index`` (the example is reasoning-gym's ``gsm_symbolic`` item
    ``source_index`` at seed ``generator_seed``), and ``variables`` (JSON string of the generator's sampled values).

    Splits: train is the stream with generator seed ``seed`` (item i drawn with ``Random(seed + i)``), test the stream
    with seed ``seed + 10**7``, so the two never share a random draw. Questions are unique within and across the splits
    (repeats are skipped and replaced by later items; train skips test's questions), and the rare rows with a
    negative answer (nonsensical problems such as a negative age) are dropped. The result is deterministic for
    ``(n_train, n_test, seed)``; the test split depends only on ``(seed, n_test)``, and a larger ``n_train`` or
    ``n_test`` extends the smaller one.
    """
    try:
        from datasets import Dataset, DatasetDict, DatasetInfo, Features, Value
    except ImportError as exc:  # not a core dependency of peft-ext
        raise ImportError("load_gsm needs the `datasets` package: pip install datasets") from exc

    rows = gsm_rows(n_train, n_test, seed=seed, cache_dir=cache_dir)
    features = Features(
        {
            "question": Value("string"),
            "answer": Value("string"),
            "answer_cot": Value("string"),
            "template": Value("int32"),
            "generator_seed": Value("int64"),
            "source_index": Value("int64"),
            "variables": Value("string"),
        }
    )

    def build(split: str):
        columns = {name: [r[name] for r in rows[split]] for name in features}
        info = DatasetInfo(
            description=DESCRIPTION,
            citation=CITATION,
            homepage="https://github.com/open-thought/reasoning-gym",
            features=features,
        )
        return Dataset.from_dict(columns, info=info, split=split)

    return DatasetDict({"train": build("train"), "test": build("test")})


def extract_gsm_answer(prediction: Optional[str]) -> Optional[str]:
    """The final number in a model's output, as a plain string (``"1234"``, ``"-5"``, ``"2.5"``), or None.

    Looks first inside the last ``<answer>...</answer>`` block (reasoning-gym's convention), else after the last
    ``####`` (GSM8K's), else in the whole text, and takes the last number there. Thousands separators (``1,234``),
    currency signs and units are ignored; a trailing ``.0`` is kept (``score_gsm`` compares numerically).
    """
    if not prediction:
        return None
    text = str(prediction)
    tagged = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL | re.IGNORECASE)
    if tagged:
        text = tagged[-1]
    elif "####" in text:
        text = text.rsplit("####", 1)[1]
    numbers = _NUMBER.findall(_THOUSANDS.sub("", text))
    return numbers[-1] if numbers else None


def _same_number(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def score_gsm(prediction: str, answer: str) -> float:
    """1.0 if ``prediction`` (a model's free-form output) ends in the right final answer, else 0.0.

    The candidate is ``extract_gsm_answer(prediction)`` (the last number, preferring an ``<answer>`` block or the text
    after ``####``). It is graded by reasoning-gym's own scorer, ``GSMSymbolicDataset.score_answer`` (exact float
    equality of the first number in its input with the answer), and only its full reward counts: reasoning-gym's 0.01
    "a number, but wrong" reward becomes 0.0. Without ``reasoning-gym``, and for negative candidates (whose minus sign
    that scorer's regex drops, so that ``-5`` would match ``5``), the candidate is compared numerically instead.
    """
    candidate = extract_gsm_answer(prediction)
    if candidate is None:
        return 0.0
    expected = str(answer).strip().replace(",", "")
    if not candidate.startswith("-"):
        scorer = _rg_score_answer()
        if scorer is not None:
            try:
                return 1.0 if scorer(candidate, {"answer": expected}) >= 1.0 else 0.0
            except Exception:  # pragma: no cover - fall back to the numeric comparison below
                pass
    return 1.0 if _same_number(candidate, expected) else 0.0


_SCORER_CACHE: list = []


def _rg_score_answer():
    """reasoning-gym's ``gsm_symbolic`` ``score_answer`` (cached), or None if the package is unavailable."""
    if not _SCORER_CACHE:
        try:
            import reasoning_gym

            _SCORER_CACHE.append(reasoning_gym.get_score_answer_fn(DATASET_NAME))
        except Exception:  # ImportError, or an API change: use the numeric fallback
            _SCORER_CACHE.append(None)
    return _SCORER_CACHE[0]
