"""ICM-LoRA and ICM-Fusion on MiniLM sentiment LoRAs of the four VADER domains (issue 16).

Paper: *In-Context Meta LoRA Generation* (ICM-LoRA, https://arxiv.org/abs/2501.17635; official code
https://github.com/YihuaJerry/ICM-LoRA). ICM-Fusion (https://arxiv.org/abs/2508.04153) has no readable code; the
fusion here is our design (``peft_ext.generation.icm_fusion``: the CVAE conditioned on the mean of the tasks'
conditions). The paper generates Florence-2 / LLaMA LoRAs; this is the same pipeline at CPU scale.

1. **Task LoRAs.** For each domain (``peft_ext.data.load_vader_domain``: movies, tweets, products, editorials) a
   LoRA (r = ``--rank`` on ``query``/``value`` of all-MiniLM-L6-v2, ``peft_ext.data.minilm_path()``, sequence
   classification) is trained with AdamW; its state is kept every half epoch. The last ``--keep`` checkpoints are
   the CVAE's training data for that domain (the official pipeline also drops its early epochs), the last one is
   "the original".
2. **Classifier head.** ``BertForSequenceClassification``'s ``classifier`` (384→2) is new, so each domain's LoRA
   trains its own head as PEFT's ``modules_to_save`` (PEFT's default for ``SEQ_CLS``). The head is part of the
   adapter the CVAE flattens and generates (770 of its 19,202 numbers at r = 2): a generated adapter is a complete
   plain PEFT folder. PEFT's ``add_weighted_adapter`` refuses several adapters that all hold a ``modules_to_save``
   copy of one module, so the merges combine the LoRA factors with ``add_weighted_adapter`` and use the **mean of the
   four heads** (our choice, the natural linear merge of the head).
3. **Condition.** MiniLM is a bidirectional encoder: no position is "last" in the causal sense the paper means
   (the decoder's last token summarises the prompt). The ``[CLS]`` position plays that role here (it is what the
   classifier reads through the pooler), so the condition is the last layer's ``[CLS]`` hidden state of the base
   model (no adapter, so the condition does not leak the LoRA it should generate), averaged over ``--cond-prompts``
   training texts of the domain (``peft_ext.generation.task_condition(pooling="cls")``).
4. **CVAE.** One ``LoraCVAE`` (official architecture: 12 conv layers 8…256…8, latent 256, MSE + 0.005·KLD, batch 2,
   CosineAnnealingLR T_max = 2·epochs, seed 2024) trained on the checkpoints of all four domains, each with its own
   condition; AdamW at ``--cvae-lr`` for ``--cvae-epochs`` epochs (the official 2,000 epochs at 2e-4 do not fit a
   15-minute CPU budget).
5. **Generation.** Per domain, ``--samples`` adapters from ``z ~ N(0, I)`` (seeds 0, 1, …) and one from ``z = 0``,
   de-normalised with the domain's last-checkpoint statistics; the first is written as a PEFT folder and evaluated
   through ``PeftModel.from_pretrained``. ICM-Fusion: one adapter from the mean condition of the four domains.

Reported: accuracy on each domain's held-out split of the base model (random head), the original LoRA, the
generated ones, the fused one, and PEFT's ``linear`` (weights 1/4), ``cat`` (weights 1/4: exactly the mean ΔW) and
``ties`` (weights 1, density 0.5) merges; the cosine similarity of each generated adapter with every domain's
original (does the condition pick the right domain?); the CVAE's loss curve; times.

Rerun (from the repository root)::

    .venv/bin/python scripts/repro_icm.py              # ~10 CPU minutes, one thread (53 min wall at load 10-15)
    .venv/bin/python scripts/repro_icm.py --quick      # small sizes, ~2 minutes (smoke test)

Writes ``--out`` (default ``results/repro_icm.json``) atomically. ``HF_HUB_OFFLINE=1``; nothing is downloaded (the
VADER archive comes from PyPI once, as ``load_vader_domain`` documents). One seed and short budgets.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Optional

import benchlib  # first: it sets HF_HUB_OFFLINE before transformers is imported
import torch
from benchlib import fmt, markdown

from peft_ext._io import atomic_write_json
from peft_ext.data import VADER_DOMAINS, load_vader_domain, minilm_path
from peft_ext.generation import IcmLoraConfig, icm_fusion, task_condition, train_lora_cvae

FULL = {"n_train": 320, "n_test": 160, "epochs": 4, "keep": 6, "cvae_epochs": 100, "samples": 2, "cond_prompts": 32}
QUICK = {"n_train": 48, "n_test": 48, "epochs": 2, "keep": 3, "cvae_epochs": 8, "samples": 1, "cond_prompts": 8}


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_options(p, "results/repro_icm.json", "small sizes: a smoke test of the pipeline")
    p.add_argument("--domains", default=",".join(VADER_DOMAINS), help="comma-separated VADER domains")
    for name, help_text in (("n_train", "training texts per domain"), ("n_test", "held-out texts per domain"),
                            ("epochs", "LoRA epochs per domain (a checkpoint every half epoch)"),
                            ("keep", "last checkpoints per domain the CVAE trains on"),
                            ("cvae_epochs", "CVAE epochs"), ("samples", "z ~ N(0, I) draws per domain"),
                            ("cond_prompts", "texts averaged into a domain's condition")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None, help=help_text)
    p.add_argument("--rank", type=int, default=2, help="LoRA rank (METHODS.md: r = 2)")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="AdamW learning rate of the task LoRAs and heads")
    p.add_argument("--batch-size", type=int, default=16, help="task-LoRA batch size")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text")
    p.add_argument("--cvae-lr", type=float, default=1e-3, help="CVAE AdamW learning rate (official 2e-4)")
    p.add_argument("--cvae-batch-size", type=int, default=2, help="CVAE batch size (official 2)")
    args = p.parse_args(argv)
    benchlib.apply_sizes(args, FULL, QUICK)
    args.domains = benchlib.parse_choices(p, "--domains", args.domains, VADER_DOMAINS, "domain")
    benchlib.set_threads(p, args.threads)
    return args


def load_base(path: str, seed: int):
    """MiniLM with a fresh 2-class head; the same seed gives every domain the same initial head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def encode(tokenizer, texts: list, max_length: int) -> dict:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def accuracy(model, tokenizer, split, max_length: int, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split["text"]), batch_size):
        logits = model(**encode(tokenizer, split["text"][start : start + batch_size], max_length)).logits
        correct += (logits.argmax(-1) == torch.tensor(split["label"][start : start + batch_size])).sum().item()
    return correct / len(split["text"])


