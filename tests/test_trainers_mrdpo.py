"""MrDPOTrainer (video-SALMONN 2's multi-round DPO) on a tiny random Llama with a character tokenizer: a fresh adapter
is an identity at every round start, the loss is the official formula, a round's merge keeps the policy's logits,
non-mergeable / quantized / bad-pair inputs fail in one line, and resuming from a saved round ends identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA_TARGETS, make_config, method_params, randomize_adapter, rel_err, tiny_llama
from datasets import Dataset
from peft import LoraConfig

from peft_ext.data.preference import GSMPairBuilder, pair_from_samples, perturb_final_number
from peft_ext.trainers import MrDPOConfig, MrDPOTrainer
from peft_ext.trainers._tiny import char_tokenizer

PROMPTS = Dataset.from_dict({"q": ["1+3", "2+2", "3+1", "0+4"]})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run faster on one thread


INPUT = torch.tensor([[5, 20, 21, 40, 41, 50, 7, 8], [9, 30, 31, 32, 60, 61, 62, 63]])


def static_builder(model, tokenizer, prompts, round_index):
    return [{"prompt": f"Q{q}=", "chosen": "4.", "rejected": "5!", "ground_truth": "four"} for q in prompts["q"]]


def greedy_builder(model, tokenizer, prompts, round_index):
    """Pairs that depend on the current policy: its greedy 3-character continuation is 'rejected'."""
    from peft_ext.data.preference import generate_answers

    texts = [f"Q{q}=" for q in prompts["q"]]
    outs = generate_answers(model, tokenizer, texts, max_new_tokens=3)
    return [{"prompt": t, "chosen": "4.", "rejected": o or "x"} for t, o in zip(texts, outs)]


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), rounds=1, steps_per_round=1, per_device_train_batch_size=2,
                learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
                disable_tqdm=True, save_rounds=False)
    return MrDPOConfig(**{**base, **kw})


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)


def logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT).logits.float()


def _lora_sb_identity():
    from peft_ext.registry import get_method

    return pytest.param(get_method("lora_sb"), {"r_init_std": 0.0}, id="lora_sb-r_init_std0")


@pytest.mark.parametrize(
    "spec,overrides",
    [pytest.param(None, {}, id="lora")] + [pytest.param(*p.values, {}, id=p.id) for p in method_params(
        lambda s: s.mergeable)] + [_lora_sb_identity()],
)
def test_round_identity_and_merge(spec, overrides, tmp_path):
    config = lora() if spec is None else make_config(spec, LLAMA_TARGETS, **overrides)
    args = make_args(tmp_path)
    starts = getattr(config, "starts_at_identity", None)
    if spec is not None and not (starts() if callable(starts) else spec.identity_at_init):  # ref would not = policy
        with pytest.raises(ValueError, match=f"fresh {spec.name} adapter changes the output"):
            MrDPOTrainer(model=tiny_llama(), args=args, peft_config=config, pair_builder=static_builder,
                         train_dataset=PROMPTS, processing_class=char_tokenizer())
        return
    seen = {}

    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            policy = logits(model)
            with model.disable_adapter():
                seen["ref_start"] = logits(model)
            seen["policy_start"] = policy

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["policy_end"] = logits(model)
            with model.disable_adapter():
                seen["ref_end"] = logits(model)

    def after_merge(trainer, k, record):
        seen["merged"] = logits(trainer.model)
        with trainer.model.disable_adapter():
            seen["merged_base"] = logits(trainer.model)

    trainer = MrDPOTrainer(model=tiny_llama(), args=args, peft_config=config, pair_builder=static_builder,
                           train_dataset=PROMPTS, processing_class=char_tokenizer(), callbacks=[Probe()])
    trainer.train(on_round_end=after_merge)
    assert torch.equal(seen["policy_start"], seen["ref_start"])  # fresh adapter: exactly the reference
    assert rel_err(seen["policy_end"], seen["ref_end"]) > 1e-4  # the round trained something (else merge is trivial)
    assert rel_err(seen["merged_base"], seen["policy_end"]) <= 1e-5  # fp32 merge promise
    assert torch.equal(seen["merged"], seen["merged_base"])  # next round starts at an identity again


@pytest.mark.parametrize("with_ground_truth", [True, False])
def test_loss_is_official_formula(with_ground_truth, tmp_path):
    """L = −log σ(β[(πc − πr) − (refc − refr)]) + λ·CE with log-probs summed over completion tokens and CE the
    token-mean NLL of the ground truth (else chosen), recomputed from plain logits in float64."""
    beta, lam = 0.1, 0.1
    rows = [{"prompt": "Q1+3=", "chosen": "4 ok", "rejected": "5", "ground_truth": "four!"},
            {"prompt": "Q22=", "chosen": "x", "rejected": "yz!", "ground_truth": "44"}]
    if not with_ground_truth:
        rows = [{k: v for k, v in r.items() if k != "ground_truth"} for r in rows]
    tok = char_tokenizer()
    trainer = MrDPOTrainer(model=tiny_llama().double(), args=make_args(tmp_path, beta=beta, ce_weight=lam),
                           peft_config=lora(), pair_builder=static_builder, train_dataset=PROMPTS, processing_class=tok)
    model = trainer.model.eval()
    randomize_adapter(model, seed=3, std=0.2)  # policy != reference, else the DPO term is log 2 whatever the code
    data = trainer._prepare_dataset(Dataset.from_list(rows), tok, trainer.args, "train")
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()

    def seq_logp(text_prompt, completion, enabled=True):
        ids = tok(text=text_prompt + completion)["input_ids"]
        n_prompt = len(tok(text=text_prompt)["input_ids"])
        x = torch.tensor([ids])
        with torch.no_grad():
            if enabled:
                lp = model(input_ids=x).logits.log_softmax(-1)
            else:
                with model.disable_adapter():
                    lp = model(input_ids=x).logits.log_softmax(-1)
        token_lp = lp[0, :-1].gather(-1, x[0, 1:, None])[:, 0]
        return token_lp[n_prompt - 1 :]  # log p of each completion token

    eos = tok.eos_token
    dpo, ce_tokens = [], []
    for r in rows:
        pc, pr = seq_logp(r["prompt"], r["chosen"] + eos).sum(), seq_logp(r["prompt"], r["rejected"] + eos).sum()
        rc = seq_logp(r["prompt"], r["chosen"] + eos, enabled=False).sum()
        rr = seq_logp(r["prompt"], r["rejected"] + eos, enabled=False).sum()
        dpo.append(-F.logsigmoid(beta * ((pc - pr) - (rc - rr))))
        target = r.get("ground_truth", r["chosen"]) + eos
        ce_tokens.append(-seq_logp(r["prompt"], target))
    expected = torch.stack(dpo).mean() + lam * torch.cat(ce_tokens).mean()  # CE: mean over all tokens of the batch
    assert abs(loss - expected.item()) <= 1e-6  # float64 throughout: only summation-order rounding remains
    assert abs(expected.item() - np.log(2) - lam * torch.cat(ce_tokens).mean().item()) > 1e-3  # DPO term not trivial


@pytest.mark.parametrize("spec", method_params(lambda s: not s.mergeable))
def test_non_mergeable_refused(spec, tmp_path):
    with pytest.raises(ValueError, match=f"{spec.name} cannot be merged") as info:
        MrDPOTrainer(model=tiny_llama(), args=make_args(tmp_path), peft_config=make_config(spec, LLAMA_TARGETS),
                     pair_builder=static_builder, train_dataset=PROMPTS, processing_class=char_tokenizer())
    assert "\n" not in str(info.value)


def test_quantized_base_refused(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    q = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    with pytest.raises(ValueError, match="refuses a quantized base.*merge_dequantized=True"):
        MrDPOTrainer(model=q, args=make_args(tmp_path), peft_config=lora(), pair_builder=static_builder,
                     train_dataset=PROMPTS, processing_class=char_tokenizer())


def test_merge_dequantized_trains_on_a_full_precision_copy(tmp_path):
    """merge_dequantized=True: the 4-bit base is dequantized once; the rounds train and merge into that fp32 copy, so
    the merged model equals the pre-merge policy to fp32 rounding and no weight is quantized any more."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    q = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    reference = logits(q)
    seen = {}

    def after_merge(trainer, k, record):
        seen["merged"] = logits(trainer.model)

    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            seen["policy_end"] = logits(model)

    trainer = MrDPOTrainer(model=q, args=make_args(tmp_path, merge_dequantized=True), peft_config=lora(),
                           pair_builder=static_builder, train_dataset=PROMPTS, processing_class=char_tokenizer(),
                           callbacks=[Probe()])
    base = trainer.model.get_base_model()
    assert not any("Linear4bit" in type(m).__name__ for m in base.modules())
    with trainer.model.disable_adapter():  # the dequantized copy computes what the 4-bit model computed
        assert rel_err(logits(trainer.model), reference) <= 1e-5
    trainer.train(on_round_end=after_merge)
    assert rel_err(seen["policy_end"], reference) > 1e-4  # the round trained
    assert rel_err(seen["merged"], seen["policy_end"]) <= 1e-5  # fp32 merge into the dequantized weights


