"""Octo-planner recipe (peft_ext/trainers/planner.py, https://arxiv.org/abs/2406.18082): the merge-rule invariants
(linear with one adapter at weight 1 is that adapter, cat is the sum of ΔW, svd at full rank is cat), merging a
peft-ext tuner through its exported LoRA, BFCL function subsets and plan targets, the planner -> action pipeline
(n steps -> n calls, malformed plans), recipe validation, and the tiny recipe end to end with resume."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_ext  # noqa: F401  (registers the tuners)
from peft_ext.merging import add_merged_adapter
from peft_ext.merging.merge import PEFT_COMBINATIONS
from peft_ext.trainers import planner as pl

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny_planner.yaml"


def _bfcl_missing() -> str:
    try:
        from peft_ext.data.bfcl import bfcl_data_dir

        bfcl_data_dir()
    except (FileNotFoundError, ImportError) as exc:
        return str(exc)
    return ""


needs_bfcl = pytest.mark.skipif(bool(_bfcl_missing()), reason=f"bfcl-eval data missing: {_bfcl_missing()}")


def _tiny_llama(dtype=torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).to(dtype)


def _lora_model(specs: dict) -> PeftModel:
    """A float64 tiny Llama with LoRA adapters ``{name: (r, alpha)}``, B not zero (init_lora_weights=False)."""
    model = None
    for i, (name, (r, alpha)) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        if model is None:
            model = get_peft_model(_tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def _deltas(model, adapter: str) -> dict:
    from peft.tuners.lora import LoraLayer

    return {n: m.get_delta_weight(adapter) for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


# float64 throughout: the merged and summed ΔW differ only by summation order, ~1e-16 relative; 1e-12 leaves room.
ATOL = 1e-12


def test_linear_one_adapter_weight_one_is_that_adapter():
    """PEFT puts sqrt(weight × scaling) on A and on B as a float32 tensor, so the product matches to float32's
    rounding of that factor (2 × 2^-24 relative), not float64's: rtol 3e-7."""
    model = _lora_model({"d1": (4, 8)})
    add_merged_adapter(model, ["d1"], "linear", "merged", weights=[1.0])
    want, got = _deltas(model, "d1"), _deltas(model, "merged")
    assert want.keys() == got.keys() and len(want) == 4  # q_proj, v_proj in 2 layers
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=3e-7, atol=ATOL)
    ids = torch.randint(2, 128, (1, 7))
    model.set_adapter("d1")
    out_a = model(ids).logits
    model.set_adapter("merged")
    # the logits see the same relative error through O(1) activations; near-zero logits need an absolute floor
    torch.testing.assert_close(model(ids).logits, out_a, rtol=3e-7, atol=1e-7)


def test_cat_is_the_sum_of_delta_w():
    """Different ranks and scalings; weights scale each ΔW (cat folds weight × scaling into A)."""
    model = _lora_model({"d1": (2, 4), "d2": (4, 4), "d3": (3, 9)})
    weights = [1.0, 0.5, -2.0]
    add_merged_adapter(model, ["d1", "d2", "d3"], "cat", "merged", weights=weights)
    assert model.peft_config["merged"].r == 2 + 4 + 3
    got = _deltas(model, "merged")
    parts = [_deltas(model, a) for a in ("d1", "d2", "d3")]
    for name in got:
        total = sum(w * p[name] for w, p in zip(weights, parts))
        torch.testing.assert_close(got[name], total, rtol=0, atol=ATOL)


def test_svd_at_full_rank_is_cat():
    model = _lora_model({"d1": (2, 4), "d2": (4, 8)})
    add_merged_adapter(model, ["d1", "d2"], "cat", "cat")
    add_merged_adapter(model, ["d1", "d2"], "svd", "svd", svd_rank=6)
    cat, svd = _deltas(model, "cat"), _deltas(model, "svd")
    for name in cat:
        # an SVD round trip in float64: ~1e-15 relative to the largest entry; 1e-10 absolute is far above that
        torch.testing.assert_close(svd[name], cat[name], rtol=0, atol=1e-10)
    # below full rank the svd merge is the best rank-k approximation, no longer equal
    add_merged_adapter(model, ["d1", "d2"], "svd", "svd2", svd_rank=2)
    assert any((_deltas(model, "svd2")[n] - cat[n]).abs().max() > 1e-6 for n in cat)


