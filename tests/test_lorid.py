"""LoRID (arXiv 2508.13037): the consistency loop on synthetic predictions (both scorings, the stop, the cap), the
offline knowledge has no number of its problem, bad settings name their field, and the tiny recipe runs end to end
and resumes to the same result."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from peft_ext.recipe import RecipeError, load_recipe, recipe_from_dict, to_dict
from peft_ext.trainers.lorid import (
    LoRIDConfig,
    canonical_number,
    consistency_loop,
    lorid_answer,
    majority_vote,
    score_problem,
    train_lorid_recipe,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread


# ---------------------------------------------------------------------------------------------------- the loop
def test_loop_equals_a_hand_computed_result():
    ir = ["5", None, "7.0", "8"]
    dr = ["6", "7", "5", "8"]
    # j=1: S_IR={5} S_DR={6}; j=2: S_IR={5} S_DR={6,7}; j=3: S_IR={5,7} S_DR={5,6,7} -> meet {5,7}, stop at 3.
    # Votes among IR_1 DR_1 IR_2 DR_2 IR_3 DR_3 = 5 6 - 7 7 5: 5 and 7 twice each; 5 appeared first -> strict 5.
    out = consistency_loop(ir, dr, label="7", max_iterations=20)
    assert out["iterations"] == 3 and out["met"]
    assert out["intersection"] == ["5", "7"]
    assert out["strict_answer"] == "5"
    assert out["optimistic"] is True  # official: any answer of the intersection equals the label
    assert out["strict"] is False
    five = consistency_loop(ir, dr, label="5.00")
    assert five["optimistic"] and five["strict"]
    six = consistency_loop(ir, dr, label="6")  # 6 was a DR answer, but never met by IR
    assert not six["optimistic"] and not six["strict"]


def test_loop_strict_majority_counts_votes_seen_so_far():
    # meet at j=2 on {3, 9}; 9 has three votes (IR_1, DR_1... no: DR_2 and IR_2), 3 has two
    ir = ["3", "9", "1"]
    dr = ["9", "3", "1"]
    out = consistency_loop(ir, dr, label="9")
    # j=1: S_IR={3} S_DR={9}: no. j=2: S_IR={3,9} S_DR={9,3} -> meet {3,9}; votes 3 (IR_1, DR_2) 9 (DR_1, IR_2): tie,
    # 3 appeared first (IR_1) -> strict 3; the label 9 is in the intersection -> optimistic correct, strict wrong.
    assert (out["iterations"], out["strict_answer"], out["optimistic"], out["strict"]) == (2, "3", True, False)


def test_loop_stops_at_the_first_intersection():
    ir = ["4", "1", "2"]
    dr = ["4", "2", "1"]
    out = consistency_loop(ir, dr, label="1")
    assert out["iterations"] == 1 and out["intersection"] == ["4"]
    assert not out["optimistic"]  # the later agreement on 1 and 2 is never reached
    changed = consistency_loop(ir[:1] + ["77", "78"], dr[:1] + ["77", "79"], label="1")
    assert {k: changed[k] for k in out} == out  # what comes after the stop does not matter


def test_loop_respects_the_iteration_cap():
    ir = ["1", "2", "3", "4", "5"]
    dr = ["6", "7", "8", "9", "5"]  # first meet at j=5
    capped = consistency_loop(ir, dr, label="5", max_iterations=4)
    assert capped == {"iterations": 4, "met": False, "intersection": [], "strict_answer": None, "optimistic": False,
                      "strict": False}
    assert consistency_loop(ir, dr, label="5", max_iterations=5)["iterations"] == 5
    assert consistency_loop(ir, dr, label="5", max_iterations=5)["optimistic"]
    with pytest.raises(ValueError, match="max_iterations"):
        consistency_loop(ir, dr, max_iterations=0)
    with pytest.raises(ValueError, match="IR answers"):
        consistency_loop(ir, dr[:3])


def test_loop_matches_a_prefix_set_definition_on_random_predictions():
    """A second, independent definition: the stop is the first j whose prefix sets intersect."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        pool = [None, ""] + [str(x) for x in range(4)]
        ir = [rng.choice(pool) for _ in range(n)]
        dr = [rng.choice(pool) for _ in range(n)]
        cap = rng.randint(1, 8)
        out = consistency_loop(ir, dr, label="2", max_iterations=cap)
        stop = next((j for j in range(1, min(cap, n) + 1)
                     if ({a for a in ir[:j] if a} & {a for a in dr[:j] if a})), None)
        assert out["met"] == (stop is not None)
        assert out["iterations"] == (stop if stop is not None else min(cap, n))
        if stop is not None:
            meet = {a for a in ir[:stop] if a} & {a for a in dr[:stop] if a}
            assert set(out["intersection"]) == meet
            assert out["optimistic"] == ("2" in meet)
            assert out["strict"] == (out["strict_answer"] == "2") and out["strict_answer"] in meet


