"""Reward functions for GRPO in TRL's reward signature: ``f(completions, **kwargs) -> list[float]``.

TRL's ``GRPOTrainer`` calls each reward with ``prompts``, ``completions``, ``completion_ids``, ``trainer_state`` and
every dataset column as keywords (e.g. ``answer``), and weights them with ``GRPOConfig.reward_weights``. These are
pure functions: the same inputs give the same rewards, nothing is stored. A malformed completion (not text, ``None``,
a conversational turn without text) scores 0 and never raises; only a missing dataset column the reward needs raises
(a wrong setup, not a wrong completion).

The terms follow the reward of *Gazal-R1* (https://arxiv.org/abs/2506.21594; no public code: the exact terms and
weights are UNCERTAIN — the reading here is accuracy, format, cosine-scaled length and a repetition penalty):

* ``accuracy_reward``: 1 if the completion's final answer is right (``peft_ext.data.gsm.score_gsm``), else 0.
* ``format_reward``: 1 if the completion is ``<think>…</think>`` then ``<answer>…</answer>`` and nothing else, else 0.
* ``cosine_scaled_reward(...)``: the length-aware correctness reward of Yeo et al., *Demystifying Long Chain-of-Thought
  Reasoning in LLMs* (https://arxiv.org/abs/2502.03373): ``r(L) = lo + ½(hi − lo)(1 + cos(π·L/L_max))``, with
  (hi, lo) = (max_correct, min_correct) for a right answer (short right answers earn most) and (min_wrong, max_wrong)
  for a wrong one (short wrong answers are punished most).
* ``repetition_penalty(...)``: ``max_penalty × (1 − distinct n-grams / n-grams)`` over lower-cased words (≤ 0).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence

REASONING_TAG = "think"
ANSWER_TAG = "answer"
_FORMAT = re.compile(rf"^\s*<{REASONING_TAG}>(.+?)</{REASONING_TAG}>\s*<{ANSWER_TAG}>(.+?)</{ANSWER_TAG}>\s*$",
                     re.DOTALL)
_TAGS = re.compile(rf"</?({REASONING_TAG}|{ANSWER_TAG})>")


def completion_text(completion) -> Optional[str]:
    """The text of a completion: a string, or the last turn's ``content`` of a conversational completion; None when
    there is no text (malformed)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # multimodal content blocks: keep the text parts
            parts = [b.get("text") for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
            return "".join(parts) if parts else None
    return None


def _column(kwargs: dict, name: str, reward: str, n: int) -> list:
    values = kwargs.get(name)
    if values is None:
        raise ValueError(f"{reward} needs the dataset column {name!r} (the reference answer of each prompt); the "
                         f"reward got only {sorted(kwargs)}.")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{reward}: {len(values)} values in column {name!r} for {n} completions.")
    return values


def _score(text: Optional[str], answer) -> Optional[float]:
    """score_gsm of a text, or None when the text or the answer is malformed."""
    from .data.gsm import score_gsm

    if text is None or answer is None:
        return None
    try:
        return float(score_gsm(text, str(answer)))
    except Exception:  # a scorer failure on odd text counts as malformed, never as a crash of the training step
        return None


def accuracy_reward(completions: Sequence, answer: Optional[Sequence] = None, **kwargs) -> list[float]:
    """1.0 where the completion's final answer equals the ``answer`` column (GSM scorer), else 0.0."""
    answers = _column({"answer": answer}, "answer", "accuracy_reward", len(completions))
    return [_score(completion_text(c), a) or 0.0 for c, a in zip(completions, answers)]


def format_reward(completions: Sequence, **kwargs) -> list[float]:
    """1.0 where the completion is exactly ``<think>reasoning</think> <answer>answer</answer>`` (whitespace around
    and between the blocks allowed, both non-empty), else 0.0."""
    out = []
    for c in completions:
        text = completion_text(c)
        m = _FORMAT.match(text) if text is not None else None
        ok = bool(m) and all(g.strip() and not _TAGS.search(g) for g in m.groups())  # one block each, non-empty
        out.append(1.0 if ok else 0.0)
    return out


def _length(text: str, ids) -> int:
    if ids is not None:
        try:
            return len(ids)
        except TypeError:
            pass
    return len(text.split())


def cosine_scaled_reward(max_len: int = 512, min_correct: float = 0.5, max_correct: float = 1.0,
                         min_wrong: float = -1.0, max_wrong: float = -0.5) -> Callable:
    """A correctness reward scaled by length with a cosine schedule (Yeo et al. 2025; module docstring).

    Length is the number of completion tokens (``completion_ids``; whitespace-separated words without them), capped at
    ``max_len``. Right answers get ``max_correct`` at length 0 down to ``min_correct`` at ``max_len``; wrong ones
    ``min_wrong`` at length 0 up to ``max_wrong`` at ``max_len``. Malformed completions get 0.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"cosine_scaled_reward.max_len must be an integer >= 1; got {max_len!r}.")
    if not (min_correct <= max_correct and min_wrong <= max_wrong):
        raise ValueError("cosine_scaled_reward needs min_correct <= max_correct and min_wrong <= max_wrong; got "
                         f"{(min_correct, max_correct, min_wrong, max_wrong)}.")

    def cosine_length_reward(completions: Sequence, answer: Optional[Sequence] = None, completion_ids=None,
                             **kwargs) -> list[float]:
        answers = _column({"answer": answer}, "answer", "cosine_length_reward", len(completions))
        ids = list(completion_ids) if completion_ids is not None else [None] * len(completions)
        out = []
        for c, a, i in zip(completions, answers, ids):
            text = completion_text(c)
            score = _score(text, a)
            if score is None:
                out.append(0.0)
                continue
            hi, lo = (max_correct, min_correct) if score >= 1.0 else (min_wrong, max_wrong)
            frac = min(_length(text, i), max_len) / max_len
            out.append(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * frac)))
        return out

    return cosine_length_reward


def repetition_penalty(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable:
    """``max_penalty × (1 − distinct n-grams / n-grams)`` of each completion's lower-cased words (0 for texts shorter
    than one n-gram and for malformed completions); ``max_penalty`` must be <= 0."""
    if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"repetition_penalty.ngram_size must be an integer >= 1; got {ngram_size!r}.")
    if not isinstance(max_penalty, (int, float)) or max_penalty > 0:
        raise ValueError(f"repetition_penalty.max_penalty must be a number <= 0; got {max_penalty!r}.")

    def repetition_penalty_reward(completions: Sequence, **kwargs) -> list[float]:
        out = []
        for c in completions:
            text = completion_text(c)
            words = text.lower().split() if text is not None else []
            grams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
            out.append(float(max_penalty) * (1.0 - len(set(grams)) / len(grams)) if grams else 0.0)
        return out

    return repetition_penalty_reward


cosine_length_reward = cosine_scaled_reward()
repetition_penalty_reward = repetition_penalty()

REWARDS: dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "cosine_length": cosine_length_reward,
    "repetition": repetition_penalty_reward,
}


def get_reward_funcs(names: Sequence[str]) -> list[Callable]:
    """The reward functions named in ``names`` (keys of ``REWARDS``); a clear error for an unknown name."""
    if not names:
        raise ValueError(f"At least one reward is needed; choose from {sorted(REWARDS)}.")
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"Unknown reward(s) {unknown}; choose from {sorted(REWARDS)}.")
    return [REWARDS[n] for n in names]


def tagged_solution(answer_cot: str, answer: str) -> str:
    """A GSM worked solution in the format ``format_reward`` expects: the reasoning (without its ``#### n`` line) in
    ``<think>`` tags, then the final answer in ``<answer>`` tags — the SFT target of the two-stage recipe."""
    reasoning = answer_cot.rsplit("####", 1)[0].strip() if "####" in answer_cot else answer_cot.strip()
    return f"<{REASONING_TAG}>{reasoning}</{REASONING_TAG}>\n<{ANSWER_TAG}>{answer}</{ANSWER_TAG}>"
