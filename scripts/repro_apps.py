"""Reproduction table of the application recipes (issue 19): LoRAT, MoRE, RegionBLIP, Arcana, AIGV quality, WavLLM,
Uni-MoE (video-SALMONN 2 is a config of the mrDPO trainer, listed without a run).

Each recipe is run through the entry point ``peft-ext train`` uses (``peft_ext.cli.main(["train", ...])``) into its
own ``output_dir``; ``--collect`` only reads the ``metrics.json`` files already there. Either way the summary is
written atomically to ``results/repro_apps.json``: one row per paper with what it reproduces, the metric, the LoRA
setting's and the baseline's numbers, the wall time, and whether the run is older than the code or recipe that made it.

    python scripts/repro_apps.py --collect                 # table from the runs already in out/
    python scripts/repro_apps.py --only more,regionblip     # rerun two recipes (minutes each, one CPU thread)
    python scripts/repro_apps.py --resume --only more       # re-evaluate from the saved adapters, no retraining
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# recipe name -> (app module, what it reproduces)
APPS = {
    "lorat": ("lorat", "LoRA r = 64, α = 64 on a ViT one-stream tracker, type embedding + head trained fully; merged "
                       "LoRA adds no inference latency"),
    "more": ("more", "MiniLM text tower + LoRA r = 16, α = 8, dropout 0.1, bias 'all', aligned to a second modality "
                     "by symmetric InfoNCE with a trained temperature; zero-shot retrieval"),
    "regionblip": ("regionblip", "one LoRA per modality (gated_lora, route_ids = modality per call) on a frozen "
                                 "LLaVA-like LM, alternating modality batches, merge disabled"),
    "arcana": ("arcana", "MM-LoRA: vision and language LoRAs picked per token (gated_lora, modality mask), "
                         "merge disabled"),
    "aigv_quality": ("aigv", "SmolLM2 + LoRA r = 8, α = 16 on q/v scoring quality by the level-word read-out "
                             "(softmax over excellent..bad), PLCC + rank loss"),
    "wavllm": ("wavllm", "prompt-aware LoRA (instruction-conditioned scales, stage 1 → stage 2) vs LoRA on q/o, "
                         "multi-task with paraphrased instructions, unseen paraphrases at test"),
    "unimoe": ("unimoe", "the uni_moe preset: LoRA on every expert of a tiny Mixtral-like MoE (target_parameters) "
                         "plus attention, vs attention only"),
    "video_salmonn2": ("", "mrDPO with the paper's LoRA (r = 128, α = 256, q/k/v), rounds merged, rebirth SFT"),
}


def _recipe(name: str):
    from peft_ext.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / f"{name}.yaml")


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


def summarise(name: str, m: dict) -> dict:
    """The row's metric, LoRA-setting and baseline numbers and a one-line ``measured`` text from one metrics.json."""
    if name == "lorat":
        lora, frozen, merge = m["tracking"]["lora"], m["tracking"]["frozen"], m["merge"]
        return {
            "metric": "held-out digit tracking: mean IoU / success (IoU > 0.5); forward time of a 64-pair batch, "
                      "unmerged vs merged",
            "lora": lora, "baseline": {"name": "frozen ViT (type embedding + head only)", **frozen},
            "merge": {"max_abs_diff": merge["max_abs_diff"], "unmerged_s": _r(merge["unmerged_s"], 4),
                      "merged_s": _r(merge["merged_s"], 4), "unmerged_over_merged": _r(merge["unmerged_over_merged"])},
            "pretrain_digit_patch_accuracy": _r(m["pretrain"].get("digit_patch_accuracy")),
            "measured": (f"merged forward {merge['merged_s'] * 1e3:.0f} ms vs unmerged {merge['unmerged_s'] * 1e3:.0f}"
                         f" ms ({merge['unmerged_over_merged']:.2f}× faster merged, max |Δbox| "
                         f"{merge['max_abs_diff']:.1e}); mean IoU {lora['mean_iou']:.3f} LoRA vs "
                         f"{frozen['mean_iou']:.3f} frozen"),
        }
    if name == "more":
        ret, oracle = m["retrieval"], m.get("oracle")
        keys = ("text_to_signal_R@1", "text_to_signal_R@10", "signal_to_text_R@1", "signal_to_text_R@10")
        lora = {k: _r(ret["lora"][k]) for k in keys}
        frozen = {k: _r(ret["frozen"][k]) for k in keys} if "frozen" in ret else None
        run = m["runs"]["lora"]
        text = (f"R@10 text→signal {lora['text_to_signal_R@10']:.3f} LoRA vs "
                f"{frozen['text_to_signal_R@10']:.3f} frozen, signal→text {lora['signal_to_text_R@10']:.3f} vs "
                f"{frozen['signal_to_text_R@10']:.3f}" if frozen else
                f"R@10 text→signal {lora['text_to_signal_R@10']:.3f}, signal→text {lora['signal_to_text_R@10']:.3f}")
        if oracle:
            text += (f" (ceiling {oracle['text_to_signal_R@10']:.3f} / {oracle['signal_to_text_R@10']:.3f}, chance "
                     f"{m['chance']['R@10']:.3f})")
        text += f"; τ {run['temperature_start']:.4f} → {run['temperature_end']:.4f}"
        return {"metric": f"zero-shot retrieval over {m['sizes']['test']} held-out snippets, recall@k both directions",
                "lora": lora, "baseline": {"name": "frozen text tower (projections, signal encoder, τ trained)",
                                           **(frozen or {})},
                "oracle": {k: _r(oracle[k]) for k in keys} if oracle else None,
                "chance": m["chance"], "temperature": {"start": _r(run["temperature_start"], 5),
                                                       "end": _r(run["temperature_end"], 5)},
                "measured": text}
    if name == "regionblip":
        acc = m["accuracy"]
        per, shared = acc["per_modality"], acc.get("shared")
        text = (f"caption accuracy image {per['image']:.2f} / point cloud {per['pointcloud']:.2f} per-modality LoRA"
                + (f" vs {shared['image']:.2f} / {shared['pointcloud']:.2f} one shared LoRA" if shared else "")
                + f" (chance {m['chance']:.2f}); image through the point-cloud branch "
                  f"{m['swapped_branch_accuracy']['image']:.2f}; counting kept {per['text']:.2f}")
        return {"metric": "digit caption accuracy per modality (held-out), counting accuracy through the base",
                "lora": per, "baseline": {"name": "one shared LoRA of the same total rank", **(shared or {})},
                "swapped_branch_accuracy": m["swapped_branch_accuracy"],
                "branch_grad_norm_image_batch": m["branch_grad_norm_image_batch"], "merge_refused": True,
                "measured": text}
    if name == "arcana":
        acc = m["accuracy"]
        mm, single = acc["mm_lora"], acc.get("single_lora")
        grads = m["branch_grad_norm"]["text"]
        text = (f"caption accuracy {mm['image']:.2f} MM-LoRA"
                + (f" vs {single['image']:.2f} one LoRA" if single else "") + f"; counting {mm['text']:.2f}"
                + (f" vs {single['text']:.2f}" if single else "")
                + f" (pre-trained LM {m['pretrained_text_accuracy']:.2f}); vision-branch gradient on a text batch "
                  f"{grads['vision']:.1f}")
        return {"metric": "digit caption accuracy and counting accuracy (language retention), held-out",
                "lora": mm, "baseline": {"name": "one LoRA on every token, same total rank", **(single or {})},
                "pretrained_text_accuracy": m["pretrained_text_accuracy"], "branch_grad_norm": m["branch_grad_norm"],
                "merge_refused": True, "measured": text}
    if name == "aigv_quality":
        before, after = m["before"], m["after"]
        return {"metric": f"SRCC / PLCC of the read-out against the human mean ratings ({m['items']['test']} held-out "
                          "snippets)",
                "lora": {k: _r(v) for k, v in after.items()},
                "baseline": {"name": "the same read-out before training (zero-shot)",
                             **{k: _r(v) for k, v in before.items()}},
                "measured": f"SRCC {after['srcc']:.3f} / PLCC {after['plcc']:.3f} after LoRA vs {before['srcc']:.3f} / "
                            f"{before['plcc']:.3f} zero-shot"}
    if name == "wavllm":
        pa, base = m["methods"]["prompt_aware_lora"]["eval"], m["base"]
        lo = m["methods"]["lora"]["eval"] if "lora" in m["methods"] else None

        def pick(e):
            return {f"{w}_{k}": _r(e[w][k]) for w in ("seen", "unseen") for k in ("sentiment_accuracy", "math_loss")}

        vs_acc = f" prompt-aware vs {lo['unseen']['sentiment_accuracy']:.2f} LoRA" if lo else " prompt-aware"
        vs_loss = f" vs {lo['unseen']['math_loss']:.2f}" if lo else ""
        return {"metric": "sentiment accuracy and math answer loss under seen vs unseen instruction paraphrases",
                "lora": pick(pa), "baseline": {"name": "plain LoRA on q/o", **(pick(lo) if lo else {})},
                "base_model": pick(base),
                "measured": (f"unseen paraphrases: sentiment accuracy {pa['unseen']['sentiment_accuracy']:.2f}{vs_acc}"
                             f" (base {base['unseen']['sentiment_accuracy']:.2f}), math loss "
                             f"{pa['unseen']['math_loss']:.2f}{vs_loss} (base {base['unseen']['math_loss']:.2f})")}
    if name == "unimoe":
        v = m["variants"]
        full, att = v["experts_and_attention"], v.get("attention_only")
        return {"metric": "held-out next-token loss of the tiny random Mixtral-like model",
                "lora": {"loss": _r(full["after"]["loss"]), "trainable_parameters": full["trainable_parameters"],
                         "balance": full["after"]["balance"]},
                "baseline": {"name": "LoRA on attention only", "loss": _r(att["after"]["loss"]) if att else None,
                             "trainable_parameters": att["trainable_parameters"] if att else None},
                "base_loss": _r(m["base"]["loss"]),
                "measured": f"loss {m['base']['loss']:.2f} → {full['after']['loss']:.2f} with expert + attention LoRA"
                            + (f" vs {att['after']['loss']:.2f} attention only" if att else "")}
    raise KeyError(name)


