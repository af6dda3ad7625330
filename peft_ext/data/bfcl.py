"""Function-calling examples of the Berkeley Function Calling Leaderboard, read offline from the PyPI ``bfcl-eval``.

Source: S. G. Patil, H. Mao, F. Yan, C. C.-J. Ji, V. Suresh, I. Stoica & J. E. Gonzalez, *The Berkeley Function
Calling Leaderboard (BFCL): From Tool Use to Agentic Evaluation of Large Language Models*, ICML 2025
(https://gorilla.cs.berkeley.edu/leaderboard.html, https://github.com/ShishirPatil/gorilla). The package
``bfcl-eval`` (version 2026.3.23 here) ships the BFCL v4 test set as JSON-lines files
``bfcl_eval/data/BFCL_v4_<category>.json`` (4,696 rows in 19 files, plus the id list
``BFCL_v4_format_sensitivity.json``) and the ground truth as ``bfcl_eval/data/possible_answer/BFCL_v4_<category>.json``:
for every expected call ``{function name: {parameter: [allowed values]}}``, where ``""`` among the allowed values marks
an optional parameter.

Install it with ``pip install --no-deps bfcl-eval``: its dependencies (openai, anthropic, sentence-transformers,
faiss, ...) are only needed to run the leaderboard, never here; the files are located with ``importlib`` without
importing the package. ``load_bfcl`` returns the single-turn categories as a seeded train / test
``datasets.DatasetDict``; ``score_bfcl`` is a simplified version of BFCL's AST checker; ``ground_truth_call`` renders
one valid call, e.g. as a fine-tuning target.
"""

from __future__ import annotations

from .models import package_path

import ast
import json
import keyword
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Union

BFCL_PACKAGE = "bfcl-eval"
_BFCL_MODULE = "bfcl_eval"
VERSION_PREFIX = "BFCL_v4"

