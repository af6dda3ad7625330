"""``peft-ext train`` for recipes with a ``trainer:`` section: SFT, DPO, mrDPO, GRPO and SFT → GRPO on GSM-style
problems, with per-round (per-stage) metrics, a plot, atomic outputs and resume from the last finished round/stage.

Output folder (``recipe.output_dir``):

* ``metrics.json``: the baseline and one record per round or stage — training metrics (DPO reward margin and
  accuracy, CE, GRPO mean reward per reward function, KL) and, with ``evaluation.generate: n``, greedy answers to n
  held-out problems scored for accuracy, format rate, mean length (tokens) and repetition (share of repeated 3-grams);
* ``results.png``: those per round/stage; ``adapter/``: the final adapter with its model card;
* ``rounds/round-k`` (dpo/mrdpo: each round's adapter, a ΔW on the previous round's merged model — rebuild the mrDPO
  model with ``peft_ext.trainers.mrdpo.apply_rounds``), ``stages/sft`` and ``stages/grpo`` (the stage adapters).

``resume=True`` continues after the last round/stage whose adapter is complete on disk; the result equals an
uninterrupted run (each round/stage re-seeds itself).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .._io import atomic_savefig, atomic_write_json
from ..recipe import OWN_LOOP_TRAINERS, Recipe, app_trainer_names, own_loop_trainer, to_dict


def evaluate_generations(model, tokenizer, rows, n: int, max_new_tokens: int) -> dict:
    """Greedy answers to the first ``n`` problems of ``rows``: accuracy (GSM scorer), format rate (think/answer
    tags), mean length in tokens and repetition (share of repeated word 3-grams)."""
    from ..data.gsm import score_gsm
    from ..data.preference import generate_answers, gsm_prompt
    from ..rewards import format_reward, repetition_penalty_reward

    rows = rows.select(range(min(n, len(rows))))
    answers = generate_answers(model, tokenizer, [gsm_prompt(q) for q in rows["question"]],
                               max_new_tokens=max_new_tokens)
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    return {
        "accuracy": float(np.mean([score_gsm(a, ref) for a, ref in zip(answers, rows["answer"])])),
        "format_rate": float(np.mean(format_reward(answers))),
        "mean_length": float(np.mean(lengths)),
        "repetition": abs(float(np.mean(repetition_penalty_reward(answers)))),
        "n": len(answers),
    }


def _common_args(recipe: Recipe, output_dir: Path, quiet: bool) -> dict:
    import torch

    args = dict(output_dir=str(output_dir), seed=recipe.seed, data_seed=recipe.seed, report_to=[],
                use_cpu=not torch.cuda.is_available(), disable_tqdm=quiet, save_strategy="no", logging_steps=1,
                per_device_train_batch_size=4)
    args.update(recipe.training)
    return args


def _stage_metrics(log_history: list) -> dict:
    """Means of a stage's logged training metrics, with short names."""
    out = {}
    for key in sorted({k for row in log_history for k in row}):
        values = [row[key] for row in log_history if isinstance(row.get(key), (int, float))]
        skipped = key in ("epoch", "step", "learning_rate", "grad_norm", "total_flos") or key.startswith("train_")
        if not values or skipped:
            continue
        name = key.replace("rewards/", "reward_").replace("/mean", "").replace("/", "_")
        out[name] = float(np.mean(values))
    return out


def _sft_data(rows):
    """GSM problems as (prompt, completion) rows; the completion is the worked solution in think/answer tags, the
    format every trainer recipe uses (SFT targets, mrDPO's gold answers, the GRPO format reward)."""
    from datasets import Dataset

    from ..data.preference import gsm_prompt
    from ..rewards import tagged_solution

    completions = [tagged_solution(c, a) for c, a in zip(rows["answer_cot"], rows["answer"])]
    return Dataset.from_dict({"prompt": [gsm_prompt(q) for q in rows["question"]], "completion": completions})


def _done(folder: Path) -> bool:
    from .._io import adapter_folder_is_whole

    return adapter_folder_is_whole(folder)