def row(name: str) -> dict:
    module, reproduces = APPS[name]
    recipe = _recipe(name)
    out = ROOT / recipe.output_dir if not Path(recipe.output_dir).is_absolute() else Path(recipe.output_dir)
    base = {"name": name, "paper": recipe.paper, "recipe": f"recipes/{name}.yaml", "reproduces": reproduces,
            "lora_config": dict(recipe.method.config)}
    if not module:
        return {**base, "run": None, "measured": "config only: the mrDPO trainer's measured run is "
                                                 "recipes/mrdpo_gsm.yaml (docs/trainers.md)"}
    metrics_path = out / "metrics.json"
    if not metrics_path.is_file():
        return {**base, "run": None, "measured": f"not run yet: {metrics_path.relative_to(ROOT)} missing"}
    m = json.loads(metrics_path.read_text(encoding="utf-8"))
    sources = [ROOT / "peft_ext" / "apps" / f"{module}.py", ROOT / "recipes" / f"{name}.yaml"]
    if name in ("regionblip", "arcana"):
        sources.append(ROOT / "peft_ext" / "apps" / "_modality.py")
    newest = max(_mtime(p) for p in sources)
    runs = m.get("runs") or {}
    stage_times = [r.get("time_s") for r in runs.values() if isinstance(r, dict)] + [
        (m.get("pretrain") or {}).get("time_s")] + [
        v.get("time_s") for v in (m.get("methods") or {}).values() if isinstance(v, dict)]
    train_time = sum(t for t in stage_times if isinstance(t, (int, float)))
    return {**base, **summarise(name, m),
            # wall time of the last invocation (a --resume run only evaluates); train_time_s: the saved stages' own
            # training times (0 where the trainer does not record them)
            "wall_time_s": _r(m["budget"]["wall_time_s"], 1), "train_time_s": _r(train_time, 1),
            "threads": m["budget"].get("threads", 1),
            "metrics": str(metrics_path.relative_to(ROOT)),
            "run_at": dt.datetime.fromtimestamp(_mtime(metrics_path), dt.timezone.utc).isoformat(timespec="seconds"),
            "stale": _mtime(metrics_path) < newest}


