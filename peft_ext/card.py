"""The model card peft-ext writes for its adapters: Hub metadata, method and paper, loading, data, hyperparameters,
results, framework versions and citations — complete, with no template placeholders and no local paths.

Two writers call ``write_model_card``: the ``save_pretrained`` of a model with a peft-ext adapter (through
``peft_ext.patches``; the card then knows the adapter and its base model) and ``peft-ext train`` (``peft_ext.runner``,
which adds the run: data and split, training arguments, results). The card is rendered from a JSON-able dict of
facts (``model_facts``), kept in a trailing HTML comment, so ``peft-ext push`` can render it again with the Hub
repository id and the base model's Hub id (``render_for_push``).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from ._io import atomic_write_text

MARKER = "<!-- model card written by peft-ext -->"
FACTS_OPEN = "<!-- peft-ext card facts: "
FACTS_CLOSE = " -->"
BLOCK_BEGIN = "<!-- peft-ext:begin -->"  # around peft-ext's sections inside a card the user wrote
BLOCK_END = "<!-- peft-ext:end -->"
TEMPLATE_PLACEHOLDER = "[More Information Needed]"  # huggingface_hub's template, as PEFT writes it
PEFT_EXT_URL = "https://pypi.org/project/peft-ext/"
PIPELINE_TAGS = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation", "TOKEN_CLS": "token-classification",
                 "SEQ_2_SEQ_LM": "text2text-generation", "QUESTION_ANS": "question-answering",
                 "FEATURE_EXTRACTION": "feature-extraction"}
AUTO_CLASSES = {"SEQ_CLS": "AutoPeftModelForSequenceClassification", "CAUSAL_LM": "AutoPeftModelForCausalLM",
                "TOKEN_CLS": "AutoPeftModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
                "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
                "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction"}
TASK_NAMES = {"SEQ_CLS": "sequence classification", "CAUSAL_LM": "causal language modelling",
              "TOKEN_CLS": "token classification", "SEQ_2_SEQ_LM": "sequence-to-sequence generation",
              "QUESTION_ANS": "question answering", "FEATURE_EXTRACTION": "feature extraction"}

# PEFT's own LoRA, which `peft-ext train` also runs (method.name: lora); peft-ext methods come from their MethodSpec.
LORA_METHOD = {
    "name": "lora", "display": "LoRA", "paper_title": "LoRA: Low-Rank Adaptation of Large Language Models",
    "paper_url": "https://arxiv.org/abs/2106.09685", "code_url": "https://github.com/microsoft/LoRA",
    "summary": "PEFT's LoRA: a trainable low-rank update ΔW = (α/r)·B·A beside each frozen target weight.",
    "authors": "Hu, Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and "
               "Wang, Shean and Wang, Lu and Chen, Weizhu",
}
PEFT_BIBTEX = (
    "@misc{peft,\n"
    "  title        = {{PEFT}: State-of-the-art Parameter-Efficient Fine-Tuning methods},\n"
    "  author       = {Sourab Mangrulkar and Sylvain Gugger and Lysandre Debut and Younes Belkada and Sayak Paul and "
    "Benjamin Bossan},\n"
    "  howpublished = {\\url{https://github.com/huggingface/peft}},\n"
    "  year         = {2022}\n"
    "}"
)

# The data sets `peft-ext train` knows: title, Hub data set id where the same data is on the Hub, how it is split.
DATASETS = {
    "movie_reviews": {
        "title": "VADER movie-review snippets", "module": "peft_ext.data.sentiment", "hub_id": None,
        "split": "a seeded split (seed {seed}) of the 10,605 snippets into 80% train and 20% test, duplicates "
                 "removed so that no text is in both",
        "labels": "0 = negative, 1 = positive",
    },
    "toy_sentiment": {
        "title": "toy sentiment (synthetic)", "hub_id": None,
        "description": "256 synthetic sentences 'the <noun> was <adjective>' with 8 positive and 8 negative "
                       "adjectives, made by peft_ext.runner.toy_sentiment for tests.",
        "citation": "", "split": "a seeded draw (seed {seed}): the first 75% train, the rest test",
        "labels": "0 = negative, 1 = positive",
    },
    "gsm": {
        "title": "GSM-Symbolic word problems (reasoning-gym)", "module": "peft_ext.data.gsm", "hub_id": None,
        "split": "generated with seed {seed}: train and test come from disjoint generator seeds",
    },
    "bfcl": {
        "title": "Berkeley Function Calling Leaderboard v4", "module": "peft_ext.data.bfcl",
        "hub_id": "gorilla-llm/Berkeley-Function-Calling-Leaderboard",
        "split": "a seeded split (seed {seed}) into 80% train and 20% test, each question group kept in one split",
    },
}
TRAINING_ARGS = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "optim",
                 "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "seed", "data_seed", "bf16", "fp16",
                 "gradient_checkpointing", "train_sampling_strategy")
_CONFIG_SKIP = {"base_model_name_or_path", "revision", "peft_type", "task_type", "inference_mode", "auto_mapping",
                "peft_version"}


# ----------------------------------------------------------------------------------------------------------- facts


def _jsonable(value):
    """JSON-safe copy of a config value: sets sorted, enums by value, other objects as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(getattr(value, "value", value))


