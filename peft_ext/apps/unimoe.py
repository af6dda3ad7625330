"""Uni-MoE's last training stage: plain LoRA on every existing expert of a mixture-of-experts LLM, routed by the base
model's own gates (the ``configs/uni_moe.yaml`` preset), on a tiny random Mixtral.

Paper: *Uni-MoE: Scaling Unified Multimodal LLMs with Mixture of Experts* (https://arxiv.org/abs/2405.11273); official
code https://github.com/HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs (``Uni_MoE/``, 4 experts; ``Uni_MoE_8e/``).
Uni-MoE trains connectors, then modality-specific experts, then LoRA on the experts with mixed multimodal data. The
preset is a ``peft.LoraConfig``: r=8, α=16 on the attention projections (``target_modules``) and on the fused expert
weights of transformers-v5 MoE models (``target_parameters: [experts.gate_up_proj, experts.down_proj]``: one rank-r
LoRA per expert). DEVIATION of the preset: dropout 0 (PEFT's LoRA on parameters refuses dropout).

Offline stand-in (no pretrained MoE LLM or multimodal data ship on PyPI): ``model.name: tiny-mixtral`` is a small
random ``MixtralForCausalLM`` (MiniLM's tokenizer, as the other tiny models), trained on GSM-style problem text (or
toy sentences) with the causal-LM loss plus Mixtral's router balance loss. Reported: the training loss curve,
held-out loss before and after, the share of tokens each expert receives per layer (top-k of the base gates) before
and after, and the same run with LoRA on the attention only (``compare_attention_only``), so the experts' LoRA is
measured against not adapting them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

PAPER = "https://arxiv.org/abs/2405.11273"
CODE = "https://github.com/HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs"
DATA_NAMES = ("gsm", "toy_sentiment")
MODEL_NAME = "tiny-mixtral"
PROGRESS_FILE = "progress.json"


@dataclass
class UniMoEConfig:
    """Settings of the Uni-MoE recipe (https://arxiv.org/abs/2405.11273): the tiny Mixtral's shape and the training.
    The adapter is ``method.config`` (the ``configs/uni_moe.yaml`` preset: LoRA r=8, α=16 on q/k/v/o and on every
    expert's gate_up_proj / down_proj)."""

    num_experts: int = field(default=4, metadata={"help": "Experts per MoE layer of tiny-mixtral (Uni-MoE: 4 or 8)."})
    top_k: int = field(default=2, metadata={"help": "Experts per token (Mixtral's top-2; Uni-MoE's is UNCERTAIN)."})
    hidden_size: int = field(default=64, metadata={"help": "tiny-mixtral's hidden size."})
    intermediate_size: int = field(default=128, metadata={"help": "Each expert's intermediate size."})
    num_layers: int = field(default=2, metadata={"help": "tiny-mixtral's decoder layers."})
    router_aux_loss_coef: float = field(
        default=0.001,
        metadata={"help": "Weight of Mixtral's load-balancing loss added to the LM loss (transformers' default "
                  "0.001; Uni-MoE's is UNCERTAIN); 0 = off."})
    steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate (cosine schedule)."})
    log_every: int = field(default=10, metadata={"help": "Record the training loss every this many steps."})
    compare_attention_only: bool = field(
        default=True,
        metadata={"help": "Also train LoRA on the attention projections only (no expert LoRA), same steps and data."})

    def __post_init__(self):
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size", "num_layers", "steps", "batch_size",
                     "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UniMoEConfig.{name} must be an integer >= 1; got {value!r}.")
        if self.top_k > self.num_experts:
            raise ValueError(f"UniMoEConfig.top_k must be <= num_experts ({self.num_experts}); got {self.top_k}.")
        if self.hidden_size % 4:
            raise ValueError(f"UniMoEConfig.hidden_size must be a multiple of 4 (4 attention heads); got "
                             f"{self.hidden_size}.")
        for name, positive in (("learning_rate", True), ("router_aux_loss_coef", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                raise ValueError(f"UniMoEConfig.{name} must be a finite number {'> 0' if positive else '>= 0'}; "
                                 f"got {value!r}.")
        if not isinstance(self.compare_attention_only, bool):
            raise ValueError(f"UniMoEConfig.compare_attention_only must be true/false; got "
                             f"{self.compare_attention_only!r}.")


def unimoe_config_from_recipe(recipe) -> UniMoEConfig:
    """``UniMoEConfig`` from ``trainer.args`` (unknown keys: a ValueError naming them)."""
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, UniMoEConfig)


def check_recipe(recipe) -> None:
    """``trainer: unimoe`` needs plain LoRA whose targets include the experts (``target_parameters``) on
    ``tiny-mixtral`` (or a local MoE model folder)."""
    if recipe.method.name != "lora":
        raise ValueError(f"trainer 'unimoe' needs method.name 'lora' (the uni_moe preset is a LoraConfig); got "
                         f"{recipe.method.name!r}.")
    if recipe.model.task != "causal_lm":
        raise ValueError(f"trainer 'unimoe' needs model.task 'causal_lm'; got {recipe.model.task!r}.")
    if not recipe.method.config.get("target_parameters"):
        raise ValueError("trainer 'unimoe': method.config.target_parameters must name the experts' fused weights "
                         "(configs/uni_moe.yaml: [experts.gate_up_proj, experts.down_proj]); Uni-MoE adapts every "
                         "expert.")
    if recipe.model.quantization is not None:
        raise ValueError("trainer 'unimoe': model.quantization must be null (PEFT's LoRA on parameters needs "
                         "full-precision expert weights).")
    unimoe_config_from_recipe(recipe)


# ---------------------------------------------------------------------------------------------------------- model
def load_moe_model(recipe, config: UniMoEConfig):
    """``(tokenizer, model)``: ``tiny-mixtral`` = a seeded random ``MixtralForCausalLM`` of ``config``'s shape with
    MiniLM's tokenizer (offline, like the runner's tiny-llama); otherwise the runner's loader (a local folder)."""
    if recipe.model.name != MODEL_NAME:
        from ..runner import load_tokenizer_and_model

        return load_tokenizer_and_model(recipe)
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from ..data import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    cfg = MixtralConfig(vocab_size=tokenizer.vocab_size, hidden_size=config.hidden_size,
                        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=config.num_experts,
                        num_experts_per_tok=config.top_k, max_position_embeddings=1024,
                        router_aux_loss_coef=config.router_aux_loss_coef, pad_token_id=tokenizer.pad_token_id,
                        tie_word_embeddings=False)
    torch.manual_seed(recipe.seed)
    return tokenizer, MixtralForCausalLM(cfg)


def text_rows(recipe) -> dict:
    """``{"train": [text], "test": [text]}``: GSM-style problems with their worked solutions (data.name gsm) or the
    toy sentences (toy_sentiment); cut to ``data.max_train`` / ``data.max_eval``."""
    spec = recipe.data
    if spec.name == "toy_sentiment":
        from ..runner.data import toy_sentiment

        data = toy_sentiment(seed=spec.seed)
        rows = {s: list(data[s]["text"]) for s in ("train", "test")}
    else:
        from ..data.gsm import load_gsm

        data = load_gsm(seed=spec.seed)
        rows = {s: [f"Question: {q}\nAnswer: {a}" for q, a in zip(data[s]["question"], data[s]["answer_cot"])]
                for s in ("train", "test")}
    if spec.max_train is not None:
        rows["train"] = rows["train"][: spec.max_train]
    if spec.max_eval is not None:
        rows["test"] = rows["test"][: spec.max_eval]
    return rows


def encode(tokenizer, texts, max_length: int) -> dict:
    """Right-padded batch with labels (padding -100)."""
    batch = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"].eq(0), -100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def router_probs(router_logits, top_k: int, attention_mask: torch.Tensor) -> list[np.ndarray]:
    """Per layer, the share of (non-padding) tokens routed to each expert by top-k of the gate logits (sums to 1)."""
    keep = attention_mask.reshape(-1).bool()
    shares = []
    for logits in router_logits:
        idx = logits.float().reshape(keep.shape[0], -1)[keep].topk(top_k, dim=-1).indices
        counts = torch.bincount(idx.reshape(-1), minlength=logits.shape[-1]).double()
        shares.append((counts / counts.sum()).numpy())
    return shares


@torch.no_grad()
def evaluate(model, tokenizer, texts, config: UniMoEConfig, max_length: int, batch_size: int = 16) -> dict:
    """Token-mean LM loss on ``texts`` (without the balance loss), the expert shares per layer (top-k of the base
    gates, over all tokens), and their load balance ``E · Σ_e share_e²`` (1 = even, E = one expert takes all)."""
    model.eval()
    total, count, counts = 0.0, 0, None
    for start in range(0, len(texts), batch_size):
        batch = encode(tokenizer, texts[start:start + batch_size], max_length)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int(labels.ne(-100).sum())
        n_tokens = int(batch["attention_mask"].sum())
        shares = router_probs(out.router_logits, config.top_k, batch["attention_mask"])
        layer_counts = np.stack(shares) * n_tokens
        counts = layer_counts if counts is None else counts + layer_counts
    shares = counts / counts.sum(1, keepdims=True)
    e = shares.shape[1]
    return {"loss": total / max(1, count), "expert_share": shares.round(4).tolist(),
            "balance": [float(e * (s ** 2).sum()) for s in shares]}


def train_lm(model, tokenizer, texts, config: UniMoEConfig, max_length: int, seed: int,
             progress: Optional[str] = None) -> list[dict]:
    """AdamW + cosine on the trainable parameters; the loss is the model's (LM loss + router_aux_loss_coef × Mixtral's
    balance loss when the model returns router logits). Returns the loss every ``log_every`` steps (and the last)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    total = config.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order, cursor, history, window = rng.permutation(len(texts)), 0, [], []
    model.train()
    for step in range(total):
        if cursor + config.batch_size > len(order):
            order, cursor = rng.permutation(len(texts)), 0
        chunk = [texts[i] for i in order[cursor:cursor + config.batch_size]]
        cursor += config.batch_size
        out = model(**encode(tokenizer, chunk, max_length), output_router_logits=config.router_aux_loss_coef > 0)
        loss = out.loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"unimoe: the loss became {loss.item()} at step {step}.")
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(float(loss.item()))
        if (step + 1) % config.log_every == 0 or step + 1 == total:
            aux = getattr(out, "aux_loss", None)
            history.append({"step": step + 1, "loss": float(np.mean(window)),
                            "aux_loss": float(aux) if aux is not None else None})
            window = []
            if progress:
                print(f"  {progress} step {step + 1}/{total}: loss {history[-1]['loss']:.4f}", flush=True)
    model.eval()
    return history


def _variants(recipe, config: UniMoEConfig) -> dict:
    """``{name: LoraConfig keywords}``: the recipe's preset (experts + attention) and, if asked, attention only."""
    kwargs = dict(recipe.method.config)
    kwargs.pop("task_type", None)
    variants = {"experts_and_attention": kwargs}
    if config.compare_attention_only and kwargs.get("target_modules"):
        variants["attention_only"] = {k: v for k, v in kwargs.items() if k != "target_parameters"}
    return variants


def _plot(results: dict, before: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .._io import atomic_savefig

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, r in results.items():
        axes[0].plot([h["step"] for h in r["history"]], [h["loss"] for h in r["history"]],
                     label=f"{name} (eval {r['after']['loss']:.3f})")
    axes[0].axhline(before["loss"], color="grey", linestyle=":", label=f"base eval {before['loss']:.3f}")
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss (LM + balance)", fontsize=9)
    axes[0].legend(fontsize=7)
    shares = [("base", before["expert_share"])] + [(n, r["after"]["expert_share"]) for n, r in results.items()]
    width = 0.8 / len(shares)
    for k, (name, s) in enumerate(shares):
        flat = np.asarray(s).reshape(-1)
        axes[1].bar(np.arange(len(flat)) + k * width, flat, width, label=name)
    axes[1].set_xlabel("layer x expert")
    axes[1].set_title("share of tokens per expert (top-k of the base gates)", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def train_unimoe_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for Uni-MoE's expert LoRA (``trainer: {name: unimoe, args: {...UniMoEConfig...}}``):
    evaluates the base, trains the preset (and the attention-only comparison) on the same batches, evaluates each;
    writes ``<variant>/`` adapters, ``metrics.json`` and ``results.png``, each atomically. With ``resume`` a variant
    whose adapter is whole is loaded instead of retrained."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from .._io import adapter_folder_is_whole, atomic_write_json
    from ..recipe import to_dict
    from ..runner.reporting import device_name
    from ..runner import save_adapter

    check_recipe(recipe)
    config = unimoe_config_from_recipe(recipe)
    began = time.time()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, base = load_moe_model(recipe, config)
    base.eval()
    rows = text_rows(recipe)
    max_length = recipe.data.max_length
    progress_path = out / PROGRESS_FILE
    progress = json.loads(progress_path.read_text()) if resume and progress_path.is_file() else {}
    before = evaluate(base, tokenizer, rows["test"], config, max_length)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    results = {}
    for name, kwargs in _variants(recipe, config).items():
        base.load_state_dict(base_state)
        folder = out / name
        if resume and adapter_folder_is_whole(folder) and name in progress:
            model, history, trained = PeftModel.from_pretrained(base, folder), progress[name], False
        else:
            torch.manual_seed(recipe.seed)
            model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **kwargs))
            history = train_lm(model, tokenizer, rows["train"], config, max_length, recipe.seed,
                               progress=None if quiet else name)
            save_adapter(model, tokenizer, folder)
            progress[name] = history
            atomic_write_json(progress_path, progress)
            trained = True
        trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        results[name] = {"after": evaluate(model, tokenizer, rows["test"], config, max_length), "history": history,
                         "trainable_parameters": trainable, "trained_this_run": trained}
        base = model.unload()
        base.eval()
    metrics = {
        "name": recipe.name,
        "trainer": "unimoe",
        "method": recipe.method.name,
        "seed": recipe.seed,
        "paper": PAPER,
        "official_code": CODE,
        "unimoe": asdict(config),
        "items": {s: len(v) for s, v in rows.items()},
        "base": before,
        "variants": results,
        "budget": {"steps": config.steps, "batch_size": config.batch_size, "wall_time_s": time.time() - began},
        "device": device_name(),
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot:
        _plot(results, before, out / "results.png")
    if not quiet:
        print(f"unimoe — base: eval loss {before['loss']:.3f}, balance {np.round(before['balance'], 3).tolist()}")
        for name, r in results.items():
            print(f"unimoe — {name}: eval loss {r['after']['loss']:.3f}, balance "
                  f"{np.round(r['after']['balance'], 3).tolist()}, {r['trainable_parameters']} trainable")
        print(f"metrics: {out / 'metrics.json'}")
    return metrics


RECIPE = dict(config=UniMoEConfig, entry=train_unimoe_recipe, data=DATA_NAMES, tasks=("causal_lm",),
              models=(MODEL_NAME,))