def rerun(name: str, resume: bool) -> float:
    """``peft-ext train recipes/<name>.yaml`` in this process; returns its wall time."""
    from peft_ext import cli

    began = time.time()
    args = ["train", str(ROOT / "recipes" / f"{name}.yaml"), "--quiet"] + (["--resume"] if resume else [])
    code = cli.main(args)
    if code != 0:
        raise SystemExit(f"peft-ext train recipes/{name}.yaml exited with {code}")
    return time.time() - began


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(n for n, (m, _) in APPS.items() if m),
                   help="comma-separated recipe names to rerun (default: every app recipe with a trainer)")
    p.add_argument("--collect", action="store_true", help="rerun nothing; summarise the metrics.json files in out/")
    p.add_argument("--resume", action="store_true", help="pass --resume: finished stages are loaded, not retrained")
    p.add_argument("--out", default=str(ROOT / "results" / "repro_apps.json"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on the shared 2-core box)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in APPS or not APPS[n][0]]
    if unknown:
        p.error(f"--only: unknown or config-only recipe(s) {unknown}; choose from "
                f"{[n for n, (m, _) in APPS.items() if m]}")
    if not args.collect:
        for name in names:
            print(f"repro_apps: {name} ...", flush=True)
            print(f"repro_apps: {name} done in {rerun(name, args.resume):.0f} s", flush=True)
    from peft_ext._io import atomic_write_json

    rows = [row(name) for name in APPS]
    atomic_write_json(Path(args.out), {"rows": rows, "written_at": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds")}, allow_nan=False)
    for r in rows:
        flag = " (STALE: older than its code or recipe)" if r.get("stale") else ""
        print(f"| {r['name']} | {r['measured']}{flag}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
