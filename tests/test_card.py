"""The model card peft-ext writes (runner and save_pretrained) and `peft-ext push --dry-run`: Hub metadata that parses,
the base model's Hub id, every section filled, no template placeholder, no local path."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, get_peft_model

import peft_ext
from peft_ext import cli
from peft_ext.card import TEMPLATE_PLACEHOLDER, read_facts
from peft_ext.data import minilm_path
from peft_ext.data.models import MINILM_IDENTITY, SMOLLM2_IDENTITY, hub_identity
from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
SECTIONS = ("## Method", "## How to load", "## Training data", "## Training procedure", "## Results",
            "## Framework versions", "## Citation")


def local_paths(text: str, *roots) -> list[str]:
    """Absolute paths of this machine that appear in ``text`` (the test folders, the venv, the home folder)."""
    needles = {str(r) for r in roots} | {str(Path.home()), str(ROOT), os.sep + "tmp" + os.sep, "site-packages"}
    return [n for n in needles if n in text]


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """The tiny recipe on MiniLM (the offline model with a Hub id): 8 steps, 4 DyLoRA ranks evaluated."""
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", str(TINY), "--set", f"output_dir={out}", "--set", "model.name=minilm", "--quiet"]) == 0
    return out


def test_runner_card_is_complete(minilm_run):
    adapter = minilm_run / "adapter"
    text = (adapter / "README.md").read_text()
    card = ModelCard(text)
    metrics = json.loads((minilm_run / "metrics.json").read_text())
    data = card.data
    assert data.base_model == MINILM_ID and data.library_name == "peft" and data.pipeline_tag == "text-classification"
    assert {"peft", "peft-ext", "dylora", "transformers", f"base_model:adapter:{MINILM_ID}"} <= set(data.tags)
    assert not data.datasets  # the synthetic toy data has no Hub data set
    # model-index: one accuracy per evaluated DyLoRA rank, the run's own numbers
    results = data.eval_results
    assert [r.metric_name for r in results] == [f"accuracy (rank {b})" for b in (1, 2, 3, 4)]
    assert [r.metric_value for r in results] == [round(row["accuracy"], 4) for row in metrics["results"]]
    assert all(r.task_type == "text-classification" and r.dataset_split == "test" for r in results)
    for section in SECTIONS:
        assert section in text, section
    assert "https://arxiv.org/abs/2210.07558" in text and "https://github.com/huawei-noah/Efficient-NLP" in text
    assert "AutoPeftModelForSequenceClassification.from_pretrained" in text and "pip install peft-ext" in text
    assert "192 train rows" in text and "64 test rows" in text and "truncated to 16 tokens" in text
    assert "| `learning_rate` | 0.01 |" in text and "| `r` | 4 |" in text and "| `max_steps` | 8 |" in text
    for row in metrics["results"]:
        assert f"| rank {row['rank']} | {row['eval_loss']:.4f} | {row['accuracy']:.4f} |" in text
    assert f"| untrained | {metrics['baseline']['eval_loss']:.4f} |" in text
    assert f"- PEFT {__import__('peft').__version__}" in text and f"- peft-ext {peft_ext.__version__}" in text
    assert "@misc{dylora2022" in text and "eprint        = {2210.07558}" in text and "@software{peft_ext" in text
    assert MINILM_IDENTITY.source.split(" (")[0] in text  # which weights the run used
    assert TEMPLATE_PLACEHOLDER not in text and not local_paths(text, minilm_run)
    # locally the config keeps the folder it was trained from, so the adapter loads offline
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(minilm_path())


def test_the_cards_loading_lines_work(minilm_run):
    """The card's two Python lines, with this folder for the repository id, give the trained model's outputs."""
    adapter = minilm_run / "adapter"
    auto = AutoPeftModelForSequenceClassification.from_pretrained(str(adapter)).eval()
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path())
    by_hand = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[101, 1996, 3185, 2001, 2307, 102]])
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=ids).logits, by_hand(input_ids=ids).logits, rtol=0, atol=0)


def test_push_dry_run_writes_what_would_be_uploaded(minilm_run, capsys):
    adapter, out = minilm_run / "adapter", minilm_run / "upload"
    assert cli.main(["push", str(adapter), "someone/minilm-dylora", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    listed = [line.strip() for line in printed[1:]]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == listed
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(listed)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == MINILM_ID and card.data.model_name == "someone/minilm-dylora"
    assert 'from_pretrained("someone/minilm-dylora")' in card.text and "path/to/adapter" not in card.text
    assert f"# someone/minilm-dylora: dylora adapter for {MINILM_ID}" in card.text  # rendered again, not patched
    for name in listed:
        if name.endswith((".json", ".md")):
            text = (out / name).read_text()
            assert TEMPLATE_PLACEHOLDER not in text and not local_paths(text, minilm_run), name
    config = PeftConfig.from_pretrained(out)
    assert config.base_model_name_or_path == MINILM_ID and config.peft_type == "DYLORA" and config.r == 4
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    # the adapter folder itself is unchanged: local loading keeps the local base path
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(minilm_path())
    # a second dry run replaces the first; a folder that is not a dry run is refused
    assert cli.main(["push", str(adapter), "someone/other", "--dry-run", "--out", str(out)]) == 0
    assert ModelCard.load(out / "README.md").data.model_name == "someone/other"
    assert cli.main(["push", str(adapter), "someone/other", "--dry-run", "--out", str(adapter.parent)]) == 2


def test_push_keeps_a_card_edited_by_hand(minilm_run, tmp_path):
    edited = tmp_path / "adapter"
    shutil.copytree(minilm_run / "adapter", edited)
    card = edited / "README.md"
    card.write_text(card.read_text().replace("## Method", "My own notes.\n\n## Method"))
    assert cli.main(["push", str(edited), "someone/edited", "--dry-run", "--out", str(tmp_path / "o")]) == 0
    pushed = ModelCard.load(tmp_path / "o" / "README.md")
    assert "My own notes." in pushed.text and pushed.data.base_model == MINILM_ID
    assert pushed.data.model_name == "someone/edited" and 'from_pretrained("someone/edited")' in pushed.text
    assert not local_paths(str(pushed), tmp_path, minilm_run)


def test_push_refuses_a_local_base_without_hub_id(tmp_path, capsys):
    get_peft_model(tiny_llama(), peft_ext.DyLoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    assert cli.main(["push", str(tmp_path / "a"), "someone/x", "--dry-run", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --base-model ID" in err and not (tmp_path / "o").exists()
    args = ["push", str(tmp_path / "a"), "someone/x", "--dry-run", "--out", str(tmp_path / "o"), "--base-model"]
    assert cli.main(args + ["owner/tiny-llama"]) == 0
    assert PeftConfig.from_pretrained(tmp_path / "o").base_model_name_or_path == "owner/tiny-llama"
    assert ModelCard.load(tmp_path / "o" / "README.md").data.base_model == "owner/tiny-llama"
    assert cli.main(args + ["not a hub id"]) == 2 and "--base-model must be a Hub model id" in capsys.readouterr().err
    # --out needs --dry-run
    assert cli.main(["push", str(tmp_path / "a"), "someone/x", "--out", str(tmp_path / "o")]) == 2


def test_save_pretrained_card_of_a_peft_ext_adapter(tmp_path):
    """Plain save_pretrained (no runner): metadata, method, loading, method config, versions, citations."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = get_peft_model(base, peft_ext.NolaConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model == MINILM_ID and card.data.pipeline_tag == "text-classification"
    assert {"nola", "peft-ext", f"base_model:adapter:{MINILM_ID}"} <= set(card.data.tags) and not card.data.eval_results
    for section in ("## Method", "## How to load", "## Training procedure", "## Framework versions", "## Citation"):
        assert section in text, section
    assert "## Results" not in text and "## Training data" not in text  # nothing measured, nothing invented
    assert "https://arxiv.org/abs/2310.02556" in text and "@misc{nola2023" in text and "| `r` | 4 |" in text
    assert TEMPLATE_PLACEHOLDER not in text and not local_paths(text, tmp_path)
    model.save_pretrained(tmp_path)  # saving again rewrites the card, it does not append
    assert (tmp_path / "README.md").read_text().count("## Method") == 1