class _Run:
    """State of one recipe run: model, data, records, the metrics file."""

    def __init__(self, recipe: Recipe, resume: bool, quiet: bool):
        from ..runner import build_peft_config, load_raw_splits, load_tokenizer_and_model

        self.recipe, self.resume, self.quiet = recipe, resume, quiet
        self.t = recipe.trainer
        self.out = Path(recipe.output_dir)
        self.tokenizer, self.base = load_tokenizer_and_model(recipe)
        if self.tokenizer.eos_token is None:  # TRL appends EOS to completions (the tiny models borrow BERT's vocab)
            self.tokenizer.eos_token = self.tokenizer.sep_token or self.tokenizer.pad_token
        self.train_rows, self.eval_rows = load_raw_splits(recipe)
        self.peft_config = build_peft_config(recipe)
        self.records: list[dict] = []
        self.history_path = self.out / "stages" / "history.json"
        if resume and self.history_path.is_file():
            self.records = json.loads(self.history_path.read_text())["records"]
        self.start = time.time()

    def evaluate(self, model) -> dict:
        ev = self.recipe.evaluation
        if not ev.generate:
            return {}
        return evaluate_generations(model, self.tokenizer, self.eval_rows, ev.generate, ev.max_new_tokens)

    def record(self, entry: dict) -> None:
        self.records = [r for r in self.records if r["stage"] != entry["stage"]] + [entry]
        atomic_write_json(self.history_path, {"records": self.records})

    def grpo_args(self):
        from .gazal import GazalGRPOConfig

        t = self.t
        kwargs = _common_args(self.recipe, self.out / "checkpoints" / "grpo", self.quiet)
        if "per_device_train_batch_size" not in self.recipe.training:  # one group of completions per step
            kwargs["per_device_train_batch_size"] = t.num_generations
        extra = dict(rewards=list(t.rewards), reward_weights=list(t.reward_weights or [1.0] * len(t.rewards)),
                     num_generations=t.num_generations, max_completion_length=t.max_new_tokens,
                     temperature=t.temperature, max_steps=t.grpo_steps)
        if t.beta is not None:
            extra["beta"] = t.beta
        return GazalGRPOConfig(**{**kwargs, **extra, **t.args})

    def sft_args(self, name: str):
        from .gazal import GazalSFTConfig

        kwargs = _common_args(self.recipe, self.out / "checkpoints" / name, self.quiet)
        extra = self.t.args if self.t.name == "sft" else {}
        return GazalSFTConfig(**{**kwargs, "max_steps": self.t.sft_steps, "max_length": self.recipe.data.max_length
                                 + self.t.max_new_tokens, **extra})


def _progress(total: int, quiet: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=True)


def _run_sft_warmup(run: _Run):
    """dpo/mrdpo with ``sft_steps``: SFT a fresh adapter on the worked solutions, merge it into the base."""
    from peft import PeftModel
    from trl import SFTTrainer

    from ..runner import save_adapter

    folder = run.out / "stages" / "sft"
    if run.resume and _done(folder):
        return PeftModel.from_pretrained(run.base, str(folder)).merge_and_unload()
    sft = SFTTrainer(model=run.base, args=run.sft_args("sft"), train_dataset=_sft_data(run.train_rows),
                     processing_class=run.tokenizer, peft_config=run.peft_config)
    result = sft.train()
    save_adapter(sft.model, None, folder)
    run.record({"stage": "sft", "train_loss": result.training_loss, "steps": result.global_step,
                **_stage_metrics(sft.state.log_history), "eval": run.evaluate(sft.model)})
    return sft.model.merge_and_unload()