@pytest.mark.parametrize("rule", [r for r in PEFT_COMBINATIONS if r not in ("linear", "cat", "svd")])
def test_every_peft_rule_gives_a_lora_planner(rule):
    """Each remaining rule builds a LoRA of the expected rank whose ΔW differs from both inputs; at density 1 the
    pruning rules keep everything (dare rescales by 1/density = 1), so dare_linear and magnitude_prune equal linear."""
    model = _lora_model({"d1": (4, 8), "d2": (4, 8)})
    add_merged_adapter(model, ["d1", "d2"], rule, "merged", density=0.5, svd_rank=3)
    assert model.peft_config["merged"].r == (3 if rule.endswith("svd") else 4)
    got, a, b = _deltas(model, "merged"), _deltas(model, "d1"), _deltas(model, "d2")
    assert all(torch.isfinite(v).all() for v in got.values())
    assert all((got[n] - a[n]).abs().max() > 1e-6 and (got[n] - b[n]).abs().max() > 1e-6 for n in got)
    if rule in ("dare_linear", "magnitude_prune"):
        add_merged_adapter(model, ["d1", "d2"], "linear", "linear")
        add_merged_adapter(model, ["d1", "d2"], rule, "dense", density=1.0)
        lin, dense = _deltas(model, "linear"), _deltas(model, "dense")
        for n in lin:
            torch.testing.assert_close(dense[n], lin[n], rtol=0, atol=ATOL)


def test_merge_refuses_bad_input():
    model = _lora_model({"d1": (4, 8), "d2": (2, 8)})
    with pytest.raises(ValueError, match="rule must be one of"):
        add_merged_adapter(model, ["d1"], "mean", "m")
    with pytest.raises(ValueError, match=r"adapters \['zz'\] not found"):
        add_merged_adapter(model, ["d1", "zz"], "cat", "m")
    with pytest.raises(ValueError, match="exists already"):
        add_merged_adapter(model, ["d1"], "cat", "d2")
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        add_merged_adapter(model, ["d1"], "cat", "m", weights=[1, 2])


def test_tuner_merges_through_its_exported_lora(tmp_path):
    """A peft-ext tuner (block_lora) exports to LoRA at a rank >= rank ΔW, so cat of the exports is the sum of the
    tuner's own ΔW. convert_to_lora runs its SVD in float32: 1e-5 relative to the largest entry covers that."""
    base = _tiny_llama()
    clean = copy.deepcopy(base)
    config = peft_ext.BlockLoraConfig(r=4, n_blocks=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    native = {}
    folders = {}
    for i, name in enumerate(("x", "y")):
        model = get_peft_model(copy.deepcopy(base), config)
        torch.manual_seed(20 + i)
        for pname, p in model.named_parameters():
            if ".default" in pname:
                p.data.normal_(0, 0.1)
        native[name] = {n: d.detach() for n, d in _deltas_any(model).items()}
        folders[name] = pl.export_lora(model, tmp_path / name, rank=4)
    merged = PeftModel.from_pretrained(clean, str(folders["x"]), adapter_name="x")
    merged.load_adapter(str(folders["y"]), adapter_name="y")
    add_merged_adapter(merged, ["x", "y"], "cat", "planner")
    got = _deltas(merged, "planner")
    assert got.keys() == native["x"].keys()
    for n in got:
        want = native["x"][n] + native["y"][n]
        torch.testing.assert_close(got[n], want, rtol=0, atol=1e-5 * want.abs().max().item())


def _deltas_any(model, adapter="default") -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m.get_delta_weight(adapter) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _lego_landed() -> bool:
    try:
        from peft_ext.merging import add_lego_adapter  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _lego_landed(), reason="peft_ext.merging.add_lego_adapter not available")
