"""Trans-LoRA (peft_ext.generation.translora): the rejection sampler, seed exclusion, teacher labels, the end-to-end
transfer between two model families (a tiny BERT classifier teacher, a tiny Llama student), and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_ext.generation.translora import (
    TransLoraConfig,
    class_logits,
    clean_candidates,
    filter_synthetic,
    generate_synthetic,
    label_with_teacher,
    train_discriminator,
    train_student,
    transfer,
)
from peft_ext.trainers._tiny import char_tokenizer

SEEDS = ["a fine film, warm and funny", "dull and far too long", "the cast is superb", "a mess from start to end"]
TEXTS = ["great fun", "boring plot", "lovely acting", "awful sound", "so so", "tense and smart", "weak ending",
         "bright cast", "flat jokes", "a joy", "a chore", "moving score"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def tiny_bert(num_labels: int = 2, seed: int = 0):
    """A tiny random BERT sequence classifier over the character tokenizer's 98 ids (vocabulary 128)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def tiny_target(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def small_config(**overrides):
    # Label words whose first characters differ: the character tokenizer scores a word by its first character.
    kwargs = dict(num_synthetic=8, max_generated=32, generation_batch_size=8, max_new_tokens=12, min_chars=1,
                  label_words=["n", "p"], student_steps=6, student_batch_size=4, disc_steps=4, disc_batch_size=4,
                  r=2, lora_alpha=4, disc_r=2, target_modules=["q_proj", "v_proj"], student_lr=5e-3)
    return TransLoraConfig(**{**kwargs, **overrides})


def one_by_one(model, tok, texts, label_words=None, prompt="{text}"):
    """Class logits computed for each text alone (no padding): the reference the batched functions must match."""
    with torch.no_grad():
        return torch.cat([class_logits(model, tok, [t], label_words, prompt) for t in texts])


def test_rejection_sampler_keeps_exactly_what_the_discriminator_accepts():
    tok = char_tokenizer()
    disc = tiny_bert(seed=1)
    p_alone = one_by_one(disc, tok, TEXTS).softmax(-1)[:, 1]
    ordered = p_alone.sort().values
    gaps = ordered[1:] - ordered[:-1]
    k = int(gaps[3:-3].argmax()) + 3  # a threshold inside the widest gap near the middle: both sides non-empty
    assert gaps[k] > 1e-4  # far wider than the batched-vs-alone difference (float32 padding noise, ~1e-7)
    threshold = float(ordered[k] + ordered[k + 1]) / 2
    kept, p_real = filter_synthetic(disc, tok, TEXTS, small_config(acceptance_threshold=threshold, eval_batch_size=5))
    torch.testing.assert_close(p_real, p_alone, atol=1e-5, rtol=0)  # padding and batching change nothing
    assert kept == [t for t, p in zip(TEXTS, p_alone.tolist()) if p >= threshold]
    assert 0 < len(kept) < len(TEXTS)
    assert filter_synthetic(disc, tok, TEXTS, small_config(acceptance_threshold=0.0))[0] == TEXTS
    assert filter_synthetic(disc, tok, TEXTS, small_config(acceptance_threshold=1.0))[0] == []


class CopyingGenerator(nn.Module):
    """A generator that answers each prompt with a scripted continuation: seed copies (verbatim, re-cased and
    re-spaced, inside a longer text, a fragment), duplicates and new texts, i.e. the leaks the cleaning must stop."""

    SCRIPT = [" " + SEEDS[0], " THE  Cast is superb", " oh, dull and far too long indeed", " warm and funny",
              " a brand new line", " a brand new line", " another fresh one", " and a third"]

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def generate(self, input_ids, attention_mask, **kwargs):
        rows = []
        for i in range(input_ids.shape[0]):
            text = self.SCRIPT[(self.calls + i) % len(self.SCRIPT)] + "\nText: more"
            rows.append(torch.tensor(self.tok(text, add_special_tokens=False)["input_ids"]))
        self.calls += input_ids.shape[0]
        width = max(len(r) for r in rows)
        new = torch.full((len(rows), width), self.tok.pad_token_id)
        for i, r in enumerate(rows):
            new[i, : len(r)] = r
        return torch.cat([input_ids, new], dim=1)


def test_no_seed_example_reaches_the_synthetic_training_set(tmp_path):
    tok = char_tokenizer()
    texts, raw = generate_synthetic(CopyingGenerator(tok), tok, SEEDS, 8, small_config())
    assert raw == 8
    assert texts == ["a brand new line", "another fresh one", "and a third"]
    # The whole pipeline: a generator that copies seeds, every candidate accepted (no discriminator).
    result = transfer(tiny_bert(), tok, tiny_target(), tok, SEEDS, small_config(num_synthetic=6, max_generated=16),
                      generator=CopyingGenerator(tok), generator_tokenizer=tok)
    seeds = [" ".join(s.lower().split()) for s in SEEDS]
    assert result.texts and all(s not in t.lower() and t.lower() not in s for t in result.texts for s in seeds)
    assert result.generated == 16 and result.candidates == result.kept == len(result.texts) == 3