def _run_mrdpo(run: _Run) -> tuple:
    from ..data.preference import GSMPairBuilder
    from ..runner import save_adapter
    from .mrdpo import MrDPOConfig, MrDPOTrainer

    t = run.t
    base = _run_sft_warmup(run) if t.sft_steps else run.base
    rounds = 1 if t.name == "dpo" else t.rounds
    kwargs = _common_args(run.recipe, run.out / "checkpoints" / "dpo", run.quiet)
    extra = dict(rounds=rounds, steps_per_round=t.steps_per_round, ce_weight=t.ce_weight,
                 max_length=run.recipe.data.max_length + t.max_new_tokens, output_dir=str(run.out))
    if t.beta is not None:
        extra["beta"] = t.beta
    args = MrDPOConfig(**{**kwargs, **extra, **t.args})
    builder = GSMPairBuilder(num_samples=t.num_samples, max_new_tokens=t.max_new_tokens, temperature=t.temperature,
                             seed=run.recipe.seed, prompts_per_round=t.prompts_per_round, tagged=True)
    trainer = MrDPOTrainer(model=base, args=args, peft_config=run.peft_config, pair_builder=builder,
                           train_dataset=run.train_rows, processing_class=run.tokenizer)
    done = 0
    if run.resume:
        while done < rounds and _done(run.out / "rounds" / f"round-{done + 1}"):
            done += 1
    bar = _progress(rounds, run.quiet, f"{t.name} rounds")
    bar.update(done)

    def on_round_end(tr, k, record):
        bar.update(1)
        entry = {"stage": f"round-{k}", **{key: v for key, v in record.items() if key != "round"},
                 **builder.last_stats, "eval": run.evaluate(tr.model)}
        run.record(entry)
        return {}

    trainer.train(resume_from_round=done or None, on_round_end=on_round_end)
    bar.close()
    final = run.out / "rounds" / f"round-{rounds}"
    model = trainer.model
    if t.rebirth:
        from datasets import Dataset

        from ..data.preference import gsm_prompt

        prompts = Dataset.from_dict({"prompt": [gsm_prompt(q) for q in run.train_rows["question"]]})
        sft = trainer.rebirth(prompts, max_new_tokens=t.max_new_tokens)
        save_adapter(sft.model, None, run.out / "stages" / "rebirth")
        run.record({"stage": "rebirth", "train_loss": sft.state.log_history[-1].get("train_loss"),
                    **_stage_metrics(sft.state.log_history), "eval": run.evaluate(sft.model)})
        model, final = sft.model, run.out / "stages" / "rebirth"
    return model, final


def _run_sft_grpo(run: _Run) -> tuple:
    from ..runner import save_adapter
    from .gazal import GazalGRPOTrainer, continue_adapter, sft_then_grpo

    t = run.t
    stages = run.out / "stages"
    grpo_data = None
    if t.name != "sft":
        from datasets import Dataset

        from ..data.preference import gsm_prompt

        grpo_data = Dataset.from_dict({"prompt": [gsm_prompt(q) for q in run.train_rows["question"]],
                                       "answer": list(run.train_rows["answer"])})
    names = {"sft": ["sft"], "grpo": ["grpo"], "sft_grpo": ["sft", "grpo"]}[t.name]
    bar = _progress(len(names), run.quiet, f"{t.name} stages")
    last = stages / names[-1]
    if run.resume and _done(last):  # finished: reload the final adapter for the summary
        bar.update(len(names))
        bar.close()
        return continue_adapter(run.base, last), last

    def on_stage_end(stage, model, trainer):
        bar.update(1)
        run.record({"stage": stage, "train_loss": trainer.state.log_history[-1].get("train_loss"),
                    "steps": trainer.state.global_step, **_stage_metrics(trainer.state.log_history),
                    "eval": run.evaluate(model)})

    if t.name == "sft":
        from trl import SFTTrainer

        sft = SFTTrainer(model=run.base, args=run.sft_args("sft"), train_dataset=_sft_data(run.train_rows),
                         processing_class=run.tokenizer, peft_config=run.peft_config)
        sft.train()
        save_adapter(sft.model, None, last)
        on_stage_end("sft", sft.model, sft)
        model = sft.model
    elif t.name == "grpo":
        grpo = GazalGRPOTrainer(model=run.base, args=run.grpo_args(), train_dataset=grpo_data,
                                processing_class=run.tokenizer, peft_config=run.peft_config)
        grpo.train()
        on_stage_end("grpo", grpo.model, grpo)
        model = grpo.model
        save_adapter(model, None, last)
    else:
        resume_stage = "grpo" if run.resume and _done(stages / "sft") else None
        if resume_stage:
            bar.update(1)
        model = sft_then_grpo(run.base, run.tokenizer, _sft_data(run.train_rows), grpo_data, run.peft_config,
                              run.sft_args("sft"), run.grpo_args(), stage_dir=str(stages), resume_stage=resume_stage,
                              on_stage_end=on_stage_end)
    bar.close()
    return model, last


def _copy_adapter(src: Path, dest: Path) -> None:
    """Copy a saved adapter folder file by file, each write atomic (the final round's or stage's adapter)."""
    from .._io import atomic_write

    for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        data = f.read_bytes()
        atomic_write(dest / f.relative_to(src), lambda fh, data=data: fh.write(data), binary=True)