#: Single-turn categories with ground truth (one or more expected calls).
CALL_CATEGORIES = (
    "simple_python",
    "simple_java",
    "simple_javascript",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
#: Single-turn categories where no offered function fits: the right answer is no call (``answer == "[]"``).
IRRELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance")
CATEGORIES = CALL_CATEGORIES + IRRELEVANCE_CATEGORIES
#: Short names accepted by ``load_bfcl`` (BFCL v3 called the Python-only category "simple").
ALIASES = {
    "simple": ("simple_python",),
    "java": ("simple_java",),
    "javascript": ("simple_javascript",),
    "all": CATEGORIES,
}

CITATION = (
    "Patil, S. G., Mao, H., Yan, F., Ji, C. C.-J., Suresh, V., Stoica, I. & Gonzalez, J. E. (2025). The Berkeley "
    "Function Calling Leaderboard (BFCL): From Tool Use to Agentic Evaluation of Large Language Models. ICML 2025."
)
DESCRIPTION = (
    "Single-turn function-calling prompts of BFCL v4 (from the bfcl-eval package): the user turn, the offered "
    "functions (JSON), and the ground truth (JSON list of {function: {parameter: [allowed values]}}; '' = optional)."
)


def bfcl_data_dir() -> Path:
    """The folder ``bfcl_eval/data`` of the installed ``bfcl-eval`` package (found without importing the package).

    Raises:
        FileNotFoundError: the package is not installed, or its data folder lacks the BFCL v4 files.
    """
    return package_path(
        _BFCL_MODULE, BFCL_PACKAGE, "data",
        lambda folder: (
            (folder / f"{VERSION_PREFIX}_simple_python.json").is_file() and (folder / "possible_answer").is_dir()
        ),
        f"data/{VERSION_PREFIX}_*.json files",
    )


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _resolve_categories(categories: Union[str, Iterable[str]]) -> list[str]:
    if isinstance(categories, str):
        categories = (categories,)
    resolved: list[str] = []
    for name in categories:
        for cat in ALIASES.get(name, (name,)):
            if cat not in CATEGORIES:
                raise ValueError(
                    f"load_bfcl: unknown or unsupported category {name!r}. Supported: {list(CATEGORIES)} and the "
                    f"aliases {sorted(ALIASES)} (multi-turn, memory, web-search and relevance categories are not)."
                )
            if cat not in resolved:
                resolved.append(cat)
    if not resolved:
        raise ValueError("load_bfcl: categories is empty.")
    return resolved


@lru_cache(maxsize=None)
def _category_rows(category: str) -> tuple:
    folder = bfcl_data_dir()
    entries = _read_jsonl(folder / f"{VERSION_PREFIX}_{category}.json")
    if category in IRRELEVANCE_CATEGORIES:
        truth = {e["id"]: [] for e in entries}
    else:
        answers = _read_jsonl(folder / "possible_answer" / f"{VERSION_PREFIX}_{category}.json")
        truth = {a["id"]: a["ground_truth"] for a in answers}
    rows = []
    for e in entries:
        if e["id"] not in truth:
            raise ValueError(f"{BFCL_PACKAGE}: {category} entry {e['id']!r} has no ground truth.")
        messages = e["question"][0]  # single-turn: one turn, a list of chat messages
        user = [m["content"] for m in messages if m.get("role") == "user"]
        rows.append(
            {
                "id": e["id"],
                "question": user[-1] if user else "",
                "functions": json.dumps(e["function"], ensure_ascii=False),
                "answer": json.dumps(truth[e["id"]], ensure_ascii=False),
                "category": category,
                "messages": json.dumps(messages, ensure_ascii=False),
            }
        )
    return tuple(rows)


def load_bfcl(
    categories: Union[str, Iterable[str]] = ("simple",),
    test_size: Union[float, int] = 0.2,
    seed: int = 0,
    max_examples: Optional[int] = None,
):
    """BFCL v4 single-turn function-calling examples (Patil et al., ICML 2025) as a train / test ``DatasetDict``.

    Read from the data files of the PyPI package ``bfcl-eval`` (``pip install --no-deps bfcl-eval``; nothing is
    downloaded, no Hugging Face Hub). Categories: ``CALL_CATEGORIES`` (``simple_python`` 400 rows, ``simple_java`` 100,
    ``simple_javascript`` 50, ``multiple`` 200, ``parallel`` 200, ``parallel_multiple`` 200, ``live_simple`` 258,
    ``live_multiple`` 1053, ``live_parallel`` 16, ``live_parallel_multiple`` 24) and ``IRRELEVANCE_CATEGORIES``
    (``irrelevance`` 240, ``live_irrelevance`` 884: no offered function fits, the expected answer is no call); aliases:
    ``"simple"`` = ``simple_python`` (BFCL v3's name), ``"java"``, ``"javascript"``, ``"all"``.

    Columns (all strings): ``id`` (BFCL's id), ``question`` (the text of the last user message), ``functions`` (JSON
    list of the offered function specs, BFCL's format), ``answer`` (JSON list of the expected calls,
    ``[{name: {param: [allowed values]}}, ...]``, ``""`` among the values = may be omitted; ``"[]"`` for irrelevance),
    ``category``, and ``messages`` (JSON list of the turn's chat messages; some live examples have a system prompt).

    Split: rows with the same question text are kept together; these groups are shuffled with
    ``numpy.random.default_rng(seed)``, the rows cut to ``max_examples`` (None keeps all), and the first
    ``ceil(test_size * n)`` rows (``test_size`` may also be a count), extended to the end of the question group they
    reach into, form ``test``. So the splits share no question, their sizes add up to ``n``, and the same arguments
    always give the same splits.
    """
    import numpy as np

    try:
        from datasets import Dataset, DatasetDict, DatasetInfo, Features, Value
    except ImportError as exc:  # not a core dependency of peft-ext
        raise ImportError("load_bfcl needs the `datasets` package: pip install datasets") from exc

    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 2
    ):
        raise ValueError(f"load_bfcl: max_examples must be an integer >= 2 or None; got {max_examples!r}.")
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise ValueError(f"load_bfcl: test_size must be a float in (0, 1) or an int; got {test_size!r}.")
    if isinstance(test_size, float) and not 0 < test_size < 1:
        raise ValueError(f"load_bfcl: a float test_size must lie in (0, 1); got {test_size!r}.")

    rows = [row for cat in _resolve_categories(categories) for row in _category_rows(cat)]
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(" ".join(row["question"].split()).lower(), []).append(i)
    group_list = list(groups.values())
    order = [i for g in np.random.default_rng(seed).permutation(len(group_list)) for i in group_list[g]]
    if max_examples is not None:
        order = order[:max_examples]
    n = len(order)
    n_test = math.ceil(n * test_size) if isinstance(test_size, float) else test_size
    if 1 <= n_test < n:  # move the cut to the end of the group it falls into
        key = lambda i: " ".join(rows[i]["question"].split()).lower()  # noqa: E731
        while n_test < n and key(order[n_test]) == key(order[n_test - 1]):
            n_test += 1
    if not 1 <= n_test <= n - 1:
        raise ValueError(
            f"load_bfcl: test_size={test_size!r} gives {n_test} test examples out of {n}; both splits need at least "
            f"one (categories={categories!r}, max_examples={max_examples})."
        )

    names = ("id", "question", "functions", "answer", "category", "messages")
    features = Features({name: Value("string") for name in names})

    def build(indices, split: str):
        columns = {name: [rows[i][name] for i in indices] for name in names}
        info = DatasetInfo(
            description=DESCRIPTION,
            citation=CITATION,
            homepage="https://gorilla.cs.berkeley.edu/leaderboard.html",
            features=features,
        )
        return Dataset.from_dict(columns, info=info, split=split)

    return DatasetDict({"train": build(order[n_test:], "train"), "test": build(order[:n_test], "test")})