def train_domain(args, path, tokenizer, lora_config, data) -> tuple:
    """Train one domain's LoRA + head; returns (checkpoints oldest first, seconds)."""
    from peft import get_peft_model, get_peft_model_state_dict

    model = get_peft_model(load_base(path, args.seed), copy.deepcopy(lora_config))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lora_lr)
    train = data["train"]
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = -(-len(train["text"]) // args.batch_size)
    half = max(1, steps_per_epoch // 2)
    checkpoints, start = [], time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(train["text"]), generator=gen).tolist()
        for step in range(steps_per_epoch):
            model.train()
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            out = model(**encode(tokenizer, [train["text"][i] for i in idx], args.max_length),
                        labels=torch.tensor([train["label"][i] for i in idx]))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step in (half - 1, steps_per_epoch - 1):  # every half epoch
                checkpoints.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
    return checkpoints, time.perf_counter() - start


def delta_w(state_dict: dict) -> torch.Tensor:
    """Every module's ``B @ A`` flattened and concatenated: what the adapter adds to the weights. (The raw factors
    are a poor measure here: every domain's LoRA starts from the same seeded A, so their A stay alike.)"""
    keys = sorted(k for k in state_dict if "lora_A." in k)
    return torch.cat([(state_dict[k.replace("lora_A.", "lora_B.")].double() @ state_dict[k].double()).reshape(-1)
                      for k in keys])


def head(state_dict: dict) -> torch.Tensor:
    return torch.cat([state_dict[k].double().reshape(-1) for k in sorted(state_dict) if "lora_" not in k])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(torch.nn.functional.cosine_similarity(a, b, dim=0).item(), 4)


def main(argv: Optional[list] = None) -> dict:
    args = parse_args(argv)
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import AutoTokenizer

    import transformers

    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" report, once per model load
    t_all = time.perf_counter()
    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    lora_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"],
                             task_type="SEQ_CLS", lora_dropout=0.0)
    data = {}
    for d in args.domains:  # plain lists: {"train": {"text": [...], "label": [...]}, "test": ...}
        splits = load_vader_domain(d, seed=args.seed, max_examples=args.n_train + args.n_test, test_size=args.n_test)
        data[d] = {s: {"text": list(splits[s]["text"]), "label": list(splits[s]["label"])} for s in splits}
    result = {"args": vars(args), "versions": benchlib.versions(), "load_average_start": benchlib.load_average(),
              "domains": {}, "times_s": {}}

    # 1. task LoRAs, checkpoints every half epoch
    checkpoints, t_lora = {}, time.perf_counter()
    for d in args.domains:
        checkpoints[d], seconds = train_domain(args, path, tokenizer, lora_config, data[d])
        print(f"[lora] {d}: {len(checkpoints[d])} checkpoints in {seconds:.0f} s", flush=True)
    result["times_s"]["task_loras"] = round(time.perf_counter() - t_lora, 1)

    # 2. conditions: [CLS] of the base model's last layer, averaged over training texts
    t0 = time.perf_counter()
    base = load_base(path, args.seed)
    conditions = {d: task_condition(base, tokenizer, data[d]["train"]["text"][: args.cond_prompts], pooling="cls",
                                    max_length=args.max_length) for d in args.domains}
    result["times_s"]["conditions"] = round(time.perf_counter() - t0, 1)
    names = list(args.domains)
    result["condition_cosine"] = {
        a: {b: round(torch.nn.functional.cosine_similarity(conditions[a], conditions[b], dim=0).item(), 4)
            for b in names} for a in names}

    # 3. the CVAE on the last --keep checkpoints of every domain
    t0 = time.perf_counter()
    cvae_config = IcmLoraConfig(epochs=args.cvae_epochs, learning_rate=args.cvae_lr, batch_size=args.cvae_batch_size)
    generator = train_lora_cvae({d: checkpoints[d][-args.keep:] for d in names}, conditions, cvae_config,
                                peft_config=lora_config,
                                log=lambda r: print(f"[cvae] epoch {r['epoch']}: loss {r['loss']:.4f} "
                                                    f"recon {r['recon_loss']:.4f} kld {r['kld_loss']:.2f}", flush=True)
                                if r["epoch"] % 10 == 0 or r["epoch"] == 1 else None)
    result["times_s"]["cvae_train"] = round(time.perf_counter() - t0, 1)
    result["cvae"] = {"input_length": generator.layout.length, "padded_length": generator.cvae.padded_length,
                      "parameters": sum(p.numel() for p in generator.cvae.parameters()),
                      "training_samples": args.keep * len(names), "history": generator.history}

    # 4. evaluation: one PeftModel whose adapter weights are swapped in
    t0 = time.perf_counter()
    evaluator = get_peft_model(load_base(path, args.seed), copy.deepcopy(lora_config))

    def acc_of(state_dict, domain):
        set_peft_model_state_dict(evaluator, state_dict)
        return accuracy(evaluator, tokenizer, data[domain]["test"], args.max_length)

    originals = {d: checkpoints[d][-1] for d in names}
    result["original_delta_w_cosine"] = {a: {b: cosine(delta_w(originals[a]), delta_w(originals[b])) for b in names}
                                         for a in names}
    base_eval = load_base(path, args.seed)
    work = Path(tempfile.mkdtemp(prefix="repro-icm-"))
    for d in names:
        labels = data[d]["test"]["label"]
        row = {"n_test": len(labels), "majority": max(sum(labels), len(labels) - sum(labels)) / len(labels),
               "base": accuracy(base_eval, tokenizer, data[d]["test"], args.max_length),
               "original": acc_of(originals[d], d)}
        samples = generator.generate(task=d, num_samples=args.samples, seed=0)
        folder = generator.save_adapter(samples[0], work / f"generated-{d}")
        loaded = PeftModel.from_pretrained(load_base(path, args.seed), str(folder))  # the folder loads in PEFT
        row["generated"] = [accuracy(loaded, tokenizer, data[d]["test"], args.max_length)]
        row["generated"] += [acc_of(s, d) for s in samples[1:]]
        zero = generator.generate(task=d, latent="zero")[0]
        row["generated_z0"] = acc_of(zero, d)
        row["delta_w_cosine_generated_vs_originals"] = {o: cosine(delta_w(samples[0]), delta_w(originals[o]))
                                                        for o in names}
        row["delta_w_cosine_generated_z0_vs_originals"] = {o: cosine(delta_w(zero), delta_w(originals[o]))
                                                           for o in names}
        row["head_cosine_generated_vs_originals"] = {o: cosine(head(samples[0]), head(originals[o])) for o in names}
        row["delta_w_cosine_checkpoints_vs_original"] = [cosine(delta_w(c), delta_w(originals[d]))
                                                         for c in checkpoints[d][-args.keep:]]
        result["domains"][d] = row
        print(f"[eval] {d}: base {row['base']:.3f} original {row['original']:.3f} generated "
              f"{[round(a, 3) for a in row['generated']]} z0 {row['generated_z0']:.3f}", flush=True)

    # 5. ICM-Fusion vs PEFT merges (LoRA factors merged by add_weighted_adapter, heads averaged)
    fused = icm_fusion(generator, names, num_samples=1, seed=0)[0]
    fused_z0 = icm_fusion(generator, names, latent="zero")[0]
    head_keys = [k for k in originals[names[0]] if "lora_" not in k]
    mean_head = {k: torch.stack([originals[d][k] for d in names]).mean(0) for k in head_keys}
    merges = {}
    for rule, weights, kwargs in (("linear", 1 / len(names), {}), ("cat", 1 / len(names), {}),
                                  ("ties", 1.0, {"density": 0.5})):
        plain = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"], lora_dropout=0.0)
        model = get_peft_model(load_base(path, args.seed), plain, adapter_name=names[0])
        for d in names[1:]:
            model.add_adapter(d, copy.deepcopy(plain))
        for d in names:
            set_peft_model_state_dict(model, {k: v for k, v in originals[d].items() if "lora_" in k}, adapter_name=d)
        model.add_weighted_adapter(names, [weights] * len(names), "merged", combination_type=rule, **kwargs)
        model.set_adapter("merged")
        with torch.no_grad():
            model.base_model.model.classifier.weight.copy_(mean_head["base_model.model.classifier.weight"])
            model.base_model.model.classifier.bias.copy_(mean_head["base_model.model.classifier.bias"])
        merges[rule] = {d: accuracy(model, tokenizer, data[d]["test"], args.max_length) for d in names}
    result["fusion"] = {
        "icm_fusion": {d: acc_of(fused, d) for d in names},
        "icm_fusion_z0": {d: acc_of(fused_z0, d) for d in names},
        **merges,
        "single_task_originals": {d: result["domains"][d]["original"] for d in names},
    }
    result["times_s"]["evaluation"] = round(time.perf_counter() - t0, 1)
    result["times_s"]["total"] = round(time.perf_counter() - t_all, 1)
    result["load_average_end"] = benchlib.load_average()

    columns = ["domain", "majority", "base", "original", "generated (z~N(0,I))", "generated (z=0)",
               "cos ΔW (z=0, own)", "max cos ΔW (z=0, other domains)"]
    rows = []
    for d in names:
        r = result["domains"][d]
        cos0 = r["delta_w_cosine_generated_z0_vs_originals"]
        others = [v for o, v in cos0.items() if o != d]
        rows.append([d, fmt(r["majority"], ".3f"), fmt(r["base"], ".3f"), fmt(r["original"], ".3f"),
                     " / ".join(f"{a:.3f}" for a in r["generated"]), fmt(r["generated_z0"], ".3f"),
                     fmt(cos0[d], ".3f"), fmt(max(others, default=None), ".3f")])
    table1 = markdown(columns, rows)
    fusion_rows = []
    for name, accs in result["fusion"].items():
        mean = sum(accs.values()) / len(accs)
        fusion_rows.append([name] + [fmt(accs[d], ".3f") for d in names] + [fmt(mean, ".3f")])
    table2 = markdown(["adapter"] + names + ["mean"], fusion_rows)
    result["tables"] = {"generation": table1, "fusion": table2}
    atomic_write_json(args.out, result)
    print(table1, "\n\n", table2, f"\n\ntimes (s): {result['times_s']}", sep="")
    return result


if __name__ == "__main__":
    main()