def plot_stages(metrics: dict, path: Path) -> Optional[Path]:
    """Held-out accuracy (and format rate) per round/stage, with the DPO margin or GRPO reward on a second axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = ([{"stage": "start", "eval": metrics["baseline"]}] if metrics.get("baseline") else []) + metrics["stages"]
    labels = [r["stage"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key in ("accuracy", "format_rate"):
        ys = [r.get("eval", {}).get(key, np.nan) for r in rows]
        if not all(np.isnan(ys)):
            ax.plot(labels, ys, marker="o", label=key)
    ax.set_ylabel("held-out")
    ax2 = ax.twinx()
    for key, style in (("margin", "--"), ("reward", ":")):
        ys = [r.get(key, np.nan) for r in rows]
        if not all(np.isnan(ys)):
            ax2.plot(labels, ys, linestyle=style, color="grey", label=f"train {key}")
    ax2.set_ylabel("train margin / reward")
    ax.set_title(f"{metrics['trainer']} — {metrics['name']}")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def train_recipe(recipe: Recipe, resume: bool = False, quiet: bool = False) -> dict:
    """Run a recipe whose ``trainer.name`` is set; returns (and writes) its metrics."""
    import torch

    from ..runner.reporting import device_name

    t = recipe.trainer
    if t.name is None:
        raise ValueError("train_recipe runs recipes with a trainer section (trainer.name); use peft_ext.runner.train.")
    if t.name in OWN_LOOP_TRAINERS or t.name in app_trainer_names():  # mtp, planner, ..., peft_ext/apps: own loops
        return own_loop_trainer(t.name)[2](recipe, resume=resume, quiet=quiet)
    torch.manual_seed(recipe.seed)
    run = _Run(recipe, resume, quiet)
    out = run.out
    baseline = None
    if recipe.evaluation.baseline and recipe.evaluation.generate:
        baseline = run.evaluate(run.base)
    if t.name in ("dpo", "mrdpo"):
        model, final = _run_mrdpo(run)
    else:
        model, final = _run_sft_grpo(run)
    _copy_adapter(final, out / "adapter")
    run.tokenizer.save_pretrained(out / "adapter")
    metrics = {
        "name": recipe.name,
        "trainer": t.name,
        "method": recipe.method.name,
        "seed": recipe.seed,
        "budget": {"train_problems": len(run.train_rows), "eval_problems": recipe.evaluation.generate,
                   "sft_steps": t.sft_steps, "rounds": t.rounds if t.name == "mrdpo" else (1 if t.name == "dpo" else 0),
                   "steps_per_round": t.steps_per_round if t.name in ("dpo", "mrdpo") else 0,
                   "grpo_steps": t.grpo_steps if t.name in ("grpo", "sft_grpo") else 0},
        "baseline": baseline,
        "stages": run.records,
        "final_adapter": str(final),
        "train_time": time.time() - run.start,
        "device": device_name(),
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot:
        plot_stages(metrics, out / "results.png")
    if not quiet:
        print(format_stages(metrics))
        print(f"adapter: {out / 'adapter'}  metrics: {out / 'metrics.json'}")
    return metrics


def format_stages(metrics: dict) -> str:
    """A plain-text table: one line per round/stage with held-out accuracy, format rate, length and the DPO margin or
    GRPO reward."""
    head = f"{'stage':>10} | {'accuracy':>8} | {'format':>6} | {'length':>6} | {'margin':>7} | {'reward':>7}"
    lines = [f"{metrics['trainer']} — {metrics['name']}", head, "-" * len(head)]
    rows = ([{"stage": "start", "eval": metrics["baseline"]}] if metrics.get("baseline") else []) + metrics["stages"]
    for r in rows:
        ev = r.get("eval") or {}
        nan = float("nan")
        lines.append(f"{r['stage']:>10} | {ev.get('accuracy', nan):8.3f} | {ev.get('format_rate', nan):6.2f}"
                     f" | {ev.get('mean_length', float('nan')):6.1f} | {r.get('margin', float('nan')):7.3f}"
                     f" | {r.get('reward', float('nan')):7.3f}")
    return "\n".join(lines)
