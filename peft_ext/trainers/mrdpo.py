"""Multi-round DPO with LoRA merge-and-reinit (mrDPO) and rebirth SFT, on TRL's ``DPOTrainer``.

Paper: *video-SALMONN 2: Captioning-Enhanced Audio-Visual Large Language Models* (https://arxiv.org/abs/2506.15220);
official code https://github.com/bytedance/video-SALMONN-2
(``llava/train/dpo_trainer.py``: ``dpo_loss``, ``get_batch_logps``, ``compute_loss``; ``llava/train/train.py``:
``merge_and_new_lora``).

Round k (``MrDPOTrainer.train``):

1. preference pairs from the *current* policy θ_{k-1}: ``pair_builder(model, tokenizer, prompts, k)`` returns rows
   with ``prompt``, ``chosen``, ``rejected`` (and optionally a ground-truth column). The paper's pairs come from an
   LLM judge, which is not in the official repository; ``peft_ext.data.preference.gsm_pair_builder`` is an offline
   one (sample answers, score them, pair a correct with a wrong one).
2. ``steps_per_round`` steps of ``L = −log σ(β[(log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l))])
   + λ·CE``, log-probs summed over completion tokens, CE the token-mean LM loss on the ground-truth column when the
   pairs have one, else on chosen (the official ``compute_loss`` adds ``ce_loss_weight`` × the model's own LM loss).
   The reference is the policy with its adapter disabled, i.e. θ_{k-1}.
3. ``merge_and_unload`` into the base (θ_k), then a fresh adapter of the same config: at the next round start the
   policy equals the reference again, so the reference is refreshed every round.

Optimizer and scheduler: the official code runs one round per process launch (``merge_and_new_lora`` at start-up
merges the previous round's LoRA and creates a new one), so each round gets a new AdamW state and a new learning-rate
schedule (warm-up and cosine restart). We do the same inside one process: both are rebuilt at every round start.
Custom ``optimizers=`` are refused, since the trained parameters are new tensors every round.

Quantized bases are refused: each round merges ΔW into the base weights, and merging into 4-/8-bit weights re-quantizes
them, so the error accumulates round after round. ``MrDPOConfig(merge_dequantized=True)`` dequantizes the base first
(a full-precision copy in memory) and merges into that.

Rebirth (``MrDPOTrainer.rebirth``): the paper recovers skills lost during DPO by supervised fine-tuning the *pre-DPO*
model on answers written by the final mrDPO model; here with TRL's ``SFTTrainer`` and a fresh adapter of the same
config on the pre-DPO weights (kept as a copy of the adapted layers' base weights).
"""

from __future__ import annotations

import copy
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from trl import DPOConfig, DPOTrainer

from ._precision import BF16_HELP, default_bf16

