"""Offline "general solving knowledge" for the GSM-style problems of ``peft_ext.data.gsm``, the training target of
LoRID's knowledge generator (*Can Large Models Teach Student Models to Solve Mathematical Problems Like Human Beings?*,
arXiv 2508.13037; official code https://github.com/Xinhe-Li/LoRID).

Deviation from the paper: LoRID's knowledge was written by GPT-4o (``prompt/knowledge.txt``: general rules, no semantic
information from the question, mapping the complete reasoning steps). Offline there is no GPT-4o, so the knowledge is
built from what the ``gsm_symbolic`` generator of ``reasoning-gym`` knows about each problem: its template's worked
solution (``answer_cot``) with every value abstracted away. Each solution line becomes one rule, in which

* a number equal to one of the generator's variables becomes that variable's name in brackets (``72*0.5=36`` →
  ``[initial count]*[fraction dropped]=[remaining]``; when several variables share the value, the first in sorted key
  order wins);
* any other number becomes ``[value]``; digits inside variable names are spelt out (``p1`` → ``[p one]``), so a rule
  contains no digit at all and no number of the problem can leak;
* a string variable (a person's name, an item) becomes its name in brackets (``Robert`` → ``[name]``).

The rules are therefore the template's solution steps without its numbers: they keep the operations and the order of
the steps, and some wording of the template (the official rules are more abstract). The final ``#### <answer>`` line
is dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Union

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NUMBER = re.compile(r"\d(?:[\d,]*\d)?(?:\.\d+)?")
VALUE_PLACEHOLDER = "[value]"


def _label(key: str) -> str:
    """``days_per_week`` → ``[days per week]``; digits spelt out so a label never carries a number."""
    words = re.sub(r"\d", lambda m: f" {_DIGIT_WORDS[int(m.group())]} ", key.replace("_", " "))
    return "[" + " ".join(words.split()) + "]"


def _as_float(value: Any):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(",", "")
        try:
            if "/" in text:  # Fractions serialised by json.dumps(default=str)
                num, den = text.split("/", 1)
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _variable_tables(variables: Mapping[str, Any]) -> tuple[list[tuple[float, str]], dict[str, str]]:
    """``(numbers, strings)``: (value, label) for every numeric variable or list element, and text value → label for
    every string variable or list element (values shorter than 2 characters are skipped: they would match inside
    words)."""
    numbers: list[tuple[float, str]] = []
    strings: dict[str, str] = {}
    for key in sorted(variables):
        values = variables[key] if isinstance(variables[key], (list, tuple)) else [variables[key]]
        for value in values:
            number = _as_float(value)
            if number is not None:
                numbers.append((number, _label(key)))
            elif isinstance(value, str) and len(value.strip()) >= 2:
                strings.setdefault(value.strip(), _label(key))
    return numbers, strings


def gsm_knowledge(row: Mapping[str, Any]) -> list[str]:
    """The general solving knowledge of one ``load_gsm`` row (``answer_cot`` and ``variables``): one rule per solution
    step, numbers and names replaced by the generator's variable names (see the module docstring); never a digit."""
    cot = str(row.get("answer_cot") or "")
    variables = row.get("variables") or {}
    if isinstance(variables, str):
        variables = json.loads(variables) if variables.strip() else {}
    if not isinstance(variables, Mapping):
        raise ValueError(f"gsm_knowledge: 'variables' must be a mapping or its JSON; got {type(variables).__name__}.")
    numbers, strings = _variable_tables(variables)
    words = sorted(strings, key=len, reverse=True)
    pattern = re.compile(
        "|".join([rf"(?<!\w){re.escape(w)}(?!\w)" for w in words] + [_NUMBER.pattern]) if words else _NUMBER.pattern
    )

    def replace(match: re.Match) -> str:
        text = match.group()
        if text in strings:
            return strings[text]
        value = _as_float(text)
        for number, label in numbers:
            if value is not None and abs(number - value) <= 1e-9 * max(1.0, abs(value)):
                return label
        return VALUE_PLACEHOLDER

    rules = []
    for line in cot.splitlines():
        line = line.strip()
        if not line or line.startswith("####"):
            continue
        rule = pattern.sub(replace, line)
        rule = re.sub(r"\d", "", rule)  # belt and braces: a digit glued to a word (e.g. "3rd") must not survive
        rules.append(" ".join(rule.split()))
    return rules


def gsm_rationale(row: Mapping[str, Any]) -> str:
    """The worked solution of a ``load_gsm`` row without its final ``#### <answer>`` line (LoRID's ``rationale``)."""
    lines = [line for line in str(row.get("answer_cot") or "").splitlines() if not line.strip().startswith("####")]
    return "\n".join(lines).strip()


def knowledge_text(rules: Union[list, tuple, str]) -> str:
    """Rules joined one per line, as the official scripts join GPT-4o's list."""
    return rules if isinstance(rules, str) else "\n".join(rules)