@pytest.mark.parametrize(
    "builder,match",
    [
        (lambda m, t, p, k: [{"question": "a", "good": "b", "bad": "c"}],
         r"missing \['prompt', 'chosen', 'rejected'\]"),
        (lambda m, t, p, k: [], "no preference pairs in round 1"),
        (lambda m, t, p, k: [{"prompt": "a", "chosen": 1, "rejected": "c"}], "'chosen' must hold text"),
        (lambda m, t, p, k: "pairs", "must return a Dataset or a list of dicts"),
    ],
    ids=["wrong-columns", "empty-round", "not-text", "not-rows"],
)
def test_bad_pair_builder_one_line(builder, match, tmp_path):
    trainer = MrDPOTrainer(model=tiny_llama(), args=make_args(tmp_path), peft_config=lora(), pair_builder=builder,
                           train_dataset=PROMPTS, processing_class=char_tokenizer())
    with pytest.raises(ValueError, match=match) as info:
        trainer.train()
    assert "\n" not in str(info.value)


def test_resume_from_round_matches_uninterrupted(tmp_path):
    """Two rounds in one go vs a new trainer that replays the saved round 1 and trains round 2: same weights."""

    def run(out, resume=None):
        args = make_args(tmp_path, output_dir=str(out), rounds=2, save_rounds=True)
        trainer = MrDPOTrainer(model=tiny_llama(), args=args, peft_config=lora(), pair_builder=greedy_builder,
                               train_dataset=PROMPTS, processing_class=char_tokenizer())
        trainer.train(resume_from_round=resume)
        return trainer

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "full", resume=1)  # a new trainer on the base model, from the saved round 1
    a = dict(full.model.get_base_model().named_parameters())
    b = dict(resumed.model.get_base_model().named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.base_layer.weight"],
                           tiny_llama().model.layers[0].self_attn.q_proj.weight)  # the rounds changed the base
    assert [r["round"] for r in resumed.round_history] == [1, 2]