def _no_local_path(value):
    """``value`` unless it is an absolute path or a home-relative one (a card must not leak the machine's paths)."""
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~") or re.match(r"^[A-Za-z]:\\", value)):
        return None
    if isinstance(value, list):
        return [v for v in (_no_local_path(v) for v in value) if v is not None]
    if isinstance(value, dict):
        return {k: _no_local_path(v) for k, v in value.items()}
    return value


def method_info(peft_type: str) -> dict:
    """Name, paper, official code and summary of a peft type: a peft-ext method's spec, PEFT's LoRA, or just the
    name."""
    from .patches import ext_spec

    spec = ext_spec(peft_type)
    if spec is not None:
        return {"name": spec.name, "display": spec.name, "paper_title": spec.paper_title, "paper_url": spec.paper_url,
                "code_url": spec.code_url, "summary": spec.summary, "authors": getattr(spec, "paper_authors", ""),
                "peft_ext": True}
    if str(peft_type).upper() == "LORA":
        return {**LORA_METHOD, "peft_ext": False}
    return {"name": str(peft_type).lower(), "display": str(peft_type), "paper_title": "", "paper_url": "",
            "code_url": "", "summary": f"PEFT's {peft_type} method.", "authors": "", "peft_ext": False}


def _versions() -> dict:
    import huggingface_hub
    import peft
    import torch
    import transformers

    from . import __version__

    versions = {"peft-ext": __version__, "PEFT": peft.__version__, "Transformers": transformers.__version__,
                "PyTorch": torch.__version__}
    for name, module in (("Datasets", "datasets"), ("Tokenizers", "tokenizers")):
        try:
            versions[name] = __import__(module).__version__
        except ImportError:  # pragma: no cover - both are dependencies of transformers / peft-ext
            pass
    versions["huggingface_hub"] = huggingface_hub.__version__
    return versions