def test_user_written_card_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nNotes I wrote.\n")
    model = get_peft_model(tiny_llama(), peft_ext.DyLoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    card = ModelCard(text)
    assert "Notes I wrote." in text and card.data.license == "mit" and "dylora" in card.data.tags
    assert text.count("<!-- peft-ext:begin -->") == 1 and "## Method" in text and read_facts(text) is not None
    assert TEMPLATE_PLACEHOLDER not in text and not local_paths(text, tmp_path)


def test_runner_card_for_peft_lora(tmp_path):
    assert cli.main(["train", str(TINY), "--set", f"output_dir={tmp_path}", "--set", "method.name=lora",
                     "--set", "evaluation.ranks=null", "--quiet"]) == 0
    text = (tmp_path / "adapter" / "README.md").read_text()
    card = ModelCard(text)
    assert {"lora", "peft-ext"} <= set(card.data.tags) and card.data.base_model is None  # random tiny BERT: no id
    assert "https://arxiv.org/abs/2106.09685" in text and "@misc{lora2021" in text and "## Results" in text
    assert [r.metric_name for r in card.data.eval_results] == ["accuracy (adapter)"]
    assert "randomly initialised 2-layer BERT" in text and "--base-model" in text
    assert TEMPLATE_PLACEHOLDER not in text and not local_paths(text, tmp_path)


def test_hub_identity_of_offline_models(tmp_path):
    assert hub_identity(minilm_path()) == MINILM_IDENTITY
    assert hub_identity(str(minilm_path())).repo_id == MINILM_ID
    rebuilt = tmp_path / "smollm2"
    rebuilt.mkdir()
    (rebuilt / "peft_ext_source.json").write_text(json.dumps({"model": SMOLLM2_IDENTITY.repo_id}))
    assert hub_identity(rebuilt) == SMOLLM2_IDENTITY
    assert "ab810cf68114990406fdf996510dd3d3c6adbdf5" in SMOLLM2_IDENTITY.source
    assert hub_identity("owner/some-model").repo_id == "owner/some-model"
    assert hub_identity(tmp_path) is None and hub_identity("") is None and hub_identity(None) is None
    assert re.fullmatch(r"[0-9a-f]{64}", MINILM_IDENTITY.source.split("sha256 ")[1][:64])
