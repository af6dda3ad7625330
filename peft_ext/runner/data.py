"""The model and data a recipe names: offline models and tiny random test models, tokenised splits, collators and
the PEFT config of the recipe's method."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..recipe import Recipe, method_config_class


TOY_POSITIVE = ["great", "wonderful", "superb", "moving", "delightful", "brilliant", "charming", "fun"]


TOY_NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "bland", "painful"]


TOY_NOUNS = ["film", "movie", "plot", "cast", "script", "ending", "story", "score"]


def toy_sentiment(n: int = 256, seed: int = 0):
    """A tiny synthetic sentiment set ("the plot was great") for fast tests: ``DatasetDict`` train/test."""
    from datasets import Dataset, DatasetDict

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        word = rng.choice(TOY_POSITIVE if label else TOY_NEGATIVE)
        rows.append({"text": f"the {rng.choice(TOY_NOUNS)} was {word}", "label": label})
    cut = int(0.75 * n)
    return DatasetDict(train=Dataset.from_list(rows[:cut]), test=Dataset.from_list(rows[cut:]))


def load_tokenizer_and_model(recipe: Recipe):
    """The tokenizer and the base model the recipe names (offline models or tiny random ones)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BitsAndBytesConfig,
        LlamaConfig,
    )

    from ..data import minilm_path

    spec = recipe.model
    if spec.name in ("minilm", "tiny-bert", "tiny-llama"):
        folder = minilm_path()  # the tiny random models borrow MiniLM's tokenizer: offline and small
    elif spec.name == "smollm2":
        from ..data.smollm import smollm2_path

        folder = smollm2_path()
    else:
        folder = Path(spec.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    auto = AutoModelForSequenceClassification if spec.task == "seq_cls" else AutoModelForCausalLM
    extra = {"num_labels": spec.num_labels} if spec.task == "seq_cls" else {}
    torch.manual_seed(recipe.seed)
    if spec.name in ("tiny-bert", "tiny-llama"):
        common = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, pad_token_id=tokenizer.pad_token_id, **extra)
        if spec.name == "tiny-bert":
            config = BertConfig(**common)
        else:
            config = LlamaConfig(num_key_value_heads=2, **common)
        model = auto.from_config(config)
    else:
        quant = None
        if spec.quantization == "4bit":
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        elif spec.quantization == "8bit":
            quant = BitsAndBytesConfig(load_in_8bit=True)
        model = auto.from_pretrained(folder, quantization_config=quant, dtype=torch.float32, **extra)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def load_raw_splits(recipe: Recipe):
    """The recipe's train and eval splits as loaded (text columns), cut to ``max_train`` / ``max_eval``."""
    spec = recipe.data
    if spec.name == "movie_reviews":
        from ..data import load_movie_reviews

        data = load_movie_reviews(seed=spec.seed)
    elif spec.name == "toy_sentiment":
        data = toy_sentiment(seed=spec.seed)
    elif spec.name == "gsm":
        from ..data.gsm import load_gsm

        data = load_gsm(seed=spec.seed)
    else:
        from ..data.bfcl import load_bfcl

        data = load_bfcl(seed=spec.seed)
    train, test = data["train"], data["test"]
    if spec.max_train is not None:
        train = train.select(range(min(spec.max_train, len(train))))
    if spec.max_eval is not None:
        test = test.select(range(min(spec.max_eval, len(test))))
    return train, test


def load_data(recipe: Recipe, tokenizer):
    """Tokenized train and eval splits of the recipe's data set, and the eval split as loaded (for generation)."""
    spec = recipe.data
    train, test = load_raw_splits(recipe)
    if recipe.model.task == "seq_cls":
        def encode(batch):
            out = tokenizer(batch["text"], truncation=True, max_length=spec.max_length)
            out["labels"] = batch["label"]
            return out
    else:
        def encode(batch):
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for prompt, target in causal_lm_pairs(spec.name, batch):
                p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                a = tokenizer(target + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
                ids = (p + a)[: spec.max_length]
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(([-100] * len(p) + a)[: spec.max_length])  # loss on the answer only
            return out
    columns = train.column_names
    return (
        train.map(encode, batched=True, remove_columns=columns),
        test.map(encode, batched=True, remove_columns=columns),
        test,
    )


def causal_lm_pairs(data_name: str, batch: dict) -> list[tuple[str, str]]:
    """(prompt, target) pairs of a batch: GSM question → worked solution ending in ``#### answer``; BFCL question
    with the function specs → one valid call (``ground_truth_call``)."""
    if data_name == "gsm":
        return [(f"Question: {q}\nAnswer: ", cot) for q, cot in zip(batch["question"], batch["answer_cot"])]
    from ..data.bfcl import ground_truth_call

    return [
        (f"Functions: {fns}\nRequest: {q}\nCall: ", ground_truth_call(ans))
        for q, fns, ans in zip(batch["question"], batch["functions"], batch["answer"])
    ]


def build_peft_config(recipe: Recipe):
    """The PEFT config of the recipe's method, with the task type of its model."""
    from peft import TaskType

    cls = method_config_class(recipe.method.name)
    kwargs = dict(recipe.method.config)
    kwargs.setdefault("task_type", TaskType.SEQ_CLS if recipe.model.task == "seq_cls" else TaskType.CAUSAL_LM)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"method.config: {exc}") from exc


def _takes_prompt_mask(recipe: Recipe) -> bool:
    """Whether the recipe's method reads a per-call ``prompt_mask=`` (prompt-aware LoRA, WavLLM)."""
    if recipe.method.name == "lora":
        return False
    from ..registry import get_method

    return "prompt_mask" in get_method(recipe.method.name).model_cls.call_args


class _PromptMaskCollator:
    """Pads a batch and adds ``prompt_mask``: the instruction tokens a prompt-aware method pools over.

    Causal LM: the tokens without a loss (label -100) that are not padding, i.e. the question; the answer never shapes
    its own scale. Sequence classification: every token of the input (the label is not a token).
    """

    def __init__(self, inner, causal: bool):
        self.inner, self.causal = inner, causal

    def __call__(self, features):
        batch = self.inner(features)
        attended = batch["attention_mask"].bool()
        batch["prompt_mask"] = (batch["labels"].eq(-100) & attended) if self.causal else attended
        return batch


def _collator(recipe: Recipe, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if recipe.model.task == "seq_cls":
        inner = DataCollatorWithPadding(tokenizer)
    else:
        inner = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    return _PromptMaskCollator(inner, causal=recipe.model.task != "seq_cls") if _takes_prompt_mask(recipe) else inner