PAPER_URL = "https://arxiv.org/abs/2506.15220"
CODE_URL = "https://github.com/bytedance/video-SALMONN-2"
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class MrDPOConfig(DPOConfig):
    """``DPOConfig`` plus the rounds of mrDPO. The paper's values are the defaults (β = 0.1, λ = 0.1, learning rate
    2e-5 with a cosine schedule, 1,000 steps per round); every field TRL also defines is re-declared here so that a
    TRL upgrade that changes its default cannot change this recipe."""

    rounds: int = field(default=3, metadata={"help": "Number of rounds: pairs from the current policy, DPO, merge."})
    steps_per_round: int = field(
        default=1000, metadata={"help": "Optimizer steps per round (the paper: 1,000). Replaces max_steps."}
    )
    ce_weight: float = field(
        default=0.1,
        metadata={"help": "λ: weight of the token-mean cross-entropy on the ground truth (else on chosen); 0 = off."},
    )
    ground_truth_column: str = field(
        default="ground_truth",
        metadata={"help": "Column of the pairs holding the ground-truth answer for the CE term (optional)."},
    )
    merge_dequantized: bool = field(
        default=False,
        metadata={"help": "Allow a bitsandbytes base: dequantize it first and merge every round into that copy."},
    )
    save_rounds: bool = field(
        default=True,
        metadata={"help": "Save each round's adapter under output_dir/rounds/round-<k> (needed to resume a round)."},
    )
    # TRL fields pinned to the paper (or to TRL 1.16's value, so an upgrade cannot move them silently).
    beta: float = field(default=0.1, metadata={"help": "β of the DPO sigmoid loss (the paper: 0.1)."})
    loss_type: list = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "Must be ['sigmoid']: mrDPO is DPO-sigmoid plus the ce_weight term, added by the trainer."},
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of each round (the paper: 2e-5)."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule, restarted every round (the paper: cosine)."}
    )
    max_length: Optional[int] = field(
        default=1024, metadata={"help": "Truncate prompt + completion to this many tokens (TRL 1.16: 1024)."}
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Disable dropout in the model (TRL 1.16's DPO default: True)."}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass (TRL's base config turns it on; off here)."},
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Must be False: the reference changes every round."}
    )
    bf16: Optional[bool] = field(default=None, metadata={"help": BF16_HELP})

    def __post_init__(self):
        for name in ("rounds", "steps_per_round"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MrDPOConfig.{name} must be an integer >= 1; got {value!r}.")
        if isinstance(self.ce_weight, bool) or not isinstance(self.ce_weight, (int, float)) or self.ce_weight < 0:
            raise ValueError(f"MrDPOConfig.ce_weight must be a number >= 0; got {self.ce_weight!r}.")
        loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss_type != ["sigmoid"]:
            raise ValueError(
                f"MrDPOConfig.loss_type must be ['sigmoid'] (the CE term is ce_weight); got {loss_type!r}.")
        if self.precompute_ref_log_probs:
            raise ValueError(
                "MrDPOConfig.precompute_ref_log_probs must be False: the reference is refreshed every round.")
        if self.sync_ref_model:
            raise ValueError(
                "MrDPOConfig.sync_ref_model must be False: the reference is the merged model of each round.")
        self.max_steps = self.steps_per_round
        if self.bf16 is None:
            self.bf16 = default_bf16(self.use_cpu)
        super().__post_init__()


def check_mergeable(peft_config) -> str:
    """The method name of ``peft_config`` if mrDPO can merge and re-create it every round, else a ValueError."""
    from peft import LoraConfig, PeftConfig

    from ..registry import list_methods

    if not isinstance(peft_config, PeftConfig):
        raise ValueError(f"MrDPOTrainer needs a peft_config (LoraConfig or a mergeable peft-ext config); got "
                         f"{type(peft_config).__name__}.")
    if isinstance(peft_config, LoraConfig):
        return "lora"
    specs = {spec.config_cls: spec for spec in list_methods()}
    spec = specs.get(type(peft_config))
    mergeable = sorted(["lora"] + [s.name for s in list_methods() if s.mergeable and s.identity_at_init])
    if spec is None:
        raise ValueError(f"MrDPOTrainer merges the adapter every round; {type(peft_config).__name__} is not a "
                         f"mergeable method. Use one of {mergeable}.")
    if not spec.mergeable:
        raise ValueError(f"MrDPOTrainer merges the adapter every round, and {spec.name} cannot be merged "
                         f"(routed per token). Use one of {mergeable}.")
    starts_at_identity = getattr(peft_config, "starts_at_identity", None)  # a config that knows (LoRA-SB)
    if not (starts_at_identity() if callable(starts_at_identity) else spec.identity_at_init):
        hint = " (LoRA-SB: set r_init_std=0 or compensate=True)" if spec.name == "lora_sb" else ""
        raise ValueError(f"MrDPOTrainer needs a fresh adapter that leaves the merged model unchanged (the round's "
                         f"reference is the adapter disabled); a fresh {spec.name} adapter changes the output{hint}. "
                         f"Use one of {mergeable}.")
    return spec.name


def is_quantized(model) -> bool:
    """True for a bitsandbytes (or other quantized) transformers model."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_quantized", False))


def _prefix_len(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _GroundTruthCollator:
    """TRL's preference collator, plus ``gt_input_ids`` / ``gt_attention_mask`` / ``gt_completion_mask``
    (prompt + ground truth, right-padded, cut like the pairs) when the rows have ``ground_truth_ids``."""

    def __init__(self, inner, pad_token_id: int, max_length: Optional[int]):
        self.inner, self.pad_token_id, self.max_length = inner, pad_token_id, max_length

    def __call__(self, examples: list[dict]) -> dict:
        has_gt = "ground_truth_ids" in examples[0]
        batch = self.inner([{k: v for k, v in ex.items() if k != "ground_truth_ids"} for ex in examples])
        if not has_gt:
            return batch
        seqs = [ex["prompt_ids"] + ex["ground_truth_ids"] for ex in examples]
        masks = [[0] * len(ex["prompt_ids"]) + [1] * len(ex["ground_truth_ids"]) for ex in examples]
        if self.max_length is not None:
            seqs, masks = [s[: self.max_length] for s in seqs], [m[: self.max_length] for m in masks]
        width = max(len(s) for s in seqs)
        batch["gt_input_ids"] = torch.tensor([s + [self.pad_token_id] * (width - len(s)) for s in seqs])
        batch["gt_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        batch["gt_completion_mask"] = torch.tensor([m + [0] * (width - len(m)) for m in masks])
        return batch


class MrDPOTrainer(DPOTrainer):
    """Multi-round DPO (video-SALMONN 2): every round builds pairs from the current policy, trains DPO + λ·CE against
    the adapter-disabled model, then merges the adapter into the base and starts a fresh one (see the module docstring).

    ``model`` is the *base* model (not a ``PeftModel``); ``peft_config`` is PEFT's ``LoraConfig`` or any mergeable
    peft-ext config whose fresh adapter is an identity; ``train_dataset`` holds the prompts (whatever columns
    ``pair_builder`` reads); ``pair_builder(model, tokenizer, prompts, round) -> Dataset | list[dict]`` returns
    ``prompt`` / ``chosen`` / ``rejected`` (+ the ground-truth column) rows for that round.
    """

    _tag_names = ["trl", "dpo", "mrdpo", "peft-ext"]
    _name = "mrDPO"
    _paper = {
        "title": "video-SALMONN 2: Captioning-Enhanced Audio-Visual Large Language Models",
        "id": "2506.15220",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{tang2025videosalmonn2,
                title   = {{video-SALMONN 2: Captioning-Enhanced Audio-Visual Large Language Models}},
                author  = {Changli Tang and Yixuan Li and Yudong Yang and Jimin Zhuang and Guangzhi Sun and Wei Li
                           and Zejun Ma and Chao Zhang},
                year    = 2025,
                journal = {arXiv preprint arXiv:2506.15220},
            }"""),
    }

    def __init__(
        self,
        model,
        args: MrDPOConfig,
        peft_config,
        pair_builder: Callable,
        train_dataset,
        processing_class,
        eval_dataset=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        from datasets import Dataset
        from peft import PeftModel

        if not isinstance(args, MrDPOConfig):
            raise TypeError(f"MrDPOTrainer needs args=MrDPOConfig(...); got {type(args).__name__}.")
        self.method_name = check_mergeable(peft_config)
        if isinstance(model, PeftModel):
            raise ValueError("MrDPOTrainer takes the base model and a peft_config (it creates a fresh adapter every "
                             "round); got a PeftModel. Pass model.merge_and_unload() or the base model.")
        if is_quantized(model):
            if not args.merge_dequantized:
                raise ValueError("MrDPOTrainer refuses a quantized base: every round merges into the base weights and "
                                 "re-quantizing them accumulates error. Load the base in full precision, or set "
                                 "MrDPOConfig(merge_dequantized=True) to merge into a dequantized copy.")
            model = model.dequantize()
            # transformers leaves is_loaded_in_4bit/8bit set after dequantize(); TRL reads them and would cast the
            # adapter to bf16 (its QLoRA rule), which makes the fp32 merge inexact. The copy is full precision now.
            model.is_loaded_in_4bit = model.is_loaded_in_8bit = False
        if optimizers != (None, None):
            raise ValueError("MrDPOTrainer rebuilds the optimizer and scheduler every round (the adapter is new); "
                             "custom optimizers= are not supported, set optim / lr_scheduler_type in MrDPOConfig.")
        if not callable(pair_builder):
            raise TypeError(f"MrDPOTrainer.pair_builder must be callable (model, tokenizer, prompts, round) -> rows; "
                            f"got {type(pair_builder).__name__}.")
        if not isinstance(train_dataset, Dataset) or len(train_dataset) == 0:
            raise ValueError("MrDPOTrainer.train_dataset must be a non-empty datasets.Dataset of prompts.")
        self.pair_builder = pair_builder
        self.prompts = train_dataset
        self._peft_config = copy.deepcopy(peft_config)
        self._defer_train_prepare = True  # the prompts are not pairs: DPOTrainer must not tokenize them
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, peft_config=peft_config)
        self._defer_train_prepare = False
        self.data_collator = _GroundTruthCollator(self.data_collator, self._tokenizer.pad_token_id, args.max_length)
        self.rounds_done = 0
        self.round_history: list[dict] = []
        self._pre_dpo = self._snapshot_base_weights()

    # ---- data -------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "ground_truth_ids" not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + ["ground_truth_ids"]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if getattr(self, "_defer_train_prepare", False) and dataset_name == "train":
            return dataset
        gt = args.ground_truth_column
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if gt not in prepared.column_names:
            return prepared
        tokenizer = self._tokenizer
        eos = tokenizer.eos_token or ""

        def add_ground_truth(example):
            text = example[gt] if example[gt].endswith(eos) else example[gt] + eos
            full = tokenizer(text=example["prompt"] + text)["input_ids"]  # tokenized as TRL tokenizes the pairs
            return {"ground_truth_ids": full[_prefix_len(example["prompt_ids"], full):]}

        return prepared.map(add_ground_truth)

    def _check_pairs(self, rows, round_index: int):
        """The builder's rows as a ``Dataset``, or one-line errors for wrong columns / types / an empty round."""
        from datasets import Dataset

        if isinstance(rows, list):
            if rows and not all(isinstance(r, dict) for r in rows):
                raise ValueError(f"MrDPOTrainer: pair_builder must return a Dataset or a list of dicts; round "
                                 f"{round_index} returned a list of {type(rows[0]).__name__}.")
            rows = Dataset.from_list(rows) if rows else Dataset.from_dict({})
        elif isinstance(rows, dict):
            rows = Dataset.from_dict(rows)
        elif not isinstance(rows, Dataset):
            raise ValueError(f"MrDPOTrainer: pair_builder must return a Dataset or a list of dicts; round "
                             f"{round_index} returned {type(rows).__name__}.")
        if len(rows) == 0:
            raise ValueError(f"MrDPOTrainer: pair_builder returned no preference pairs in round {round_index} "
                             "(every prompt was skipped); give it more prompts or more samples per prompt.")
        missing = [c for c in PAIR_COLUMNS if c not in rows.column_names]
        if missing:
            raise ValueError(f"MrDPOTrainer: pair_builder returned columns {rows.column_names} in round "
                             f"{round_index}, missing {missing}; it must return 'prompt', 'chosen', 'rejected' (text) "
                             f"and optionally {self.args.ground_truth_column!r}.")
        for col in PAIR_COLUMNS + ((self.args.ground_truth_column,) if self.args.ground_truth_column in
                                   rows.column_names else ()):
            bad = [v for v in rows[col] if not isinstance(v, str)]
            if bad:
                raise ValueError(f"MrDPOTrainer: pair_builder column {col!r} must hold text in round {round_index}; "
                                 f"got {type(bad[0]).__name__} (conversational pairs are not supported).")
        return rows

    # ---- loss -------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        """DPO-sigmoid (TRL) + ``ce_weight`` × token-mean CE on the ground truth, or TRL's ``sft`` term on chosen."""
        gt = {k: inputs.pop(k) for k in ("gt_input_ids", "gt_attention_mask", "gt_completion_mask") if k in inputs}
        lam = float(self.args.ce_weight)
        if gt or lam == 0.0:
            self.loss_types, self.loss_weights = ["sigmoid"], [1.0]
        else:  # TRL's "sft" term: −mean log π over the chosen completion tokens of the batch, from the same forward
            self.loss_types, self.loss_weights = ["sigmoid", "sft"], [1.0, lam]
        result = super()._compute_loss(model, inputs, return_outputs)
        if not gt or lam == 0.0:
            return result
        loss, outputs = result if return_outputs else (result, None)
        mask = gt["gt_completion_mask"]
        labels = gt["gt_input_ids"].masked_fill(mask == 0, -100)
        out = model(input_ids=gt["gt_input_ids"], attention_mask=gt["gt_attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)
        shift = mask[..., 1:]
        ce = -out.log_probs[:, -shift.size(1):][shift.bool()].mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["ce_loss"].append(self.accelerator.gather_for_metrics(ce.detach()).mean().item())
        loss = loss + lam * ce
        return (loss, outputs) if return_outputs else loss

    # ---- rounds -----------------------------------------------------------------------------------------------
    def _rounds_dir(self) -> Path:
        return Path(self.args.output_dir) / "rounds"

    def _snapshot_base_weights(self) -> dict:
        """Copies of the base weights the adapter wraps (what each merge changes), for ``rebirth``."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        snap = {}
        for name, module in self.model.get_base_model().named_modules():
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                for pname, p in base.named_parameters(recurse=False):
                    snap[f"{name}.{pname}"] = p.detach().to("cpu", copy=True)
        return snap

    def _fresh_adapter(self, base, seed: int):
        """A new adapter of the same config on ``base``, set up as DPOTrainer sets up its first one."""
        from peft import get_peft_model
        from transformers import set_seed
        from trl.trainer.utils import disable_dropout_in_model

        set_seed(seed)
        model = get_peft_model(base, copy.deepcopy(self._peft_config))
        if self.args.gradient_checkpointing:
            model.enable_input_require_grads()
        if self.args.disable_dropout:
            disable_dropout_in_model(model)
        model.add_model_tags(self._tag_names)
        self.model = self.model_wrapped = model
        return model

    def _merge_and_refresh(self, next_round: int):
        base = self.model.merge_and_unload()
        self._fresh_adapter(base, self.args.seed + next_round)

    def load_rounds(self, upto: int, folder: Optional[str] = None):
        """Replay the saved adapters of rounds 1..``upto`` (merge each into the base), as if those rounds had just run.

        The merges are the same operations in the same order as in an uninterrupted run, so the base weights are
        bitwise the same, and the run continues with round ``upto + 1``."""
        folder = Path(folder) if folder is not None else self._rounds_dir()
        if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto <= self.args.rounds:
            raise ValueError(f"MrDPOTrainer: resume_from_round must be an integer in 0..{self.args.rounds}; "
                             f"got {upto!r}.")
        if self.rounds_done:
            raise ValueError("MrDPOTrainer.load_rounds: this trainer has already trained rounds; make a new one.")
        base = self.model.unload()  # the fresh adapter made in __init__ is dropped unmerged: the base is untouched
        base = apply_rounds(base, folder, upto)
        self._fresh_adapter(base, self.args.seed + upto + 1)
        self.rounds_done = upto
        history = folder / "history.json"
        if history.is_file():
            import json

            self.round_history = [r for r in json.loads(history.read_text())["rounds"] if r["round"] <= upto]

    def train(self, resume_from_round: Optional[int] = None, on_round_end: Optional[Callable] = None, **kwargs):
        """Run the remaining rounds; ``resume_from_round=k`` first replays the saved adapters of rounds 1..k.

        ``on_round_end(trainer, round, record)`` runs after each round's merge (e.g. to evaluate the merged model);
        what it returns (a dict) is added to the round's record in ``round_history``."""
        from transformers import set_seed

        from .._io import atomic_write_json

        if kwargs.get("resume_from_checkpoint"):
            raise ValueError("MrDPOTrainer resumes by round: train(resume_from_round=k) (the saved rounds are under "
                             "output_dir/rounds), not resume_from_checkpoint.")
        if resume_from_round:
            self.load_rounds(resume_from_round)
        result = None
        for k in range(self.rounds_done + 1, self.args.rounds + 1):
            set_seed(self.args.seed + k)
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                rows = self.pair_builder(self.model, self.processing_class, self.prompts, k)
            self.model.train(was_training)
            pairs = self._check_pairs(rows, k)
            self.train_dataset = self._prepare_dataset(pairs, self.processing_class, self.args, "train")
            if len(self.train_dataset) == 0:
                raise ValueError(f"MrDPOTrainer: every preference pair of round {k} was dropped (prompt longer than "
                                 f"max_length={self.args.max_length}).")
            self.optimizer, self.lr_scheduler = None, None  # a new AdamW state and schedule every round
            self.args.max_steps = self.args.steps_per_round
            result = super().train(**kwargs)
            record = {"round": k, "pairs": len(pairs), "train_loss": result.training_loss,
                      "steps": result.global_step, **_round_means(self.state.log_history)}
            if self.args.save_rounds and self.is_world_process_zero():
                from ..runner import save_adapter

                save_adapter(self.model, None, self._rounds_dir() / f"round-{k}")
            self._merge_and_refresh(k + 1)
            self.rounds_done = k
            if on_round_end is not None:
                record.update(on_round_end(self, k, record) or {})
            self.round_history.append(record)
            if self.args.save_rounds and self.is_world_process_zero():
                atomic_write_json(self._rounds_dir() / "history.json", {"rounds": self.round_history})
        return result

    # ---- rebirth ----------------------------------------------------------------------------------------------
    def rebirth(self, sft_dataset, args=None, answer_fn: Optional[Callable] = None, max_new_tokens: int = 128):
        """SFT the pre-DPO model on answers written by the current (mrDPO) model; returns the ``SFTTrainer``.

        ``sft_dataset`` has a ``prompt`` column. The mrDPO model answers each prompt greedily (or with
        ``answer_fn(model, tokenizer, prompts) -> list[str]``); then the pre-DPO weights are restored into the base
        (the mrDPO model is gone from memory afterwards: its round adapters are under output_dir/rounds) and a fresh
        adapter of the same config is trained with TRL's ``SFTTrainer`` on the (prompt, completion) pairs.
        """
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from ..data.preference import generate_answers

        if "prompt" not in getattr(sft_dataset, "column_names", []):
            raise ValueError("MrDPOTrainer.rebirth: sft_dataset needs a 'prompt' column (the questions to answer).")
        prompts = list(sft_dataset["prompt"])
        model = self.model
        model.eval()
        with torch.no_grad():
            answers = (answer_fn(model, self.processing_class, prompts) if answer_fn is not None
                       else generate_answers(model, self._tokenizer, prompts, max_new_tokens=max_new_tokens))
        base = model.unload()  # the identity adapter of the next round; the base holds the final mrDPO weights
        with torch.no_grad():
            params = dict(base.named_parameters())
            for name, value in self._pre_dpo.items():
                params[name].copy_(value.to(params[name].device))
        data = Dataset.from_dict({"prompt": prompts, "completion": answers})
        self.rebirth_data = data
        if args is None:
            args = SFTConfig(output_dir=str(Path(self.args.output_dir) / "rebirth"),
                             max_steps=self.args.steps_per_round,
                             learning_rate=self.args.learning_rate, seed=self.args.seed, report_to=self.args.report_to,
                             use_cpu=self.args.use_cpu, bf16=self.args.bf16, save_strategy="no",
                             per_device_train_batch_size=self.args.per_device_train_batch_size,
                             disable_tqdm=self.args.disable_tqdm, gradient_checkpointing=False,
                             completion_only_loss=True, packing=False, max_length=self.args.max_length)
        trainer = SFTTrainer(model=base, args=args, train_dataset=data, processing_class=self.processing_class,
                             peft_config=copy.deepcopy(self._peft_config))
        trainer.train()
        self.model = self.model_wrapped = trainer.model
        return trainer


def apply_rounds(base, folder, upto: Optional[int] = None):
    """Merge the saved round adapters ``folder/round-1 .. round-upto`` (all found when None) into ``base`` in order:
    the mrDPO model, rebuilt from its small per-round adapters (each is a ΔW on the previous round's merged model)."""
    from peft import PeftModel

    folder = Path(folder)
    if upto is None:
        upto = 0
        while (folder / f"round-{upto + 1}" / "adapter_config.json").is_file():
            upto += 1
    for k in range(1, upto + 1):
        path = folder / f"round-{k}"
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"mrDPO: cannot rebuild round {upto}: {path} has no saved adapter (save_rounds=True "
                             "writes one per round).")
        base = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return base


def _round_means(log_history: list) -> dict:
    """Means over a round's training logs of the DPO metrics (margins, reward accuracy, CE)."""
    keys = {"rewards/margins": "margin", "rewards/accuracies": "reward_accuracy", "rewards/chosen": "reward_chosen",
            "rewards/rejected": "reward_rejected", "ce_loss": "ce_loss", "loss": "loss"}
    out: dict[str, Any] = {}
    for key, name in keys.items():
        values = [row[key] for row in log_history if key in row]
        if values:
            out[name] = float(sum(values) / len(values))
    return out