def model_facts(model, run: Optional[dict] = None) -> dict:
    """Everything the card says about ``model`` (a ``PeftModel``) and, when given, the training run (see
    ``peft_ext.runner``): JSON-able, without local paths."""
    from .data.models import hub_identity

    adapters = []
    for name, cfg in model.peft_config.items():
        values = _jsonable(cfg.to_dict())
        config = {k: _no_local_path(v) for k, v in sorted(values.items()) if k not in _CONFIG_SKIP and v is not None}
        adapters.append({"name": name, "peft_type": str(getattr(cfg.peft_type, "value", cfg.peft_type)),
                         "config": config})
    first = next(iter(model.peft_config.values()))
    base = model.get_base_model()
    base_name = first.base_model_name_or_path or getattr(base, "name_or_path", None)
    identity = hub_identity(base_name)
    base_config = getattr(base, "config", None)
    quant = getattr(base_config, "quantization_config", None)
    if quant is not None and hasattr(quant, "to_dict"):
        quant = quant.to_dict()
    trainable, total = model.get_nb_trainable_parameters()
    model_tags = [t for t in (getattr(base, "model_tags", None) or []) if isinstance(t, str) and ":" not in t]
    facts = {
        "schema": 1,
        "adapters": adapters,
        "task_type": str(getattr(first.task_type, "value", first.task_type) or ""),
        "base_model": {
            "id": identity.repo_id if identity else None,
            "source": identity.source if identity else "",
            "note": identity.note if identity else "",
            "description": (run or {}).get("base_description", ""),
            "architecture": (getattr(base_config, "architectures", None) or [type(base).__name__])[0],
            "num_labels": getattr(base_config, "num_labels", None),
        },
        "quantization": _no_local_path(_jsonable(quant)) if quant else None,
        "transformers_model": hasattr(base, "config") and hasattr(base, "save_pretrained"),
        "model_tags": model_tags,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "versions": _versions(),
        "year": datetime.now(timezone.utc).year,
        "repo_id": None,
        "run": _no_local_path(_jsonable(run)) if run else None,
    }
    return facts


def dataset_facts(name: str, seed: int, train_rows: int, eval_rows: int, max_length: Optional[int] = None) -> dict:
    """What the card says about a ``peft-ext train`` data set: title, description, citation, Hub id, split."""
    known = DATASETS.get(name, {"title": name, "hub_id": None, "split": "seed {seed}"})
    description, citation = known.get("description", ""), known.get("citation", "")
    if known.get("module"):
        import importlib

        module = importlib.import_module(known["module"])
        description, citation = module.DESCRIPTION, module.CITATION
    return {"name": name, "title": known["title"], "hub_id": known["hub_id"], "description": description,
            "citation": citation, "split": known["split"].format(seed=seed), "labels": known.get("labels", ""),
            "train_rows": int(train_rows), "eval_rows": int(eval_rows), "max_length": max_length}


# ---------------------------------------------------------------------------------------------------------- render


def _arxiv_id(url: str) -> Optional[str]:
    m = re.search(r"arxiv\.org/(?:abs|pdf)/(\d{4}\.\d{4,5})", url or "")
    return m.group(1) if m else None


def bibtex(method: dict) -> str:
    """A BibTeX entry for a method's paper, from its title and arXiv link (and authors where the spec has them)."""
    arxiv = _arxiv_id(method["paper_url"])
    year = f"20{arxiv[:2]}" if arxiv else ""
    key = re.sub(r"[^a-z0-9]", "", method["name"].lower()) + year
    fields = [("title", "{" + method["paper_title"] + "}")]
    if method.get("authors"):
        fields.append(("author", method["authors"]))
    if year:
        fields.append(("year", year))
    if arxiv:
        fields += [("eprint", arxiv), ("archivePrefix", "arXiv")]
    fields.append(("url", method["paper_url"]))
    body = ",\n".join(f"  {k:<13} = {{{v}}}" for k, v in fields)
    return f"@misc{{{key},\n{body}\n}}"


def peft_ext_bibtex(version: str, year: int) -> str:
    """The BibTeX entry of peft-ext itself."""
    return (f"@software{{peft_ext,\n  title   = {{{{peft-ext}}: LoRA-family methods from recent papers as Hugging Face "
            f"{{PEFT}} methods}},\n  version = {{{version}}},\n  year    = {{{year}}},\n"
            f"  url     = {{{PEFT_EXT_URL}}}\n}}")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return "`" + json.dumps(value, ensure_ascii=False) + "`"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _table(rows: list[tuple[str, Any]], head=("field", "value")) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v).replace('|', '&#124;')} |" for k, v in rows]
    return lines