def test_lego_rule_dispatches_to_lora_lego():
    """With k = Σr clusters and no reweighting every rank-1 unit is its own cluster: the LEGO merge is the sum of ΔW
    (METHODS.md §6.1). The default (dual reweighting, k = r) gives a rank-r LoRA that is not that sum."""
    model = _lora_model({"d1": (2, 4), "d2": (2, 4)})
    add_merged_adapter(model, ["d1", "d2"], "lego", "merged", lego_k=4, lego_reweight=())
    got, a, b = _deltas(model, "merged"), _deltas(model, "d1"), _deltas(model, "d2")
    for n in got:
        # float64 factors; the clustering only permutes and copies rank-1 units, so only summation order differs
        torch.testing.assert_close(got[n], a[n] + b[n], rtol=0, atol=1e-9)
    add_merged_adapter(model, ["d1", "d2"], "lego", "lego")
    assert model.peft_config["lego"].r == 2
    assert any((_deltas(model, "lego")[n] - a[n] - b[n]).abs().max() > 1e-6 for n in got)


# ---------------------------------------------------------------------------------------------------- data, plans
FUNCTIONS = json.dumps([
    {"name": "math.factorial", "description": "Factorial of a number.",
     "parameters": {"type": "dict", "properties": {"number": {"type": "integer"}}, "required": ["number"]}},
    {"name": "get_stock_price", "description": "Price of a stock.",
     "parameters": {"type": "dict", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]}},
])
ANSWER = json.dumps([{"math.factorial": {"number": [5]}}, {"get_stock_price": {"ticker": ["AAPL"]}},
                     {"math.factorial": {"number": [7]}}])


def test_function_subsets_and_plan_targets():
    from peft_ext.data import bfcl

    assert bfcl.function_domain("math.factorial") == "math"
    assert bfcl.function_domain({"name": "get_stock_price", "description": ""}) == "finance"
    assert bfcl.function_domain({"name": "lookup", "description": "Find a lawsuit by its case number."}) == "society"
    assert bfcl.function_domain("frobnicate") == bfcl.OTHER_DOMAIN
    row = {"functions": FUNCTIONS, "answer": ANSWER}
    assert bfcl.function_subset(row) == "math"  # two math calls, one finance
    assert bfcl.plan_target(ANSWER) == "1. Call math.factorial\n2. Call get_stock_price\n3. Call math.factorial"
    assert pl.plan_success(bfcl.plan_target(ANSWER), ANSWER, FUNCTIONS) == 1.0
    # any order (BFCL's parallel checker is order-free), but the counts must match
    assert pl.plan_success("1. Call get_stock_price\n2. math.factorial\n3. math.factorial", ANSWER, FUNCTIONS) == 1.0
    assert pl.plan_success("1. Call math.factorial\n2. Call get_stock_price", ANSWER, FUNCTIONS) == 0.0
    assert pl.plan_success("1. Call math.factorial\n2. Call nothing\n3. x", ANSWER, FUNCTIONS) == 0.0


@needs_bfcl
def test_every_row_has_a_subset_and_its_own_plan_succeeds():
    from peft_ext.data import bfcl

    rows = [r for c in ("simple_python", "multiple", "parallel", "parallel_multiple") for r in bfcl._category_rows(c)]
    known = set(bfcl.FUNCTION_DOMAINS) | {bfcl.OTHER_DOMAIN}
    subsets = [bfcl.function_subset(r) for r in rows]
    assert set(subsets) == known
    multi = [r for r in rows if len(json.loads(r["answer"])) > 1]
    assert len(multi) > 300  # parallel / parallel_multiple
    assert all(pl.plan_success(bfcl.plan_target(r["answer"]), r["answer"], r["functions"]) == 1.0 for r in rows)
    assert all(bfcl.plan_target(r["answer"]).count("\n") == len(json.loads(r["answer"])) - 1 for r in multi)


