"""Running recipes: build the model and data a recipe names, train with ``transformers.Trainer``, evaluate (at every
DyLoRA rank where asked), save the adapter with its model card, and write metrics, a results table and a plot.

Used by the ``peft-ext`` command (``peft_ext/cli.py``); each function also works from Python. One module per job:
``data`` (models, data sets, collators, the method's config), ``training`` (``train``, resume, ``save_adapter``),
``evaluation`` (``evaluate``, rank sweeps, generated answers) and ``reporting`` (table, plot, card facts, comparison
records).
"""

from .data import (
    build_peft_config,
    causal_lm_pairs,
    load_data,
    load_raw_splits,
    load_tokenizer_and_model,
    toy_sentiment,
)
from .evaluation import evaluate, evaluate_model, generation_accuracy, ranks_to_evaluate
from .reporting import (
    TINY_MODELS,
    card_run_facts,
    comparison_record,
    derive_method_recipe,
    format_table,
    plot_ranks,
)
from .training import save_adapter, train

__all__ = [
    "TINY_MODELS",
    "build_peft_config",
    "card_run_facts",
    "causal_lm_pairs",
    "comparison_record",
    "derive_method_recipe",
    "evaluate",
    "evaluate_model",
    "format_table",
    "generation_accuracy",
    "load_data",
    "load_raw_splits",
    "load_tokenizer_and_model",
    "plot_ranks",
    "ranks_to_evaluate",
    "save_adapter",
    "toy_sentiment",
    "train",
]