def _methods(facts: dict) -> list[dict]:
    seen, out = set(), []
    for adapter in facts["adapters"]:
        info = method_info(adapter["peft_type"])
        if info["name"] not in seen:
            seen.add(info["name"])
            out.append(info)
    return out


def _result_label(row: dict) -> str:
    return "adapter" if row.get("rank") is None else f"rank {row['rank']}"


def metadata(facts: dict):
    """The card's YAML metadata as ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import EvalResult, ModelCardData

    base_id = facts["base_model"]["id"]
    methods = _methods(facts)
    tags = {"peft", "peft-ext", *facts["model_tags"], *(m["name"] for m in methods)}
    if facts["transformers_model"]:
        tags.add("transformers")
    if any(m["name"] == "lora" for m in methods):
        tags.add("lora")
    if base_id:
        tags.add(f"base_model:adapter:{base_id}")
    run = facts.get("run") or {}
    data = run.get("data") or {}
    pipeline_tag = PIPELINE_TAGS.get(facts["task_type"])
    eval_results = []
    if run.get("results") and pipeline_tag:
        task_name = TASK_NAMES.get(facts["task_type"], pipeline_tag)
        for row in run["results"]:
            if row.get("accuracy") is not None:
                metric, value = "accuracy", row["accuracy"]
            else:
                metric, value = "loss", row["eval_loss"]
            eval_results.append(EvalResult(
                task_type=pipeline_tag, task_name=task_name.capitalize(),
                dataset_type=data.get("hub_id") or data.get("name", "unknown"),
                dataset_name=data.get("title", "evaluation split"), dataset_split="test", metric_type=metric,
                metric_value=round(float(value), 4), metric_name=f"{metric} ({_result_label(row)})"))
    return ModelCardData(
        base_model=base_id, library_name="peft", pipeline_tag=pipeline_tag, tags=sorted(tags),
        datasets=[data["hub_id"]] if data.get("hub_id") else None,
        model_name=facts.get("repo_id") or run.get("name") or f"{methods[0]['name']}-adapter",
        eval_results=eval_results or None,
    )


def _load_lines(facts: dict) -> list[str]:
    task = facts["task_type"]
    base = facts["base_model"]
    where = facts.get("repo_id") or "path/to/adapter"
    names = ", ".join(m["display"] for m in _methods(facts) if m.get("peft_ext"))
    comment = f"  # pip install peft-ext: registers {names} with PEFT" if names else ""
    lines = ["```python"]
    num_labels = base.get("num_labels")
    if task in AUTO_CLASSES and base["id"] and not (task == "SEQ_CLS" and num_labels not in (None, 2)):
        auto = AUTO_CLASSES[task]
        lines += [f"from peft import {auto}{comment}", f'model = {auto}.from_pretrained("{where}")']
    else:
        auto = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM"}.get(
            task, "AutoModel")
        extra = f", num_labels={num_labels}" if task == "SEQ_CLS" and num_labels else ""
        base_ref = f'"{base["id"]}"' if base["id"] else "base_model_folder"
        lines += [f"from transformers import {auto}", f"from peft import PeftModel{comment}",
                  f"base = {auto}.from_pretrained({base_ref}{extra})",
                  f'model = PeftModel.from_pretrained(base, "{where}")']
    lines.append("```")
    if not facts.get("repo_id"):
        lines.append("(`path/to/adapter` is this folder, or its Hub id once pushed with `peft-ext push`.)")
    if not base["id"]:
        lines.append("The base model has no known Hub id: load it from where it was trained (`base_model_folder`); "
                     "`peft-ext push --base-model ID` records the id when the adapter is pushed.")
    return lines


def render_sections(facts: dict) -> list[str]:
    """The card's markdown body (without metadata and without the title)."""
    methods = _methods(facts)
    base = facts["base_model"]
    run = facts.get("run") or {}
    data = run.get("data") or {}
    lines: list[str] = []

    # what the adapter is
    adapter = facts["adapters"][0]
    cfg = adapter["config"]
    shape = ", ".join(f"{k} {cfg[k]}" for k in ("r", "lora_alpha") if k in cfg)
    targets = cfg.get("target_modules")
    on = f" on {', '.join(f'`{t}`' for t in targets)}" if isinstance(targets, list) and targets else ""
    base_text = f"[{base['id']}](https://huggingface.co/{base['id']})" if base["id"] else (
        base.get("description") or f"a local {base['architecture']} without a known Hub id")
    task = TASK_NAMES.get(facts["task_type"])
    kind = ", ".join(f"**{m['display']}**" for m in methods)
    lines.append(f"A {kind} adapter{f' ({shape})' if shape else ''}{on} for {base_text}"
                 f"{f', trained for {task}' if task else ''}"
                 f"{' on ' + data['title'] if data.get('title') else ''} with [peft-ext]({PEFT_EXT_URL}) "
                 f"{facts['versions']['peft-ext']} on PEFT {facts['versions']['PEFT']}.")
    share = 100.0 * facts["trainable_params"] / facts["total_params"] if facts["total_params"] else 0.0
    lines.append(f"It trains {facts['trainable_params']:,} parameters ({share:.2f}% of the "
                 f"{facts['total_params']:,} of the adapted model).")
    if len(facts["adapters"]) > 1:
        lines.append("Adapters in this folder: " + ", ".join(
            f"`{a['name']}` ({method_info(a['peft_type'])['display']})" for a in facts["adapters"]) + ".")
    if base["id"] and (base.get("source") or base.get("note")):
        lines += ["", f"The base weights used in training: {base['source']}"
                      f"{'; ' + base['note'] if base.get('note') else ''}."]
    if facts.get("quantization"):
        lines += ["", "The base model was quantized during training:", ""]
        lines += _table([(k, v) for k, v in facts["quantization"].items() if v not in (None, [], {})])

    # method and paper
    lines += ["", "## Method", ""]
    for m in methods:
        if m["paper_url"]:
            code = f" Official code: {m['code_url']}." if m.get("code_url") else " No official code is public."
            lines.append(f"**{m['display']}** — *{m['paper_title']}* ({m['paper_url']}).{code}")
        else:
            lines.append(f"**{m['display']}** — {m['summary']}")
        if m.get("summary") and m["paper_url"]:
            lines.append(f"{m['summary']}")
        lines.append("")

    # loading
    lines += ["## How to load", "", "```bash", "pip install peft-ext", "```", ""] + _load_lines(facts)
    if facts["task_type"] == "SEQ_CLS" and data.get("labels"):
        lines.append(f"Labels: {data['labels']}.")
    lines += ["", "## peft-ext", ""]
    ext = [f"`{a['peft_type']}`" for a in facts["adapters"] if method_info(a["peft_type"]).get("peft_ext")]
    if ext:
        lines.append(f"The adapter's `peft_type` {', '.join(sorted(set(ext)))} is a method that "
                     f"[peft-ext]({PEFT_EXT_URL}) "
                     "adds to PEFT. Installing peft-ext registers its methods whenever `peft` is imported (no "
                     "`import peft_ext` needed), so `PeftModel` / `AutoPeftModel*` load the adapter as usual; PEFT "
                     "without peft-ext cannot load it.")
    else:
        lines.append(f"Trained with `peft-ext train` ([peft-ext]({PEFT_EXT_URL})); the adapter itself is plain PEFT "
                     "and loads without peft-ext.")

    # data
    if data:
        lines += ["", "## Training data", ""]
        hub_url = f"https://huggingface.co/datasets/{data.get('hub_id')}"
        hub = f" (on the Hub: [{data['hub_id']}]({hub_url}))" if data.get("hub_id") else ""
        lines.append(f"**{data['title']}**{hub}, loaded offline with peft-ext (`data.name: {data['name']}`). "
                     f"{data['description']}")
        if data.get("citation"):
            lines += ["", f"Source: {data['citation']}"]
        cut = f"; inputs truncated to {data['max_length']} tokens" if data.get("max_length") else ""
        lines += ["", f"Split: {data['split']}. This run trained on {data['train_rows']:,} train rows and evaluated "
                      f"on {data['eval_rows']:,} test rows{cut}."]

    # hyperparameters
    lines += ["", "## Training procedure", ""]
    for a in facts["adapters"]:
        title = method_info(a["peft_type"])["display"]
        lines += [f"Adapter `{a['name']}` ({title}, task type `{facts['task_type'] or 'none'}`):", ""]
        lines += _table(list(a["config"].items())) + [""]
    if run.get("training"):
        lines += ["Training arguments (`transformers.Trainer`):", ""]
        lines += _table(list(run["training"].items())) + [""]
    if run.get("train_steps") is not None:
        device = run.get("device") or "cpu"
        lines.append(f"{run['train_steps']} optimizer steps, final training loss {run['train_loss']:.4f}, "
                     f"{run['train_time']:.0f} s on {device}.")
    elif not run:
        lines.append("Saved with `save_pretrained`; the training data and arguments were not recorded "
                     "(`peft-ext train` records them).")

    # results
    if run.get("results"):
        rows = run["results"]
        has_acc = any(r.get("accuracy") is not None for r in rows)
        gen = run.get("generate")
        acc_note = f" Accuracy: scored greedy generations on the first {gen} test rows." if gen else ""
        baseline_note = ""
        if run.get("baseline"):
            baseline_note = " (the untrained row is the base model with the adapter disabled)"
        lines += ["", "## Results", "",
                  f"On the {data.get('eval_rows', 0):,} test rows of {data.get('title', 'the data')}{baseline_note}."
                  f"{acc_note}", ""]
        head = "| evaluated | eval loss |" + (" accuracy |" if has_acc else "")
        lines += [head, "|---|---|" + ("---|" if has_acc else "")]
        table = ([{"label": "untrained", **run["baseline"]}] if run.get("baseline") else []) + [
            {"label": _result_label(r), **r} for r in rows]
        for r in table:
            if has_acc:
                acc = f" {r['accuracy']:.4f} |" if r.get("accuracy") is not None else " – |"
            else:
                acc = ""
            lines.append(f"| {r['label']} | {r['eval_loss']:.4f} |{acc}")
        if any(r.get("rank") is not None for r in rows):
            lines += ["", "Evaluate at rank b with `model.set_rank(b)` (DyLoRA trains every rank 1..r at once)."]

    # versions and citations
    lines += ["", "## Framework versions", ""]
    lines += [f"- {name} {version}" for name, version in facts["versions"].items()]
    lines += ["", "## Citation", "", "```bibtex"]
    entries = [bibtex(m) for m in methods if m.get("paper_url")]
    entries += [peft_ext_bibtex(facts["versions"]["peft-ext"], facts["year"]), PEFT_BIBTEX]
    lines += "\n\n".join(entries).splitlines() + ["```"]
    return lines


