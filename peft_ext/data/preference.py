"""Offline preference pairs for GSM-style problems, built from the *current* policy (mrDPO's per-round pairs).

For each problem the policy samples ``num_samples`` answers; ``score_gsm`` (reasoning-gym's scorer) grades them, and:

* some right, some wrong: chosen = a right sample, rejected = a wrong sample (``source="policy"``);
* none right: chosen = the gold worked solution, rejected = the gold solution with a wrong final number
  (``source="gold"``);
* all right: chosen = a right sample, rejected = that sample with a wrong final number (``source="perturbed"``).

The ground-truth column is the gold worked solution (mrDPO's CE term). Nothing is read from a fixed file of pairs:
each call samples from the model it is given, so each round's pairs come from that round's policy. The paper's pairs
(video-SALMONN 2) are ranked by an LLM judge instead; this builder is the offline stand-in.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm_prompt(question: str) -> str:
    """The prompt of a GSM question for the trainer recipes. It ends in a newline, not a space: TRL tokenizes prompt +
    completion as one text, and with a trailing space BPE tokenizers merge it into the completion's first token
    (``"Answer: <think>"`` -> ``':', 'Ġ<'``) while the prompt alone ends in a lone ``'Ġ'``, so generation would start
    from a token sequence training never showed (SmolLM2 then never wrote the tags after SFT)."""
    return f"Question: {question}\nAnswer:\n"


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, num_samples: int = 1,
                     temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8) -> list[str]:
    """``num_samples`` completions per prompt (grouped by prompt), greedy when ``temperature == 0``, else sampled."""
    import torch

    out_texts: list[str] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    sample = temperature > 0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            kwargs = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample
                      else dict(do_sample=False))
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                     pad_token_id=tokenizer.pad_token_id, **kwargs)
            out_texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out_texts


def perturb_final_number(solution: str, answer: str, rng: np.random.Generator) -> str:
    """``solution`` with its final answer replaced by a different non-negative number (the number after the last
    ``####``, else the last number in the text; appended as ``#### n`` when there is none)."""
    try:
        value = float(str(answer).replace(",", ""))
    except ValueError:
        value = 0.0
    delta = int(rng.integers(1, 10))
    wrong = value + delta if value - delta < 0 or rng.random() < 0.5 else value - delta
    decimals = len(str(answer).split(".")[1]) if "." in str(answer) else 0
    text = f"{wrong:.{decimals}f}" if decimals else str(int(round(wrong)))
    if "####" in solution:
        head, tail = solution.rsplit("####", 1)
        match = _NUMBER.search(tail)
        if match:
            return head + "####" + tail[: match.start()] + text + tail[match.end():]
        return head + "#### " + text
    matches = list(_NUMBER.finditer(solution))
    if matches:
        m = matches[-1]
        return solution[: m.start()] + text + solution[m.end():]
    return solution.rstrip() + f"\n#### {text}"


def pair_from_samples(prompt: str, samples: list[str], answer: str, gold: str, rng: np.random.Generator) -> dict:
    """One preference row from a problem's scored samples (rules in the module docstring)."""
    from .gsm import score_gsm

    scores = [score_gsm(s, answer) for s in samples]
    right = [s for s, v in zip(samples, scores) if v >= 1.0]
    wrong = [s for s, v in zip(samples, scores) if v < 1.0]
    if right and wrong:
        chosen, rejected, source = right[0], wrong[0], "policy"
    elif not right:
        chosen, rejected, source = gold, perturb_final_number(gold, answer, rng), "gold"
    else:
        chosen, source = right[0], "perturbed"
        rejected = perturb_final_number(chosen, answer, rng)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "ground_truth": gold, "source": source,
            "sample_accuracy": float(np.mean(scores)) if scores else 0.0}


class GSMPairBuilder:
    """``pair_builder`` for ``MrDPOTrainer`` on GSM rows (columns ``question``, ``answer``, ``answer_cot``).

    Each call samples ``num_samples`` answers per problem from the model it is given (temperature ``temperature``)
    and returns one pair per problem (see the module docstring); with ``prompts_per_round=n``, round k uses the k-th
    window of n problems (cycling through the set), so every round sees new problems. ``tagged=True`` writes the
    gold solution as ``<think>…</think><answer>…</answer>`` (``peft_ext.rewards.tagged_solution``), the format the
    recipes' SFT stage teaches. ``last_stats`` holds the round's sample accuracy
    (mean score of the policy's samples) and how many pairs came from each source.
    """

    def __init__(self, num_samples: int = 4, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 batch_size: int = 8, seed: int = 0, prompts_per_round: Optional[int] = None, tagged: bool = False):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"GSMPairBuilder.num_samples must be an integer >= 1; got {num_samples!r}.")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"GSMPairBuilder.temperature must be a number >= 0; got {temperature!r}.")
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
        self.temperature, self.top_p, self.batch_size, self.seed = temperature, top_p, batch_size, seed
        bad = isinstance(prompts_per_round, bool) or not isinstance(prompts_per_round, int) or prompts_per_round < 1
        if prompts_per_round is not None and bad:
            raise ValueError(
                f"GSMPairBuilder.prompts_per_round must be an integer >= 1 or None; got {prompts_per_round!r}.")
        self.prompts_per_round, self.tagged = prompts_per_round, tagged
        self.last_stats: dict = {}

    def __call__(self, model, tokenizer, prompts, round_index: int) -> list[dict]:
        missing = [c for c in ("question", "answer", "answer_cot") if c not in prompts.column_names]
        if missing:
            raise ValueError(f"GSMPairBuilder needs GSM rows with question, answer, answer_cot; missing {missing}.")
        if self.prompts_per_round is not None:  # round k takes the k-th window of problems (cycling): new problems
            n = len(prompts)
            start = ((round_index - 1) * self.prompts_per_round) % n
            prompts = prompts.select([(start + i) % n for i in range(min(self.prompts_per_round, n))])
        texts = [gsm_prompt(q) for q in prompts["question"]]
        samples = generate_answers(model, tokenizer, texts, max_new_tokens=self.max_new_tokens,
                                   num_samples=self.num_samples, temperature=self.temperature, top_p=self.top_p,
                                   batch_size=self.batch_size)
        rng = np.random.default_rng([self.seed, round_index])
        k = self.num_samples
        golds = list(prompts["answer_cot"])
        if self.tagged:
            from ..rewards import tagged_solution

            golds = [tagged_solution(g, a) for g, a in zip(golds, prompts["answer"])]
        rows = [pair_from_samples(p, samples[i * k : (i + 1) * k], a, g, rng)
                for i, (p, a, g) in enumerate(zip(texts, prompts["answer"], golds))]
        self.last_stats = {
            "sample_accuracy": float(np.mean([r["sample_accuracy"] for r in rows])),
            **{f"pairs_{s}": sum(r["source"] == s for r in rows) for s in ("policy", "gold", "perturbed")},
        }
        return rows


def gsm_pair_builder(num_samples: int = 4, max_new_tokens: int = 128, temperature: float = 1.0,
                     seed: Optional[int] = 0, **kwargs) -> GSMPairBuilder:
    """A ``GSMPairBuilder`` (the offline pair builder of ``MrDPOTrainer`` for GSM-style problems)."""
    return GSMPairBuilder(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed or 0, **kwargs)
