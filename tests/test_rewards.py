"""Reward functions (peft_ext.rewards) on hand-made completions: values from the formulas, malformed completions
score 0 and never raise, TRL's conversational completions and keyword arguments are accepted."""

from __future__ import annotations

import math

import pytest

from peft_ext.rewards import (
    REWARDS,
    accuracy_reward,
    cosine_scaled_reward,
    format_reward,
    get_reward_funcs,
    repetition_penalty,
    tagged_solution,
)

GOOD = "<think>3 apples and 4 more make 7.</think>\n<answer>7</answer>"
MALFORMED = [None, 42, [], [{"role": "assistant"}], [{"role": "assistant", "content": None}], {"text": "7"}, b"7"]
TRL_KWARGS = dict(prompts=["p"], trainer_state=None)


def test_accuracy():
    comps = [GOOD, "so the total is 7", "#### 8", "", "<answer>7.0</answer>", [{"role": "assistant", "content": "= 7"}]]
    assert accuracy_reward(comps, answer=["7"] * 6, **TRL_KWARGS) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_format():
    comps = [
        GOOD,
        "  <think>x</think><answer>1</answer>\n",           # whitespace around the blocks is fine
        "<answer>7</answer>",                               # no reasoning
        "<think>x</think>",                                 # no answer
        "<think>x</think><answer>7</answer> trailing",      # text after the answer
        "<think> </think><answer>7</answer>",               # empty reasoning
        "<think>x</think><answer>1</answer><answer>2</answer>",  # two answer blocks
        "<answer>7</answer><think>x</think>",               # wrong order
    ]
    assert format_reward(comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_cosine_scaled_length():
    f = cosine_scaled_reward(max_len=10, min_correct=0.5, max_correct=1.0, min_wrong=-1.0, max_wrong=-0.5)
    comps = ["7", "a b c d 7", "8", "a b c d 8", " ".join(["a"] * 30) + " 7"]
    got = f(comps, answer=["7"] * 5)
    # r(L) = lo + (hi - lo)/2 * (1 + cos(pi L / Lmax)); (hi, lo) = (1, .5) right, (-1, -.5) wrong; L capped at 10
    want = [0.5 + 0.25 * (1 + math.cos(math.pi * 0.1)), 0.5 + 0.25 * (1 + math.cos(math.pi * 0.5)),
            -0.5 - 0.25 * (1 + math.cos(math.pi * 0.1)), -0.5 - 0.25 * (1 + math.cos(math.pi * 0.5)), 0.5]
    assert got == pytest.approx(want, abs=1e-12)
    # completion_ids (TRL's token ids) decide the length when given
    assert f(["7"], answer=["7"], completion_ids=[[1] * 10]) == pytest.approx([0.5])
    assert f(["8"], answer=["7"], completion_ids=[[]]) == pytest.approx([-1.0])
    with pytest.raises(ValueError, match="max_len must be an integer >= 1"):
        cosine_scaled_reward(max_len=0)


def test_repetition_penalty():
    f = repetition_penalty(ngram_size=2, max_penalty=-1.0)
    got = f(["a b a b a b", "the cat sat on the mat", "one", "A B a b"])
    # bigrams: (ab, ba, ab, ba, ab) -> 2 distinct of 5; all distinct; shorter than a bigram; lower-cased (ab, ba, ab)
    assert got == pytest.approx([-(1 - 2 / 5), 0.0, 0.0, -(1 - 2 / 3)])
    with pytest.raises(ValueError, match="max_penalty must be a number <= 0"):
        repetition_penalty(max_penalty=0.5)


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_malformed_scores_zero(name):
    f = REWARDS[name]
    got = f(MALFORMED, answer=["7"] * len(MALFORMED), completion_ids=[None] * len(MALFORMED), **TRL_KWARGS)
    assert got == [0.0] * len(MALFORMED)
    assert f(["<answer>7</answer>"], answer=[None]) in ([0.0], [-0.0])  # a missing answer value is malformed too


def test_missing_answer_column_is_a_clear_error():
    with pytest.raises(ValueError, match="accuracy_reward needs the dataset column 'answer'"):
        accuracy_reward(["7"], prompts=["p"])


def test_reward_lookup_and_sft_target():
    assert get_reward_funcs(["format", "accuracy"]) == [format_reward, accuracy_reward]
    with pytest.raises(ValueError, match=r"Unknown reward\(s\) \['acc'\]"):
        get_reward_funcs(["acc"])
    target = tagged_solution("3 + 4 = 7\n#### 7", "7")
    assert format_reward([target]) == [1.0] and accuracy_reward([target], answer=["7"]) == [1.0]