def _facts_comment(facts: dict) -> str:
    text = json.dumps(facts, ensure_ascii=False).replace("--", "-\\u002d")  # "--" ends a comment
    return f"{FACTS_OPEN}{text}{FACTS_CLOSE}"


def render_card(facts: dict) -> str:
    """The whole README.md: YAML metadata, title, sections, and the facts as a trailing HTML comment."""
    base = facts["base_model"]["id"]
    methods = _methods(facts)
    title = f"{' + '.join(m['display'] for m in methods)} adapter" + (f" for {base}" if base else "")
    if facts.get("repo_id"):
        title = f"{facts['repo_id']}: {title}"
    body = "\n".join([MARKER, "", f"# {title}", ""] + render_sections(facts))
    return f"---\n{metadata(facts).to_yaml()}\n---\n\n{body}\n\n{_facts_comment(facts)}\n"


def read_facts(text: str) -> Optional[dict]:
    """The facts a peft-ext card keeps in its trailing comment, or None (not a peft-ext card)."""
    start = text.rfind(FACTS_OPEN)
    if start < 0:
        return None
    end = text.find(FACTS_CLOSE, start + len(FACTS_OPEN))
    try:
        return json.loads(text[start + len(FACTS_OPEN): end])
    except ValueError:
        return None


def _is_ours_or_template(text: str) -> bool:
    return MARKER in text or TEMPLATE_PLACEHOLDER in text


