"""LoRA-LEGO against PEFT's merge rules on MiniLM LoRAs, one per VADER sentiment domain.

What it measures: ``all-MiniLM-L6-v2`` (``peft_ext.data.minilm_path()``) as a binary sentiment classifier
(``AutoModelForSequenceClassification``, float32) on the four VADER domains (``peft_ext.data.load_vader_domain``:
movies, tweets, products, editorials; ``neutral_margin=0``, split seed ``--seed``).

* **The classifier head is shared and frozen.** MiniLM has no classification head, so one is trained first, once,
  for all domains: the pooler and classifier on the frozen encoder's features of ``--head-train`` examples per domain
  (mixed), ``--head-epochs`` epochs of AdamW (lr 1e-3). It then belongs to the base model: the domain LoRAs train
  only their A and B, and every merge (LEGO and PEFT's rules alike) is a merge of pure LoRA updates on one base;
  nothing head-specific (``modules_to_save`` averaging) enters the comparison.
* **One LoRA per domain**: ``LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])``, ``--train`` (320)
  examples of that domain, ``--epochs`` (2) epochs, batch 32, AdamW lr ``--lr``, sequences cut to 64 tokens (each
  batch trimmed to its longest row). The shared head uses ``--head-train`` (128) examples per domain, 30 epochs.
* **Merges** of the four LoRAs (``peft_ext.merging.merge_adapters``, all on (state dict, config) pairs and the
  in-memory base), each at rank k = 8 and 16: LEGO (``lego``; k-means seed ``--seed``; also once at k = 8 without
  the dual reweighting) and PEFT's rules in their rank-k forms, ``linear`` (PEFT ``svd``: the ΔW sum truncated to
  rank k), ``ties`` and ``dare_ties`` (PEFT ``ties_svd`` / ``dare_ties_svd``, density 0.5), plus ``cat`` (rank 32,
  exact). Weights: 1 each for LEGO, ties and dare_ties (TIES takes a disjoint mean of the agreeing entries, LEGO
  rescales by its reweighting), 1/4 each for linear and cat (an average of the four updates).
* **Accuracy** of every merged adapter on each domain's first ``--test`` (200) test examples, next to the untrained base
  (shared head only) and to each single-domain LoRA on its own domain (the reference). **Merge time**: the wall time
  of the ``merge_adapters`` call (PEFT's rules include loading the four adapters on the base model; LEGO needs no
  model), one run each, on this shared machine: indicative only.

Rerun (from the repository root)::

    .venv/bin/python scripts/bench_merging.py                  # ~8 CPU minutes on one thread
    .venv/bin/python scripts/bench_merging.py --quick          # a smoke test (~1 min)

The markdown table is printed and everything is written to ``--out`` (default ``results/bench_merging.json``) with
``peft_ext._io.atomic_write_json``. One seed; short training: differences of a point or two are noise.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import benchlib
import torch

from peft_ext._io import atomic_write_json

DOMAINS = ("movies", "tweets", "products", "editorials")
MAX_LEN = 64


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_common_options(p, "results/bench_merging.json", "tiny sizes: a smoke test")
    p.add_argument("--train", type=int, help="training examples per domain (default 320)")
    p.add_argument("--epochs", type=int, help="LoRA epochs per domain (default 2)")
    p.add_argument("--head-train", type=int, help="examples per domain for the shared head (default 128)")
    p.add_argument("--head-epochs", type=int, help="epochs of the shared head (default 30)")
    p.add_argument("--test", type=int, help="test examples per domain (default 200)")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (default 1e-3)")
    p.add_argument("--ks", default="8,16", help="merged ranks k, comma-separated (default 8,16)")
    args = p.parse_args(argv)
    benchlib.apply_sizes(args, {"train": 320, "epochs": 2, "head_train": 128, "head_epochs": 30, "test": 200},
                         {"train": 64, "epochs": 1, "head_train": 32, "head_epochs": 2, "test": 32})
    benchlib.set_threads(p, args.threads)
    benchlib.seed_everything(args.seed)
    ks = [int(k) for k in args.ks.split(",")]
    t_start = time.perf_counter()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peft_ext.data import load_vader_domain, minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = {}
    for domain in DOMAINS:
        ds = load_vader_domain(domain, seed=args.seed)
        train = ds["train"].shuffle(seed=args.seed).select(range(min(args.train, len(ds["train"]))))
        test = ds["test"].select(range(min(args.test, len(ds["test"]))))
        data[domain] = {"train": encode(tokenizer, train), "test": encode(tokenizer, test),
                        "head": encode(tokenizer, train.select(range(min(args.head_train, len(train)))))}
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()

    t0 = time.perf_counter()
    head_info = train_shared_head(base, data, args)
    head_info["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"shared head: {head_info}", flush=True)

    accuracy = {"base (shared head, no LoRA)": evaluate(base, data)}
    singles, train_info = [], {}
    for domain in DOMAINS:
        t0 = time.perf_counter()
        pair, loss = train_lora(base, data[domain]["train"], args)
        singles.append(pair)
        train_info[domain] = {"seconds": round(time.perf_counter() - t0, 1), "final_loss": round(loss, 4)}
        accuracy[f"single: {domain}"] = evaluate_pair(base, pair, data, domains=(domain,))
        print(f"{domain}: {train_info[domain]} acc {accuracy[f'single: {domain}']}", flush=True)

    rows = merge_plan(ks)
    merged = {}
    from peft_ext.merging.merge import merge_adapters

    for label, rule, k, weight, kwargs in rows:
        torch.manual_seed(args.seed)  # DARE's random drop
        t0 = time.perf_counter()
        pair = merge_adapters(singles, rule=rule, k=k, weights=[weight] * len(singles), seed=args.seed,
                              base_model=base, **kwargs)
        seconds = time.perf_counter() - t0
        acc = evaluate_pair(base, pair, data)
        merged[label] = {"rule": rule, "k": k, "rank": pair[1].r, "weight": weight, "merge_seconds": round(seconds, 3),
                         "accuracy": acc, "mean": round(sum(acc.values()) / len(acc), 4)}
        print(f"{label}: rank {pair[1].r} {seconds:.3f}s {acc}", flush=True)

    own = {d: accuracy[f"single: {d}"][d] for d in DOMAINS}
    head = ["merge", "rank", *DOMAINS, "mean", "merge s"]
    table_rows = [["base (shared head, no LoRA)", "–", *fmt_acc(accuracy["base (shared head, no LoRA)"]), "–"],
                  ["single-domain LoRA on its own domain", "8", *fmt_acc(own), "–"]]
    for label, rec in merged.items():
        table_rows.append([label, str(rec["rank"]), *fmt_acc(rec["accuracy"]), f"{rec['merge_seconds']:.2f}"])
    table = benchlib.markdown(head, table_rows)
    print(table)
    payload = {
        "settings": {k: v for k, v in vars(args).items()}, "domains": DOMAINS, "shared_head": head_info,
        "lora_training": train_info, "accuracy": accuracy, "merged": merged, "table": table,
        "command": "python scripts/bench_merging.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "total_seconds": round(time.perf_counter() - t_start, 1), "load_average": benchlib.load_average(),
        "versions": benchlib.versions(),
    }
    atomic_write_json(args.out, payload)
    print(f"written to {args.out}")
    return 0


def merge_plan(ks):
    """(label, rule, k, weight per adapter, extra kwargs) of every merge in the table."""
    rows = [(f"lego k={k}", "lego", k, 1.0, {}) for k in ks]
    rows.append((f"lego k={ks[0]}, no reweighting", "lego", ks[0], 1.0, {"reweight": ()}))
    rows += [(f"linear k={k} (PEFT svd)", "linear", k, 0.25, {}) for k in ks]
    rows += [(f"ties k={k} (PEFT ties_svd)", "ties", k, 1.0, {"density": 0.5}) for k in ks]
    rows += [(f"dare_ties k={k} (PEFT dare_ties_svd)", "dare_ties", k, 1.0, {"density": 0.5}) for k in ks]
    rows.append(("cat (exact average)", "cat", None, 0.25, {}))
    return rows


def fmt_acc(acc: dict) -> list:
    values = [acc[d] for d in DOMAINS]
    return [f"{v:.3f}" for v in values] + [f"{sum(values) / len(values):.3f}"]


def encode(tokenizer, ds) -> dict:
    """Token ids padded to 64, rows sorted by length (batches are trimmed to their longest row, so evaluation in
    this order pads little; training draws shuffled batches)."""
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=MAX_LEN, padding="max_length", return_tensors="pt")
    order = enc["attention_mask"].sum(1).argsort(stable=True)
    return {"input_ids": enc["input_ids"][order], "attention_mask": enc["attention_mask"][order],
            "labels": torch.tensor(ds["label"], dtype=torch.long)[order]}


def batches(split: dict, size: int, shuffle: bool = False, gen=None):
    n = split["labels"].shape[0]
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for i in range(0, n, size):
        idx = order[i:i + size]
        width = int(split["attention_mask"][idx].sum(1).max())  # trim the padding columns this batch does not use
        yield {k: v[idx] if k == "labels" else v[idx, :width] for k, v in split.items()}


@torch.no_grad()
def accuracy_of(model, split: dict) -> float:
    model.eval()
    correct = 0
    for batch in batches(split, 100):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    return round(correct / split["labels"].shape[0], 4)


def evaluate(model, data, domains=DOMAINS) -> dict:
    return {d: accuracy_of(model, data[d]["test"]) for d in domains}


def evaluate_pair(base, pair, data, domains=DOMAINS) -> dict:
    """Accuracy per domain of the LoRA (state dict, config) on ``base``; the base is left as it was."""
    from peft import get_peft_model, set_peft_model_state_dict

    state_dict, config = pair
    model = get_peft_model(base, copy.deepcopy(config))
    set_peft_model_state_dict(model, state_dict)
    try:
        return evaluate(model, data, domains)
    finally:
        model.unload()


def train_shared_head(base, data, args) -> dict:
    """Pooler + classifier trained on the frozen encoder's last hidden states of a mix of all domains."""
    with torch.no_grad():
        feats, labels = [], []
        for domain in DOMAINS:
            for batch in batches(data[domain]["head"], 100):
                out = base.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                feats.append(out.last_hidden_state[:, 0])
                labels.append(batch["labels"])
    feats, labels = torch.cat(feats), torch.cat(labels)
    head = [base.bert.pooler, base.classifier]
    params = [q for m in head for q in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    for m in head:
        m.train()
    for _ in range(args.head_epochs):
        for idx in torch.randperm(feats.shape[0], generator=gen).split(32):
            logits = base.classifier(base.dropout(base.bert.pooler(feats[idx][:, None])))
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    base.eval()
    for q in base.parameters():
        q.requires_grad_(False)
    return {"examples": int(feats.shape[0]), "epochs": args.head_epochs, "final_loss": round(loss.item(), 4)}


def train_lora(base, split, args):
    """One domain's LoRA on the frozen base with the shared head; returns ((state_dict, config), last loss)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    model = get_peft_model(base, config)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(args.epochs):
        for batch in batches(split, 32, shuffle=True, gen=gen):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    pair = ({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()},
            copy.deepcopy(model.peft_config["default"]))
    model.unload()
    return pair, loss.item()


if __name__ == "__main__":
    sys.exit(main())