def test_majority_vote_and_answer_extraction():
    assert majority_vote([None, "3", "4", "4", "3"]) == "3"  # tie 2-2: first appearance wins
    assert majority_vote(["3", "4", "4"]) == "4"
    assert majority_vote([None, None]) is None
    assert lorid_answer("So 12 * 3 = 36.\n--> 1,234 END") == "1234"  # the official marker wins over the last number
    assert lorid_answer("she pays 3 then 4.50 dollars") == "4.5"
    assert lorid_answer("no number here") is None and lorid_answer("") is None
    assert canonical_number("44.0") == canonical_number("44") == "44"
    assert canonical_number("abc") is None


def test_score_problem_counts_samples_at_equal_budget():
    config = LoRIDConfig(max_iterations=3, majority_samples=9)
    samples = {"ir_greedy_answer": "5", "ir_answers": ["1", "2", "5", "5", "5", "1", "9", "9", "9"],
               "dr_answers": ["7", "5", "3"]}
    rec = score_problem(samples, "5", config)
    # loop: j=1 {1}&{7}; j=2 {1,2}&{7,5}; j=3 {1,2,5}&{7,5,3} -> meet {5} at j=3 -> 9 samples used
    assert rec["lorid"]["iterations"] == 3 and rec["lorid"]["samples_used"] == 9
    assert rec["ir_majority_matched"] == {"answer": "5", "correct": True, "samples": 9}
    # fixed budget of 9 IR samples: 5 and 9 three times each, 5 first
    assert rec["ir_majority_fixed"]["answer"] == "5"
    assert rec["ir_greedy"] == {"answer": "5", "correct": True, "samples": 1}


# ---------------------------------------------------------------------------------------------------- knowledge
def test_knowledge_has_no_number_of_its_problem():
    import re

    from peft_ext.data import load_gsm
    from peft_ext.data.gsm_knowledge import gsm_knowledge

    rows = list(load_gsm(n_train=120, n_test=8)["train"])
    number = re.compile(r"\d+(?:\.\d+)?")
    for row in rows:
        rules = gsm_knowledge(row)
        assert rules, row["template"]
        text = "\n".join(rules)
        in_problem = set(number.findall(row["question"].replace(",", ""))) | {row["answer"]}
        assert not in_problem & set(number.findall(text)), (row["template"], text)
        assert not re.search(r"\d", text), text  # stronger: no digit at all
    # the steps keep the template's structure: most rules name generator variables in brackets
    assert sum("[" in "\n".join(gsm_knowledge(r)) for r in rows) >= 0.95 * len(rows)


# ---------------------------------------------------------------------------------------------------- validation
def _tiny(tmp_path: Path, **args) -> dict:
    data = to_dict(load_recipe(ROOT / "recipes" / "tiny_lorid.yaml"))
    data["output_dir"] = str(tmp_path)
    data["trainer"] = {"name": "lorid", "args": {**data["trainer"]["args"], **args}}
    return data


@pytest.mark.parametrize("field,value", [("temperature", 0), ("top_p", 1.5), ("max_iterations", 0),
                                         ("majority_samples", -1), ("lr_scheduler_type", "zigzag"), ("steps", 1.5),
                                         ("eval_time_budget_s", 0)])
def test_bad_settings_name_their_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"LoRIDConfig.{field}"):
        LoRIDConfig(**{field: value})
    with pytest.raises(RecipeError, match=field):
        recipe_from_dict(_tiny(tmp_path, **{field: value}))