def test_generation_with_a_real_causal_lm():
    tok = char_tokenizer()
    config = small_config(min_chars=1)
    texts, raw = generate_synthetic(tiny_target(), tok, SEEDS, 8, config)
    again, _ = generate_synthetic(tiny_target(), tok, SEEDS, 8, config)
    assert raw == 8 and 0 < len(texts) <= 8 and again == texts  # seeded: the same candidates twice
    assert all("\n" not in t and t == " ".join(t.split()) for t in texts)
    assert clean_candidates(texts + SEEDS, SEEDS) == texts


@pytest.mark.parametrize("kind", ["classifier", "causal"])
def test_teacher_labels_are_what_the_teacher_predicts(kind):
    tok = char_tokenizer()
    if kind == "classifier":
        teacher, config, words, prompt = tiny_bert(seed=2), small_config(), None, "{text}"
        logits = one_by_one(teacher, tok, TEXTS)
        with torch.no_grad():  # centre the head's bias so that both classes occur among the texts
            teacher.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    else:
        words, prompt = ["n", "p"], "T: {text}\nS:"
        teacher, config = tiny_target(seed=3), small_config(teacher_label_words=words, teacher_prompt=prompt)
    logits = one_by_one(teacher, tok, TEXTS, words, prompt)
    labels, probs = label_with_teacher(teacher, tok, TEXTS, config)
    assert labels == logits.argmax(-1).tolist()
    torch.testing.assert_close(probs, logits.softmax(-1), atol=1e-5, rtol=0)
    if kind == "classifier":
        assert set(labels) == {0, 1}


def test_transfer_trains_and_writes_a_plain_lora(tmp_path):
    """Teacher: tiny BERT classifier; discriminator: a LoRA on another tiny BERT; student: LoRA on a tiny Llama with
    label words. The written folder loads with plain PEFT (no peft-ext import needed for LoRA) and reproduces the
    student's scores."""
    from peft import PeftModel

    tok = char_tokenizer()
    config = small_config(acceptance_threshold=0.3)
    real = TEXTS  # stands in for the task data the source adapter was trained on
    synthetic, _ = generate_synthetic(tiny_target(), tok, SEEDS, 8, small_config(seed=7))
    disc = train_discriminator(tiny_bert(seed=4), tok, real, synthetic, config)
    assert len(disc.discriminator_losses) == config.disc_steps
    result = transfer(tiny_bert(seed=5), tok, tiny_target(), tok, SEEDS, config, disc, tok, output_dir=tmp_path / "s")
    assert 0 < result.kept <= config.num_synthetic and result.kept <= result.candidates <= result.generated
    _, p_real = filter_synthetic(disc, tok, result.texts, config)
    assert bool((p_real >= config.acceptance_threshold).all())  # every training text was accepted
    labels, _ = label_with_teacher(tiny_bert(seed=5), tok, result.texts, config)
    assert result.labels == labels
    losses = result.student.student_losses
    assert len(losses) == config.student_steps and all(torch.isfinite(torch.tensor(losses)))
    loaded = PeftModel.from_pretrained(tiny_target(), tmp_path / "s").eval()
    expected = one_by_one(result.student, tok, result.texts, config.label_words, config.student_prompt)
    got = one_by_one(loaded, tok, result.texts, config.label_words, config.student_prompt)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the adapter moved the scores away from the base model's
    base = one_by_one(tiny_target(), tok, result.texts, config.label_words, config.student_prompt)
    assert (got - base).abs().max() > 1e-3


def test_student_learns_the_teacher_labels():
    """Hard targets on a fixed set: the student's agreement with them rises to all of them (a tiny model can
    memorise 8 short texts in 40 steps at lr 1e-2)."""
    tok = char_tokenizer()
    texts, labels = TEXTS[:8], [0, 1, 1, 0, 0, 1, 0, 1]
    config = small_config(student_steps=40, student_lr=1e-2, r=4, lora_alpha=8)
    student = train_student(tiny_target(), tok, texts, labels, config)
    predicted = one_by_one(student, tok, texts, config.label_words, config.student_prompt).argmax(-1).tolist()
    assert predicted == labels
    assert student.student_losses[-1] < student.student_losses[0]