# ----------------------------------------------------------------------------------------------------------- write


def write_model_card(model, output_dir, run: Optional[dict] = None, update: Optional[Callable] = None) -> str:
    """Write peft-ext's card for ``model`` into ``output_dir/README.md`` (atomically); returns the text.

    A card that peft-ext wrote before, or PEFT's empty template, is replaced. A card the user wrote is kept: PEFT's
    own update (``update(model, output_dir)``, PEFT's ``create_or_update_model_card``) runs on it, its metadata gets
    peft-ext's keys, and peft-ext's sections go between ``<!-- peft-ext:begin/end -->`` markers (replaced on the next
    save). ``run`` adds a training run's data, arguments and results (``peft_ext.runner``)."""
    from huggingface_hub import ModelCard

    path = os.path.join(output_dir, "README.md")
    facts = model_facts(model, run)
    existing = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            existing = f.read()
    if existing is None or _is_ours_or_template(existing):
        text = render_card(facts)
    else:
        if update is not None:
            update(model, output_dir)
        card = ModelCard.load(path)
        ours = metadata(facts)
        for key in ("base_model", "library_name", "pipeline_tag", "datasets"):
            if getattr(ours, key, None) is not None:
                setattr(card.data, key, getattr(ours, key))
            elif key == "base_model" and card.data.base_model and not _is_hub_name(card.data.base_model):
                card.data.base_model = None  # PEFT wrote the local path
        if ours.eval_results:
            card.data.eval_results, card.data.model_name = ours.eval_results, ours.model_name
        tags = [t for t in (card.data.tags or []) if not t.startswith("base_model:adapter:") or _is_hub_name(t[19:])]
        card.data.tags = sorted(set(tags) | set(ours.tags or []))
        body = card.text
        if BLOCK_BEGIN in body and BLOCK_END in body:
            body = body[: body.index(BLOCK_BEGIN)] + body[body.index(BLOCK_END) + len(BLOCK_END):]
        block = "\n".join(
            [BLOCK_BEGIN, "", "## Adapter", ""] + render_sections(facts) + ["", _facts_comment(facts), BLOCK_END])
        text = f"---\n{card.data.to_yaml()}\n---\n{body.rstrip()}\n\n{block}\n"
    atomic_write_text(path, text)
    return text