# ---------------------------------------------------------------------------------------------------- pipeline
def _pipeline_model():
    from peft_ext.trainers._tiny import char_tokenizer

    tok = char_tokenizer()
    model = get_peft_model(_tiny_llama(torch.float32), LoraConfig(r=2, target_modules=["q_proj"]),
                           adapter_name="planner")
    model.add_adapter("action", LoraConfig(r=2, target_modules=["q_proj"]))
    return model, tok


def test_pipeline_acts_once_per_step(one_thread):
    """A 3-step plan gives 3 action generations, all with the action adapter, one prompt per step."""
    model, tok = _pipeline_model()
    pipe = pl.PlannerActionPipeline(model, tok, action_tokens=3)
    seen = []
    real = model.generate

    def spy(*args, **kwargs):
        seen.append((model.active_adapter, kwargs["input_ids"].shape[0]))
        return real(*args, **kwargs)

    model.generate = spy
    plan = "1. Call math.factorial\n2. Call get_stock_price\n3. Call math.factorial"
    result = pipe.act("What is 5! and the AAPL price, then 7!?", FUNCTIONS, plan)
    assert seen == [("action", 3)]
    assert len(result.steps) == len(result.outputs) == 3
    assert [s.function for s in result.steps] == ["math.factorial", "get_stock_price", "math.factorial"]
    seen.clear()
    pipe("What is 5!?", FUNCTIONS)  # plans with the planner adapter first
    assert seen[0] == ("planner", 1)


def test_pipeline_assembles_and_scores_the_calls(monkeypatch):
    """Scripted generations: the planner's plan, then one call per step; BFCL's checker scores the assembled calls."""
    model, tok = _pipeline_model()
    pipe = pl.PlannerActionPipeline(model, tok)
    script = {"planner": ["1. Call math.factorial\n2. Call get_stock_price\n3. Call math.factorial"],
              "action": ["math.factorial(number=5)", "get_stock_price(ticker='AAPL')", "math.factorial(number=7)"]}
    monkeypatch.setattr(pipe, "_generate", lambda adapter, prompts, n: script[adapter][: len(prompts)])
    result = pipe("What is 5! and the AAPL price, then 7!?", FUNCTIONS)
    assert result.error is None and len(result.calls) == 3
    assert result.score(ANSWER) == 1.0
    script["action"][2] = "math.factorial(number=8)"
    assert pipe("q", FUNCTIONS).score(ANSWER) == 0.0
    script["action"][1] = "I cannot do that"
    bad = pipe("q", FUNCTIONS)
    assert len(bad.calls) == 2 and "step(s) [2]" in bad.error


@pytest.mark.parametrize("plan", ["", "I would call some functions.", "1.\n2)", "Steps: none"])
def test_malformed_plan_gives_an_empty_result(plan, monkeypatch):
    model, tok = _pipeline_model()
    pipe = pl.PlannerActionPipeline(model, tok)
    monkeypatch.setattr(pipe, "_generate", lambda *a: pytest.fail("no generation for a plan without steps"))
    result = pipe.act("q", FUNCTIONS, plan)
    assert result.calls == [] and result.outputs == [] and "no numbered steps" in result.error
    assert result.score(ANSWER) == 0.0
    assert pl.plan_success(plan, ANSWER, FUNCTIONS) == 0.0


def test_pipeline_clear_errors(monkeypatch):
    model, tok = _pipeline_model()
    with pytest.raises(ValueError, match=r"action='act' is not an adapter"):
        pl.PlannerActionPipeline(model, tok, action="act")
    with pytest.raises(ValueError, match="needs a PeftModel"):
        pl.PlannerActionPipeline(torch.nn.Linear(2, 2), tok)
    pipe = pl.PlannerActionPipeline(model, tok, max_steps=2)
    with pytest.raises(ValueError, match="functions is not valid JSON"):
        pipe.act("q", "{not json", "1. Call f")
    with pytest.raises(ValueError, match="plan must be a string"):
        pl.parse_plan(None)
    monkeypatch.setattr(pipe, "_generate", lambda adapter, prompts, n: ["math.factorial(number=1)"] * len(prompts))
    long = pipe.act("q", FUNCTIONS, "\n".join(f"{i}. Call math.factorial" for i in range(1, 6)))
    assert len(long.calls) == 2 and "acted on the first 2" in long.error