def _one_line_error(exc_info, *words):
    message = str(exc_info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_synthetic=0), "num_synthetic"),
        (dict(num_synthetic=10, max_generated=5), "max_generated"),
        (dict(acceptance_threshold=1.5), "acceptance_threshold"),
        (dict(temperature=0), "temperature"),
        (dict(example_template="Text: no placeholder\n"), "example_template"),
        (dict(example_template="{text}\n"), "example_template"),
        (dict(student_prompt="no placeholder"), "student_prompt"),
        (dict(label_words=["positive"]), "label_words"),
        (dict(disc_batch_size=1), "disc_batch_size"),
        (dict(soft_targets="yes"), "soft_targets"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as exc_info:
        TransLoraConfig(**kwargs)
    _one_line_error(exc_info, f"TransLoraConfig.{field}")


@pytest.mark.parametrize("seeds, word", [([], "seeds"), (["ok", "  "], "seeds"), ("a single string", "seeds")])
def test_bad_seeds(seeds, word):
    tok = char_tokenizer()
    with pytest.raises(ValueError) as exc_info:
        transfer(tiny_bert(), tok, tiny_target(), tok, seeds, small_config())
    _one_line_error(exc_info, word)
    with pytest.raises(ValueError) as exc_info:
        generate_synthetic(tiny_target(), tok, seeds, 4, small_config())
    _one_line_error(exc_info, word)


def test_mismatched_label_spaces():
    tok = char_tokenizer()
    with pytest.raises(ValueError) as exc_info:  # a 3-class teacher, a 2-word student
        transfer(tiny_bert(num_labels=3), tok, tiny_target(), tok, SEEDS, small_config())
    _one_line_error(exc_info, "label spaces differ", "3 classes", "TransLoraConfig.label_words")
    with pytest.raises(ValueError) as exc_info:  # label words the student's tokenizer cannot tell apart
        transfer(tiny_bert(), tok, tiny_target(), tok, SEEDS, small_config(label_words=["no", "nay"]))
    _one_line_error(exc_info, "TransLoraConfig.label_words", "first token")
    with pytest.raises(ValueError) as exc_info:  # soft targets with 3 columns for a 2-class student
        train_student(tiny_target(), tok, TEXTS[:2], torch.full((2, 3), 1 / 3), small_config())
    _one_line_error(exc_info, "label spaces differ", "TransLoraConfig.label_words")
    with pytest.raises(ValueError) as exc_info:  # a discriminator must have two classes
        train_discriminator(tiny_bert(num_labels=3), tok, TEXTS, TEXTS, small_config())
    _one_line_error(exc_info, "num_labels=2")


def test_student_adapter_that_cannot_become_a_lora():
    import peft_ext

    tok = char_tokenizer()
    mola = peft_ext.MolaConfig(target_modules=["q_proj"])
    with pytest.raises(ValueError) as exc_info:
        transfer(tiny_bert(), tok, tiny_target(), tok, SEEDS, small_config(), student_peft_config=mola)
    _one_line_error(exc_info, "student_peft_config", "MOLA", "LoRA")
    with pytest.raises(ValueError) as exc_info:
        train_student(tiny_target(), tok, TEXTS[:2], [0, 1], small_config(), peft_config="lora")
    _one_line_error(exc_info, "student_peft_config")


def test_upstream_adapter_that_cannot_become_a_lora():
    from peft import IA3Config

    tok = char_tokenizer()
    ia3 = IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[], task_type="CAUSAL_LM")
    with pytest.raises(ValueError) as exc_info:
        train_student(tiny_target(), tok, TEXTS[:2], [0, 1], small_config(), peft_config=ia3)
    _one_line_error(exc_info, "student_peft_config", "IA3")


def test_lora_convertible_student_is_written_as_a_plain_lora(tmp_path):
    """A DyLoRA student (rank 2) is saved through save_as_lora at rank 2: its ΔW has rank <= 2, so the plain LoRA
    reproduces its scores up to float32 SVD error (atol 1e-4 on logits of magnitude ~1)."""
    import json

    from peft import PeftModel

    import peft_ext
    from peft_ext.generation.translora import save_student

    tok = char_tokenizer()
    config = small_config(student_steps=3, student_lr=1e-2)
    student = train_student(tiny_target(), tok, TEXTS[:4], [0, 1, 1, 0], config,
                            peft_config=peft_ext.DyLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    save_student(student, tmp_path / "out", tok, rank=2)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(tiny_target(), tmp_path / "out").eval()
    expected = one_by_one(student, tok, TEXTS, config.label_words, config.student_prompt)
    got = one_by_one(loaded, tok, TEXTS, config.label_words, config.student_prompt)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    base = one_by_one(tiny_target(), tok, TEXTS, config.label_words, config.student_prompt)
    assert (expected - base).abs().max() > 1e-3  # the adapter changed the scores, so the comparison means something