# ----------------------------------------------------------------------------------------------------------- scoring


def _strip_wrappers(text: str) -> list[str]:
    """The pieces of ``text`` that may hold calls: ``<tool_call>`` blocks, else fenced code, else the whole text."""
    blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.DOTALL)
    if blocks:
        return [b.strip() for b in blocks if b.strip()]
    fenced = re.findall(r"```[\w+-]*\s*\n?(.*?)```", text, flags=re.DOTALL)
    if fenced:
        return [b.strip() for b in fenced if b.strip()]
    return [text.strip()]


def _json_calls(obj: Any) -> Optional[list[tuple[str, dict]]]:
    """Calls from a JSON value: ``{"name", "arguments"|"parameters"|"args"}``, OpenAI's ``{"function": {...}}``,
    ``{"tool_calls": [...]}``, BFCL's ``{name: {args}}``, or a list of those; None if it is none of them."""
    if isinstance(obj, list):
        calls = []
        for item in obj:
            sub = _json_calls(item)
            if sub is None:
                return None
            calls.extend(sub)
        return calls
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("tool_calls"), list):
        return _json_calls(obj["tool_calls"])
    if isinstance(obj.get("function"), dict) and "name" in obj["function"]:
        return _json_calls(obj["function"])
    if isinstance(obj.get("name"), str):
        args = next((obj[k] for k in ("arguments", "parameters", "args") if k in obj), {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                return None
        return [(obj["name"], args)] if isinstance(args, dict) else None
    if len(obj) == 1:
        (name, args), = obj.items()
        if isinstance(args, dict):
            return [(name, args)]
    return None


_NAME_CONSTANTS = {"true": True, "false": False, "null": None, "none": None}


def _ast_value(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if isinstance(node, ast.Name) and node.id.lower() in _NAME_CONSTANTS:  # JSON/Java/JS spellings
        return _NAME_CONSTANTS[node.id.lower()]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_ast_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_ast_value(k): _ast_value(v) for k, v in zip(node.keys, node.values) if k is not None}
    return ast.unparse(node)  # an expression (a variable, a constructor): compare its source text


_KEYWORD_ARG = re.compile(r"([(,]\s*)(" + "|".join(keyword.kwlist) + r")\s*=(?!=)")


def _dotted_name(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _python_calls(text: str) -> Optional[list[tuple[str, dict]]]:
    """Calls from Python syntax: ``f(a=1)``, ``mod.f(a=1)``, ``[f(a=1), g(b=2)]``; None if not parseable as such.

    Positional arguments cannot be matched to parameter names here, so a call with any is rejected (None)."""
    text = text.strip()
    renamed: dict[str, str] = {}
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # Java/JS parameters may be Python keywords (BFCL has `from=`): rename them, parse, and map them back
        def rename(m: re.Match) -> str:
            alias = f"_kw_{m.group(2)}"
            renamed[alias] = m.group(2)
            return f"{m.group(1)}{alias}="

        patched = _KEYWORD_ARG.sub(rename, text)
        if not renamed:
            return None
        try:
            tree = ast.parse(patched, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted_name(node.func)
        if name is None or any(kw.arg is None for kw in node.keywords):
            return None
        calls.append((name, {renamed.get(kw.arg, kw.arg): _ast_value(kw.value) for kw in node.keywords}))
    return calls


def parse_function_calls(prediction: str) -> Optional[list[tuple[str, dict]]]:
    """Parse a model's function call(s) into ``[(name, {arg: value}), ...]``; None if no call can be read.

    Accepted: Python syntax (``name(arg=value, ...)``, dotted names, a ``[...]`` list of calls; keyword arguments only,
    which may be Python keywords such as ``from=``; ``true``/``false``/``null`` are read as JSON's; other expressions
    are kept as their source text),
    or JSON (``{"name": ..., "arguments": {...}}`` with ``arguments`` possibly a JSON string, OpenAI's
    ``{"type": "function", "function": {...}}``, ``{"tool_calls": [...]}``, BFCL's ``{name: {args}}``, or a list).
    Calls may sit in ``<tool_call>...</tool_call>`` blocks (each parsed on its own) or a fenced code block; otherwise
    surrounding prose is tolerated by retrying from the first ``[``/``{`` or the first ``identifier(``.
    An empty list ``[]`` (or the text ``[]``) parses as "no call".
    """
    if prediction is None:
        return None
    calls: list[tuple[str, dict]] = []
    for piece in _strip_wrappers(str(prediction)):
        parsed = _parse_piece(piece)
        if parsed is None:
            return None
        calls.extend(parsed)
    return calls


def _parse_piece(text: str) -> Optional[list[tuple[str, dict]]]:
    candidates = [text]
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    if starts:
        start = min(starts)
        end = max(text.rfind("]"), text.rfind("}"))
        if end > start:
            candidates.append(text[start : end + 1])
    match = re.search(r"[A-Za-z_][\w.]*\s*\(", text)
    if match and text.rfind(")") > match.start():
        candidates.append(text[match.start() : text.rfind(")") + 1])
    for cand in candidates:
        try:
            calls = _json_calls(json.loads(cand))
        except (ValueError, RecursionError):
            calls = None
        if calls is None:
            calls = _python_calls(cand)
        if calls is not None:
            return calls
    return None


def _standardize(s: str) -> str:
    # BFCL's standardize_string: case-insensitive, ignoring spaces and , . / - _ * ^ and the quote style
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", s).lower().replace("'", '"')


def _value_ok(value: Any, expected: Any) -> bool:
    """Whether ``value`` equals one ground-truth candidate ``expected`` (a plain value, a list, or a dict whose values
    are lists of allowed values)."""
    if isinstance(expected, dict):
        return isinstance(value, dict) and _args_ok(value, expected)
    if isinstance(expected, list):
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(expected)
            and all(_value_ok(v, e) for v, e in zip(value, expected))
        )
    if isinstance(expected, str):
        return isinstance(value, str) and _standardize(value) == _standardize(expected)
    if isinstance(expected, bool) or expected is None or isinstance(value, bool):
        return value is expected
    if isinstance(expected, (int, float)) and isinstance(value, (int, float)):
        return value == expected or math.isclose(value, expected, rel_tol=1e-9)
    return value == expected


def _args_ok(args: dict, allowed: dict) -> bool:
    """Every given argument is a known parameter with an allowed value; every parameter without ``""`` is given."""
    for key, value in args.items():
        if key not in allowed or not any(_value_ok(value, cand) for cand in _candidates(allowed[key])):
            return False
    # required: parameters with allowed values but without "" among them ([] = must be left out, as in BFCL)
    return all(key in args for key, cands in allowed.items() if _candidates(cands) and "" not in _candidates(cands))


def _candidates(cands: Any) -> list:
    # deeper than one level, two BFCL answers write a literal dict ({"lateral": 10.5}) instead of allowed-value lists
    return cands if isinstance(cands, list) else [cands]


def _same_name(predicted: str, expected: str) -> bool:
    # some models write math.factorial as math_factorial (BFCL maps these back for them)
    return predicted == expected or predicted.replace(".", "_") == expected.replace(".", "_")


def score_bfcl(prediction: str, answer: str) -> float:
    """1.0 if the function call(s) in ``prediction`` match the BFCL ground truth ``answer``, else 0.0.

    ``answer`` is the ``answer`` column of ``load_bfcl``: a JSON list of expected calls ``{name: {param: [allowed
    values]}}``. ``prediction`` is parsed with ``parse_function_calls`` (Python ``name(arg=value)`` or JSON forms).
    A simplified version of BFCL's AST checker, without its type coercions for Java and JavaScript:

    * the number of calls must equal the number of expected calls, and each expected call must be matched by a
      different predicted call (any order, for the parallel categories);
    * a call matches if the names agree (``a.b`` and ``a_b`` count as the same), every argument is a parameter of the
      ground truth whose value is among its allowed values, and every parameter without ``""`` among its allowed
      values is given (a parameter with no allowed value, ``[]``, must be left out, as in BFCL);
    * values: strings compare as in BFCL (case-insensitive, ignoring spaces and ``, . / - _ * ^``); ints and floats
      compare numerically; booleans and None exactly; lists element by element in order; dicts by these same rules.

    For the irrelevance categories (``answer == "[]"``) the score is 1.0 exactly when no call is made: an
    unparseable or empty prediction, or ``[]``. Elsewhere an unparseable prediction scores 0.0.
    """
    expected = json.loads(answer) if isinstance(answer, str) else answer
    calls = parse_function_calls(prediction)
    if not expected:
        return 1.0 if not calls else 0.0
    if not calls or len(calls) != len(expected):
        return 0.0
    wanted = [next(iter(call.items())) for call in expected]

    def match(i: int, used: frozenset) -> bool:  # a small backtracking search for a one-to-one matching
        if i == len(wanted):
            return True
        name, allowed = wanted[i]
        return any(
            j not in used
            and _same_name(calls[j][0], name)
            and _args_ok(calls[j][1], allowed)
            and match(i + 1, used | {j})
            for j in range(len(calls))
        )

    return 1.0 if match(0, frozenset()) else 0.0


def _pick(candidates: list) -> tuple[bool, Any]:
    """(present, value): the first allowed value that is not the "omit" marker ``""``."""
    for cand in candidates:
        if cand != "":
            return True, _concrete(cand)
    return False, None


def _concrete(expected: Any) -> Any:
    if isinstance(expected, dict):
        out = {}
        for key, cands in expected.items():
            present, value = _pick(cands) if isinstance(cands, list) else (True, cands)
            if present:
                out[key] = value
        return out
    if isinstance(expected, list):
        return [_concrete(e) for e in expected]
    return expected


def ground_truth_call(answer: str) -> str:
    """One valid call for a ground truth ``answer`` (the ``answer`` column), in Python syntax, e.g. for fine-tuning.

    Takes the first allowed value other than ``""`` of each parameter (nested dicts and lists likewise) and leaves out
    the parameters whose only allowed value is ``""``. Several expected calls are written as a list
    ``[f(a=1), g(b=2)]``; no expected call (irrelevance) gives ``"[]"``. ``score_bfcl(ground_truth_call(a), a)`` is
    1.0 for every row of ``load_bfcl``.
    """
    expected = json.loads(answer) if isinstance(answer, str) else answer
    rendered = []
    for call in expected:
        (name, allowed), = call.items()
        args = []
        for key, cands in allowed.items():
            present, value = _pick(cands)
            if present:
                args.append(f"{key}={value!r}")
        rendered.append(f"{name}({', '.join(args)})")
    if len(rendered) == 1:
        return rendered[0]
    return "[" + ", ".join(rendered) + "]"


# -------------------------------------------------------------------------------------------- function subsets, plans
#: Function domains of the Octo-planner recipe (``peft_ext.trainers.planner``), in the order they are tried. A
#: function's domain is that of the first of its name's words (split at ``.``, ``_`` and camelCase) found in one of
#: these keyword lists, else of the first such word of its description, else ``"other"``. BFCL has no domain field; the
#: lists were written by reading the function names of the four Python call categories (simple, multiple, parallel,
#: parallel_multiple), which they split into math 186 rows, science 185, finance 114, society 144, leisure 278 and
#: other 93.
FUNCTION_DOMAINS = {
    "math": (
        "math mathematics geometry calculus algebra arithmetic area perimeter circle triangle rectangle polygon square "
        "root factorial prime gcd hcf lcm fibonacci derivative integral integrate equation quadratic polynomial matrix "
        "vector number numbers probability probabilities statistics statistic mean median average variance deviation "
        "random distribution permutation combination binomial sum sequence angle hypotenuse roots solve linear "
        "regression trigonometry sine cosine logarithm exponent percentage fraction prob dist ttest chi squared slope "
        "sort list array gradient anova correlation"
    ).split(),
    "science": (
        "physics kinematics chemistry chemical biology cellbio genetics genetic gene dna protein cell mutation ecology "
        "thermo thermodynamics electromagnetic electric magnetic force velocity acceleration energy gravity mass "
        "density pressure temperature heat wave light speed frequency molecule molecular element atom atomic reaction "
        "species population evolution evolutionary astronomy planet star galaxy earthquake weather climate forest air "
        "pollution environment environmental carbon emission emissions diabetes health medical water weight space "
        "nutrition displacement neuronal fitness"
    ).split(),
    "finance": (
        "finance financial financials stock stocks investment invest portfolio currency exchange loan mortgage "
        "interest tax salary bank banking price market economy economic dividend bond revenue profit cost budget "
        "payment fund crypto bitcoin inflation credit depreciation roi npv corporate accounting instrument"
    ).split(),
    "society": (
        "law lawsuit lawsuits legal court case cases lawyer attorney judge crime crimes criminal patent history "
        "historical historic religion religious war president election politics government census country countries "
        "museum art artwork sculpture painting artist culture library author novel literature exhibition"
    ).split(),
    "leisure": (
        "sports sport game games player team league match soccer football basketball baseball tennis chess poker "
        "board concert music musical song album movie movies film imdb tv show restaurant restaurants recipe recipes "
        "booking book food cooking grocery supermarket hotel flight travel trip route map maps directions ride event "
        "events ticket park parks tourist vacation shopping store walmart city distance timezone news pokemon"
    ).split(),
}
OTHER_DOMAIN = "other"
_DOMAIN_OF = {}
for _domain, _words in FUNCTION_DOMAINS.items():
    for _word in _words:
        _DOMAIN_OF.setdefault(_word, _domain)


def _words(text: str) -> list[str]:
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", text or "")
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def function_domain(function: Union[dict, str]) -> str:
    """The domain (a key of ``FUNCTION_DOMAINS`` or ``"other"``) of one BFCL function spec, or of a bare name.

    The first word of the name (split at ``.``, ``_``, camelCase) found in a keyword list decides; if none is, the first
    such word of the description; else ``"other"``. E.g. ``math.factorial`` → math, ``get_stock_data`` → finance."""
    if isinstance(function, str):
        name, description = function, ""
    elif isinstance(function, dict) and isinstance(function.get("name"), str):
        name, description = function["name"], str(function.get("description") or "")
    else:
        raise ValueError(f"function_domain: expected a BFCL function spec with a 'name' or a name; got {function!r}.")
    for word in _words(name) + _words(description):
        if word in _DOMAIN_OF:
            return _DOMAIN_OF[word]
    return OTHER_DOMAIN


def expected_function_names(answer: str) -> list[str]:
    """The function names of the ground-truth calls of ``answer`` (the ``answer`` column), in order."""
    expected = json.loads(answer) if isinstance(answer, str) else answer
    return [next(iter(call)) for call in expected]


def function_subset(row: dict) -> str:
    """The ``function_subset`` of one ``load_bfcl`` row: the most frequent ``function_domain`` among the functions of
    its ground-truth calls (ties: the earliest call's), each looked up in the offered ``functions`` by name (a name
    not offered is classified by the name alone). Irrelevance rows (no call) use the offered functions instead."""
    offered = {f.get("name"): f for f in json.loads(row["functions"]) if isinstance(f, dict)}
    names = expected_function_names(row["answer"]) or list(offered)
    domains = [function_domain(offered.get(name, name)) for name in names]
    if not domains:
        return OTHER_DOMAIN
    counts = {d: domains.count(d) for d in domains}
    return max(domains, key=lambda d: (counts[d], -domains.index(d)))


def add_function_subsets(dataset):
    """``dataset`` (a ``load_bfcl`` split or ``DatasetDict``) with the ``function_subset`` column."""
    return dataset.map(lambda row: {"function_subset": function_subset(row)})


def plan_steps(answer: str) -> list[str]:
    """One plan step per ground-truth call, each naming its function: ``["Call math.factorial", ...]``."""
    return [f"Call {name}" for name in expected_function_names(answer)]


def plan_target(answer: str) -> str:
    """The Octo-planner target of a row: a numbered plan, one step per ground-truth call (``1. Call f\\n2. Call g``);
    a query with several calls (BFCL multiple / parallel) gives a multi-step plan, no call gives ``""``."""
    return "\n".join(f"{i}. {step}" for i, step in enumerate(plan_steps(answer), 1))


def split_answer(answer: str) -> list[str]:
    """The ground truth ``answer`` as one single-call answer per expected call (JSON strings, for ``score_bfcl`` and
    ``ground_truth_call`` one step at a time)."""
    expected = json.loads(answer) if isinstance(answer, str) else answer
    return [json.dumps([call], ensure_ascii=False) for call in expected]


def function_signature(function: dict, max_description: int = 120) -> str:
    """A compact one-line form of a BFCL function spec for prompts: ``name(p: type, q: type = optional) - what it
    does`` (the description cut to ``max_description`` characters at a word boundary)."""
    params = function.get("parameters") or {}
    props = params.get("properties") or {}
    required = set(params.get("required") or ())
    parts = []
    for key, spec in props.items():
        kind = spec.get("type", "any") if isinstance(spec, dict) else "any"
        parts.append(f"{key}: {kind}" + ("" if key in required else " = optional"))
    description = " ".join(str(function.get("description") or "").split())
    if len(description) > max_description:
        description = description[:max_description].rsplit(" ", 1)[0] + " ..."
    return f"{function.get('name')}({', '.join(parts)})" + (f" - {description}" if description else "")