def test_rebirth_sfts_the_pre_dpo_model_on_mrdpo_answers(tmp_path):
    from peft_ext.data.preference import generate_answers

    trainer = MrDPOTrainer(model=tiny_llama(), args=make_args(tmp_path), peft_config=lora(),
                           pair_builder=static_builder, train_dataset=PROMPTS, processing_class=char_tokenizer())
    trainer.train()
    prompts = ["Q1+3=", "Q2+2="]
    mrdpo_answers = generate_answers(trainer.model, trainer.processing_class, prompts, max_new_tokens=3)
    sft = trainer.rebirth(Dataset.from_dict({"prompt": prompts}), max_new_tokens=3)
    assert trainer.rebirth_data["completion"] == mrdpo_answers  # the SFT targets are the mrDPO model's answers
    with trainer.model.disable_adapter():
        base_now = logits(trainer.model)
    assert torch.equal(base_now, logits(tiny_llama()))  # ... and the SFT ran on the pre-DPO weights
    assert sft.state.global_step == 1 and list(trainer.model.peft_config) == ["default"]


def test_gsm_pairs_rules():
    rng = np.random.default_rng(0)
    gold = "3 + 4 = 7\n#### 7"
    p = pair_from_samples("Q", ["so 7", "it is 8"], "7", gold, rng)
    assert (p["chosen"], p["rejected"], p["source"]) == ("so 7", "it is 8", "policy")
    p = pair_from_samples("Q", ["8", "9"], "7", gold, rng)
    assert p["chosen"] == gold and p["source"] == "gold" and p["rejected"].startswith("3 + 4 = 7\n#### ")
    assert p["rejected"] != gold
    p = pair_from_samples("Q", ["<answer>7</answer>"], "7", gold, rng)
    assert p["source"] == "perturbed" and p["rejected"] != p["chosen"]
    from peft_ext.data.gsm import score_gsm

    for _ in range(20):  # a perturbed answer is always wrong and never negative
        wrong = perturb_final_number("so #### 2.5", "2.5", rng)
        assert score_gsm(wrong, "2.5") == 0.0 and not wrong.split("####")[1].strip().startswith("-")