def test_recipe_refuses_what_does_not_apply(tmp_path):
    data = _tiny(tmp_path, temprature=1.0)
    with pytest.raises(RecipeError, match="temprature"):
        recipe_from_dict(data)
    data = _tiny(tmp_path)
    data["evaluation"]["generate"] = 2
    with pytest.raises(RecipeError, match="evaluation.generate"):
        recipe_from_dict(data)
    data = _tiny(tmp_path)
    data["data"]["name"] = "movie_reviews"
    with pytest.raises(RecipeError, match="data.name"):
        recipe_from_dict(data)


# ---------------------------------------------------------------------------------------------------- end to end
class _Stop(Exception):
    pass


def test_tiny_recipe_end_to_end_and_resume_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    from peft_ext.trainers.run import train_recipe

    whole = recipe_from_dict(_tiny(tmp_path / "whole"))
    metrics = train_recipe(whole, quiet=True)  # the dispatch `peft-ext train` uses
    out = Path(whole.output_dir)
    assert (out / "metrics.json").is_file() and (out / "results.png").stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text())["table"] == metrics["table"]
    config = LoRIDConfig(**whole.trainer.args)
    assert [r["method"] for r in metrics["table"]][0] == "IR greedy" and len(metrics["table"]) == 5
    assert len(metrics["per_problem"]) == config.eval_problems
    assert metrics["budget"]["samples_generated_per_problem"] == 1 + 3 * 3 + 2 * 3
    for record in metrics["per_problem"]:
        loop = record["lorid"]
        assert loop["samples_used"] == 3 * loop["iterations"] and 1 <= loop["iterations"] <= config.max_iterations
        assert len(record["samples"]["ir_answers"]) == 9 and len(record["samples"]["dr_answers"]) == 3
    weights = {}
    for name in ("ir", "kg", "dr"):
        state = load_file(str(out / "adapters" / name / "adapter_model.safetensors"))
        # LoRA's B starts at zero: trained adapters have moved it
        assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k), name
        weights[name] = state
    assert not torch.equal(*(next(v for k, v in weights[n].items() if "lora_B" in k) for n in ("ir", "dr")))
    assert {r["module"] for r in metrics["history"]} == {"ir", "kg", "dr"}

    # interrupted after KG, then resumed: DR is the only adapter trained again, and everything equals the whole run
    cut = recipe_from_dict(_tiny(tmp_path / "cut"))

    def stop_after_kg(name):
        if name == "kg":
            raise _Stop

    with pytest.raises(_Stop):
        train_lorid_recipe(cut, quiet=True, on_trained=stop_after_kg)
    assert not (Path(cut.output_dir) / "adapters" / "dr").exists()
    resumed = train_lorid_recipe(cut, resume=True, quiet=True)
    assert resumed["budget"]["trained_now"] == ["dr"]
    for name in ("ir", "kg", "dr"):
        again = load_file(str(Path(cut.output_dir) / "adapters" / name / "adapter_model.safetensors"))
        assert again.keys() == weights[name].keys()
        assert all(torch.equal(again[k], weights[name][k]) for k in again), name
    assert resumed["table"] == metrics["table"]
    assert resumed["per_problem"] == metrics["per_problem"]
    assert resumed["history"] == metrics["history"]


def test_examples_whose_prompt_fills_max_length_are_skipped_loudly():
    from peft_ext.trainers._tiny import char_tokenizer
    from peft_ext.trainers.lorid import encode_examples

    tok = char_tokenizer()
    with pytest.warns(UserWarning, match="1 of 2 examples skipped"):
        rows = encode_examples([("a" * 10, "b"), ("aaa", "bcdefgh")], tok, max_length=8)
    assert len(rows) == 1 and len(rows[0]["input_ids"]) == 8  # cut to max_length, the loss on the target only
    assert rows[0]["labels"][:3] == [-100] * 3 and rows[0]["labels"][3] == tok.convert_tokens_to_ids("b")
    with pytest.raises(ValueError, match="LoRIDConfig.max_length"):
        encode_examples([("a" * 10, "b")], tok, max_length=8)