def _is_hub_name(name) -> bool:
    from .data.models import is_hub_id

    return is_hub_id(name)


def render_for_push(text: str, repo_id: str, base_model: Optional[str]) -> str:
    """The card to upload. A peft-ext card as peft-ext wrote it is rendered again with the repository id and the base
    model's Hub id; any other card (the user's, or a peft-ext card edited by hand) keeps its text and gets
    ``base_model`` set, local-path metadata dropped, and the loading lines pointed at ``repo_id``."""
    from huggingface_hub import ModelCard

    facts = read_facts(text)
    if facts is not None and MARKER in text and BLOCK_BEGIN not in text and render_card(facts) == text:
        facts["repo_id"] = repo_id
        if base_model and base_model != facts["base_model"]["id"]:
            facts["base_model"].update(id=base_model, source="", note="")
        return render_card(facts)
    card = ModelCard(text)
    if base_model:
        card.data.base_model = base_model
    tags = [t for t in (card.data.tags or []) if not t.startswith("base_model:adapter:")]
    if base_model:
        tags.append(f"base_model:adapter:{base_model}")
    card.data.tags = sorted(set(tags)) or None
    if card.data.eval_results or getattr(card.data, "model_name", None):  # the model-index names the model
        card.data.model_name = repo_id
    card.text = card.text.replace('"path/to/adapter"', f'"{repo_id}"')
    return str(card)