def test_gsm_builder_rows():
    """The builder samples the model it is given and returns one well-formed pair per problem."""
    prompts = Dataset.from_dict({"question": ["1+1?", "2+3?"], "answer": ["2", "5"],
                                 "answer_cot": ["1+1=2\n#### 2", "2+3=5\n#### 5"]})
    builder = GSMPairBuilder(num_samples=2, max_new_tokens=4, temperature=1.0)
    torch.manual_seed(0)
    rows = builder(tiny_llama(seed=0), char_tokenizer(), prompts, 1)
    assert len(rows) == 2
    assert sum(builder.last_stats[f"pairs_{s}"] for s in ("policy", "gold", "perturbed")) == 2
    assert [r["ground_truth"] for r in rows] == ["1+1=2\n#### 2", "2+3=5\n#### 5"]
    assert [r["prompt"] for r in rows] == ["Question: 1+1?\nAnswer:\n", "Question: 2+3?\nAnswer:\n"]
    for r in rows:
        assert r["chosen"] != r["rejected"]
        if r["source"] == "gold":
            assert r["chosen"] == r["ground_truth"]
    with pytest.raises(ValueError, match="missing \\['answer_cot'\\]"):
        builder(tiny_llama(), char_tokenizer(), prompts.remove_columns("answer_cot"), 1)


def _recipe(tmp_path, name, out, *overrides):
    from pathlib import Path

    from peft_ext.recipe import load_recipe
    from peft_ext.trainers._tiny import save_tiny_char_model

    model = tmp_path / "char-llama"
    if not model.is_dir():
        save_tiny_char_model(model)
    root = Path(__file__).resolve().parents[1]
    return load_recipe(root / "recipes" / f"{name}.yaml", [f"output_dir={out}", f"model.name={model}",
                                                           "data.max_length=512", "evaluation.generate=1",
                                                           "evaluation.baseline=false", *overrides])


def test_mrdpo_recipe_writes_rounds_and_resumes_identically(tmp_path):
    """The tiny recipe (on a character-level tiny Llama): metrics per round, plot, adapter; a run that stopped after
    round 1 and resumes ends with the same round-2 adapter as the uninterrupted run."""
    import json
    import shutil

    from safetensors.torch import load_file

    from peft_ext.trainers.run import train_recipe

    full = tmp_path / "full"
    metrics = train_recipe(_recipe(tmp_path, "tiny_mrdpo", full), quiet=True)
    assert [r["stage"] for r in metrics["stages"]] == ["round-1", "round-2"]
    for r in metrics["stages"]:
        assert r["pairs"] == 2 and {"margin", "reward_accuracy", "ce_loss", "sample_accuracy"} <= set(r)
        assert set(r["eval"]) >= {"accuracy", "format_rate", "mean_length", "repetition"} and r["eval"]["n"] == 1
    assert json.loads((full / "metrics.json").read_text())["budget"]["rounds"] == 2
    assert (full / "results.png").read_bytes()[:4] == b"\x89PNG"
    final = load_file(full / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in load_file(full / "rounds" / "round-2" /
                                                                "adapter_model.safetensors").items())
    cut = tmp_path / "cut"  # what a run killed during round 2 leaves: round 1's adapter and the history
    shutil.copytree(full / "rounds" / "round-1", cut / "rounds" / "round-1")
    (cut / "stages").mkdir(parents=True)
    history = json.loads((full / "stages" / "history.json").read_text())
    (cut / "stages" / "history.json").write_text(json.dumps({"records": history["records"][:1]}))
    resumed = train_recipe(_recipe(tmp_path, "tiny_mrdpo", cut), resume=True, quiet=True)
    assert [r["stage"] for r in resumed["stages"]] == ["round-1", "round-2"]
    a = load_file(full / "rounds" / "round-2" / "adapter_model.safetensors")
    b = load_file(cut / "rounds" / "round-2" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["stages"][1]["eval"] == metrics["stages"][1]["eval"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["data.name=toy_sentiment", "evaluation.generate=0"], "needs model.task 'causal_lm' and data.name 'gsm'"),
        (["trainer.name=ppo"], r"trainer.name must be one of \['sft', 'dpo', 'mrdpo', 'grpo', 'sft_grpo', .*got 'ppo'"),
        (["trainer.rounds=0"], "trainer.rounds must be an integer >= 1"),
        (["trainer.args.betta=0.2"], r"Unknown key 'trainer.args.betta'. Did you mean 'beta'\?"),
        (["trainer.rewards=[accuracy]"], "trainer.rewards applies to grpo and sft_grpo"),
        (["training.max_steps=3"], "training.max_steps does not apply with trainer 'mrdpo'"),
    ],
)
def test_mrdpo_recipe_errors_one_line(overrides, match, tmp_path):
    from peft_ext.recipe import RecipeError

    with pytest.raises(RecipeError, match=match) as info:
        _recipe(tmp_path, "tiny_mrdpo", tmp_path / "out", *overrides)
    assert "\n" not in str(info.value)