# ---------------------------------------------------------------------------------------------------- recipe
@pytest.mark.parametrize("override, message", [
    ("trainer.args.merge_rule=mean", "merge_rule must be one of"),
    ("trainer.args.subsets=[math,cooking]", "unknown or repeated subset"),
    ("trainer.args.density=0", "density must be a number in"),
    ("trainer.args.merge_weights=[1,2,3]", "merge_weights"),
    ("trainer.args.steps=3", "trainer.args.steps"),
    ("method.name=mola", "exports to LoRA"),
    ("method.config.use_dora=true", "use_dora"),
    ("training.max_steps=3", "training"),
])
def test_recipe_validation_names_the_field(override, message):
    from peft_ext.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, [override])


def _planner_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "planner" / "adapter_model.safetensors"))


@needs_bfcl
def test_tiny_recipe_end_to_end_and_resume(tmp_path, one_thread, capsys):
    """recipes/tiny_planner.yaml through ``peft-ext train``: every adapter saved, the planner equals the TIES merge of
    the saved subset adapters, metrics and plot written; a run killed after its first subset adapter and resumed
    retrains only the rest and ends with the same planner and metrics as the uninterrupted run."""
    from peft_ext import cli
    from peft_ext.recipe import load_recipe

    full = tmp_path / "full"
    assert cli.main(["train", str(RECIPE), "--set", f"output_dir={full}", "--quiet"]) == 0
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["trained_this_run"] == ["subsets/math", "subsets/finance", "action"]
    assert set(metrics["plan_success"]["planner"]) == {"math", "finance"}
    assert set(metrics["plan_success"]["single"]["math"]) == {"math", "finance"}
    assert metrics["end_to_end"]["rows"] == 2 and len(metrics["training"]["subsets/math"]) == 2
    assert (full / "results.png").stat().st_size > 0
    # the saved planner is the TIES merge (seeded) of the saved subset adapters
    recipe = load_recipe(RECIPE, [f"output_dir={full}"])
    model, _ = pl.load_adapters(recipe, {s: full / "subsets" / s for s in ("math", "finance")})
    add_merged_adapter(model, ["math", "finance"], "ties", "again", seed=recipe.seed)
    saved = _planner_weights(full)
    again = {k.replace(".again.", "."): v for k, v in model.state_dict().items() if ".again." in k}
    assert saved.keys() == again.keys() and len(saved) == 8  # lora_A, lora_B of q_proj, v_proj in 2 layers
    assert all(torch.equal(saved[k], again[k]) for k in saved)

    resumed = tmp_path / "resumed"
    shutil.copytree(full / "subsets" / "math", resumed / "subsets" / "math")  # what a run killed later left
    assert cli.main(["train", str(RECIPE), "--set", f"output_dir={resumed}", "--quiet", "--resume"]) == 0
    again_metrics = json.loads((resumed / "metrics.json").read_text())
    assert again_metrics["trained_this_run"] == ["subsets/finance", "action"]
    assert again_metrics["plan_success"] == metrics["plan_success"]
    assert again_metrics["end_to_end"]["examples"] == metrics["end_to_end"]["examples"]
    first, second = _planner_weights(full), _planner_weights(resumed)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_shipped_planner_recipes_validate():
    from peft_ext.recipe import load_recipe

    for name in ("planner_bfcl.yaml", "tiny_planner.yaml"):
        recipe = load_recipe(RECIPE.parent / name)
        assert recipe.trainer.name == "planner"
        assert pl.planner_config_from_recipe(recipe).merge_rule in pl.MERGE_RULES
