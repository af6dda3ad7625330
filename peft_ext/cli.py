"""The ``peft-ext`` command: train, eval, compare, export, push, merge, federate and list methods.

    peft-ext train recipes/quickstart.yaml [--set training.learning_rate=1e-3 ...] [--resume]
    peft-ext eval recipes/quickstart.yaml --adapter out/quickstart/adapter
    peft-ext compare recipes/quickstart.yaml --methods lora,dylora,nola
    peft-ext export out/quickstart/adapter --to lora --out out/quickstart/lora [--rank 8]
    peft-ext push out/quickstart/adapter user/my-adapter [--private] [--base-model ID] [--dry-run [--out FOLDER]]
    peft-ext merge A B C --rule lego|linear|ties|dare_ties|cat|svd [-k 8] [--weights 1 1 1] [--density 0.5] --out DIR
    peft-ext federate recipes/flasc_sentiment.yaml [--resume] [--quiet]
    peft-ext methods

Recipes are YAML files (``peft_ext/recipe.py`` documents every key). Every method comes from the registry; the
papers behind them are listed by ``peft-ext methods``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ._io import atomic_savefig, atomic_write_json, atomic_write_text  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-ext", description="LoRA-family methods from recent papers, on PEFT.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of user errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the method a recipe names")
    t.add_argument("recipe", help="YAML recipe")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. training.learning_rate=1e-3 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint of output_dir")
    t.add_argument("--quiet", action="store_true", help="no progress bar or table")
    t.add_argument("--result-json", help="also write the run in PEFT's method_comparison layout here")

    e = sub.add_parser("eval", help="evaluate a saved adapter on a recipe's evaluation split")
    e.add_argument("recipe")
    e.add_argument("--adapter", required=True, help="adapter folder (from train)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    c = sub.add_parser("compare", help="train several methods on one recipe and compare them")
    c.add_argument("recipe")
    c.add_argument("--methods", required=True, help="comma-separated method names, e.g. lora,dylora,nola")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--out", help="results folder (default: <output_dir>/comparison)")

    x = sub.add_parser("export", help="export an adapter as a plain LoRA (PEFT's save_as_lora)")
    x.add_argument("adapter", help="adapter folder")
    x.add_argument("--to", choices=["lora"], default="lora")
    x.add_argument("--out", required=True, help="folder for the LoRA adapter")
    x.add_argument("--rank", type=float, help="LoRA rank (int) or explained-variance fraction (float < 1)")

    h = sub.add_parser("push", help="upload an adapter folder, model card included, to the Hugging Face Hub")
    h.add_argument("adapter", help="adapter folder")
    h.add_argument("repo_id", help="user/name")
    h.add_argument("--base-model", metavar="ID",
                   help="Hub id of the base model, for a base the adapter does not know (a local folder)")
    h.add_argument("--dry-run", action="store_true",
                   help="write the files that would be uploaded into --out and list them; no network")
    h.add_argument("--out", metavar="FOLDER", help="folder for --dry-run (default: <adapter>-push next to it)")
    h.add_argument("--private", action="store_true")
    h.add_argument("--token", help="Hub token (default: the logged-in one)")

    g = sub.add_parser("merge", help="merge adapters into one plain LoRA (LoRA-LEGO or PEFT's merge rules)")
    g.add_argument("adapters", nargs="+", help="adapter folders (LoRA, or peft-ext adapters that export to LoRA)")
    g.add_argument("--rule", choices=["lego", "linear", "ties", "dare_ties", "cat", "svd"], default="lego",
                   help="lego: rank-wise clustering (needs -k); the others: PEFT's add_weighted_adapter")
    g.add_argument("-k", type=int, help="rank of the merged LoRA (lego, svd; linear/ties/dare_ties: their SVD form)")
    g.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per adapter (default 1)")
    g.add_argument("--density", type=float, help="fraction of entries kept by ties / dare_ties (default 0.5)")
    g.add_argument("--seed", type=int, default=0, help="k-means seed of the lego rule")
    g.add_argument("--out", required=True, help="folder for the merged LoRA adapter")

    f = sub.add_parser("federate", help="federated sparse LoRA (FLASC) over simulated or real clients (Flower)")
    f.add_argument("recipe", help="YAML federated recipe (peft_ext/federated/recipe.py documents every key)")
    f.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint.pt")
    f.add_argument("--quiet", action="store_true", help="no progress output")

    sub.add_parser("methods", help="list the registered methods and their papers")

    r = sub.add_parser("recipes", help="list the recipes of a folder with the paper each reproduces")
    r.add_argument("--dir", default="recipes", help="folder of YAML recipes (default: ./recipes)")
    r.add_argument("--paper", metavar="TEXT", help="only recipes whose paper, name or file contains TEXT")
    return p


def main(argv=None) -> int:
    """Entry point of the ``peft-ext`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    from .recipe import RecipeError

    try:
        status = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "export": cmd_export,
                  "push": cmd_push, "merge": cmd_merge, "federate": cmd_federate,
                  "methods": cmd_methods, "recipes": cmd_recipes}[args.command](args)
    except (RecipeError, UsageError, FileNotFoundError, NotADirectoryError, FileExistsError) as exc:
        _close_process_group(wait=False)
        if args.debug:
            raise
        print(f"peft-ext {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except BaseException:
        _close_process_group(wait=False)
        raise
    _close_process_group(wait=True)
    return status


def _close_process_group(wait: bool) -> None:
    """Under torchrun / accelerate, destroy the process group before the interpreter exits (after a barrier when the
    command succeeded, so no rank leaves while another still writes).

    Left to interpreter shutdown, gloo's threads can outlive the group and abort the process ("terminate called
    without an active exception") after training has finished.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def cmd_train(args) -> int:
    """``peft-ext train``."""
    from .recipe import load_recipe
    from .runner import comparison_record, train

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.trainer.name is not None:  # TRL recipes: sft | dpo | mrdpo | grpo | sft_grpo
        from .trainers.run import train_recipe as run_recipe
    else:
        run_recipe = train
    try:
        metrics = run_recipe(recipe, resume=args.resume, quiet=args.quiet)
    except ValueError as exc:
        if args.result_json:
            atomic_write_json(args.result_json, comparison_record({"method": recipe.method.name, "name": recipe.name},
                                                       status="failed", error_msg=str(exc)))
        raise
    if args.result_json:
        atomic_write_json(args.result_json, comparison_record(metrics))
    return 0


def cmd_eval(args) -> int:
    """``peft-ext eval``."""
    from .recipe import load_recipe
    from .runner import evaluate

    recipe = load_recipe(args.recipe, args.overrides)
    _check_adapter_folder(args.adapter)
    evaluate(recipe, args.adapter)
    return 0


def cmd_compare(args) -> int:
    """``peft-ext compare``: each method trains in its own process (so peak memory is its own)."""
    import yaml

    from .recipe import RecipeError, load_recipe, method_names, to_dict
    from .runner import derive_method_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        raise RecipeError(f"--methods must be a comma-separated subset of {method_names()}; got {args.methods!r}.")
    out = Path(args.out or Path(recipe.output_dir) / "comparison")
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for method in methods:
        derived = derive_method_recipe(recipe, method)
        Path(derived.output_dir).mkdir(parents=True, exist_ok=True)
        recipe_path = Path(derived.output_dir) / "recipe.yaml"
        atomic_write_text(recipe_path, yaml.safe_dump(to_dict(derived), sort_keys=False))
        result = out / f"{method}--{recipe.name}.json"
        print(f"== {method} ==", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "peft_ext.cli", "train", str(recipe_path), "--quiet",
                               "--result-json", str(result)])
        print(f"   {method}: exit {proc.returncode} in {time.perf_counter() - t0:.1f}s", flush=True)
        if result.is_file():
            records[method] = json.loads(result.read_text())
    table = comparison_table(records)
    atomic_write_text(out / "comparison.md", table + "\n")
    comparison_plot(records, out / "comparison.png")
    print(table)
    print(f"results: {out}")
    return 0 if len(records) == len(methods) and all(
        r["train_info"]["status"] == "success" for r in records.values()) else 1


def comparison_table(records: dict) -> str:
    """Markdown table of comparison records: accuracy, loss, trainable parameters, time, tokens/s, memory, size."""
    lines = ["| method | test accuracy | test loss | trainable params | train time s | tokens/s | peak memory MiB | "
             "checkpoint KiB |",
             "|---|---|---|---|---|---|---|---|"]
    for method, rec in records.items():
        info = rec["train_info"]
        m = info["metrics"][-1] if info.get("metrics") else {}
        mem = info.get("cpu_memory_max", info.get("cuda_memory_max"))

        def fmt(value, spec):
            return format(value, spec) if isinstance(value, (int, float)) else "—"

        lines.append(
            f"| {method} | {fmt(m.get('test accuracy'), '.4f')} | {fmt(m.get('test loss'), '.4f')} | "
            f"{fmt(info.get('num_trainable_params'), ',')} | {fmt(info.get('train_time'), '.1f')} | "
            f"{fmt(m.get('tokens / sec'), '.0f')} | {fmt(mem / 2**20 if mem else None, '.0f')} | "
            f"{fmt(info['file_size'] / 1024 if info.get('file_size') else None, '.1f')} |"
        )
    return "\n".join(lines)


def comparison_plot(records: dict, path: Path):
    """PNG: test accuracy (or loss) against trainable parameters and against training time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = []
    for method, rec in records.items():
        info = rec["train_info"]
        if info.get("status") != "success":
            continue
        m = info["metrics"][-1]
        y = m.get("test accuracy") if m.get("test accuracy") is not None else m.get("test loss")
        points.append((method, info["num_trainable_params"], info["train_time"], y))
    if not points:
        return None
    ylabel = "test accuracy" if any(r["train_info"]["metrics"][-1].get("test accuracy") is not None
                                    for r in records.values() if r["train_info"].get("metrics")) else "test loss"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, idx, xlabel in ((axes[0], 1, "trainable parameters"), (axes[1], 2, "train time (s)")):
        for method, *vals in points:
            ax.scatter(vals[idx - 1], vals[2])
            ax.annotate(method, (vals[idx - 1], vals[2]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[0].set_xscale("log")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def cmd_export(args) -> int:
    """``peft-ext export --to lora``: PEFT's ``save_as_lora`` on the loaded adapter."""
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora.conversion import save_as_lora

    adapter = Path(args.adapter)
    _check_adapter_folder(adapter)
    config = PeftConfig.from_pretrained(adapter)
    model = PeftModel.from_pretrained(_base_model_for(config), adapter)
    if not model.supports_lora_conversion():
        raise UsageError(
            f"{adapter}: {config.peft_type} adapters cannot be expressed as a LoRA (see peft-ext methods).")
    rank = args.rank if args.rank is not None else getattr(config, "r", 8)
    rank = int(rank) if float(rank).is_integer() and rank >= 1 else float(rank)
    save_as_lora(args.out, model, rank=rank)
    print(f"plain LoRA (rank {rank}) written to {args.out}")
    return 0


class UsageError(Exception):
    """A user error the command reports in one line (exit status 2): a bad argument, a missing or broken file."""


def _check_adapter_folder(adapter) -> None:
    """Raise ``FileNotFoundError`` / ``UsageError`` unless ``adapter`` is a folder written by ``save_pretrained``: a
    parseable adapter_config.json and whole adapter weights."""
    from ._io import safetensors_is_whole

    adapter = Path(adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(
            f"--adapter {str(adapter)!r} is not a folder; pass the adapter folder written by train.")
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{adapter} has no adapter_config.json; pass the folder written by train.")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{config} is not valid JSON ({exc}); save the adapter again.") from exc
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        if not safetensors_is_whole(weights):
            raise UsageError(f"{weights} is truncated or not a safetensors file; save or copy the adapter again.")
    elif not (adapter / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"{adapter} has no adapter_model.safetensors; pass the folder written by train.")


def _base_model_for(config):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = config.base_model_name_or_path
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"the adapter's base model {path!r} is not a local folder.")
    task = str(getattr(config.task_type, "value", config.task_type) or "")
    if task == "SEQ_CLS":
        return AutoModelForSequenceClassification.from_pretrained(path)
    if task == "CAUSAL_LM" or "CausalLM" in "".join(AutoConfig.from_pretrained(path).architectures or []):
        return AutoModelForCausalLM.from_pretrained(path)
    from transformers import AutoModel

    return AutoModel.from_pretrained(path)


def cmd_push(args) -> int:
    """``peft-ext push``: upload the adapter folder with the base model's Hub id in its config and a card rendered
    for the repository; ``--dry-run`` writes those files into ``--out`` instead, without network."""
    from .hub import PushError, dry_run, push_folder

    _check_adapter_folder(args.adapter)
    if args.out and not args.dry_run:
        raise UsageError("--out applies to --dry-run only; add --dry-run, or drop --out to upload.")
    try:
        if args.dry_run:
            adapter = Path(args.adapter)
            out = Path(args.out) if args.out else adapter.absolute().parent / f"{adapter.absolute().name}-push"
            files = dry_run(adapter, args.repo_id, out, base_model=args.base_model)
            print(f"dry run: {len(files)} files would be uploaded to {args.repo_id}; written to {out}:")
            for name in files:
                print(f"  {name}")
            return 0
        push_folder(args.adapter, args.repo_id, base_model=args.base_model, token=args.token,
                    private=args.private or None)
    except PushError as exc:
        raise UsageError(str(exc).removeprefix("push: ")) from exc
    print(f"pushed {args.adapter} to {args.repo_id}")
    return 0


def cmd_merge(args) -> int:
    """``peft-ext merge``: ``peft_ext.merging.merge_adapters`` on adapter folders, written as a plain LoRA folder."""
    from .merging import MergeInputError
    from .merging.merge import merge_adapters

    try:
        _, config = merge_adapters(args.adapters, rule=args.rule, k=args.k, weights=args.weights,
                                   density=args.density, seed=args.seed, out=args.out)
    except MergeInputError as exc:
        raise UsageError(str(exc)) from exc
    print(f"merged {len(args.adapters)} adapters by {args.rule} into a rank-{config.r} LoRA: {args.out}")
    return 0


def cmd_federate(args) -> int:
    """``peft-ext federate``: ``peft_ext.federated.run_federated_recipe`` (FLASC rounds, metrics.json, plot)."""
    from .federated import run_federated_recipe

    try:
        metrics = run_federated_recipe(args.recipe, resume=args.resume, quiet=args.quiet)
    except ImportError as exc:  # flwr missing for engine.name: flower; the message carries the install hint
        raise UsageError(str(exc)) from exc
    acc = metrics.get("final_accuracy")
    print(f"final accuracy {acc:.4f}" if acc is not None else "final accuracy: not evaluated",
          f"| bytes up {metrics['total_bytes_up']:,} | bytes down {metrics['total_bytes_down']:,}")
    return 0


def cmd_methods(args) -> int:
    """``peft-ext methods``: the registry as a table."""
    from .registry import list_methods

    print("| method | config | mergeable | 4/8-bit | paper |")
    print("|---|---|---|---|---|")
    print("| lora | peft.LoraConfig | yes | yes | https://arxiv.org/abs/2106.09685 |")
    for spec in list_methods():
        print(f"| {spec.name} | {spec.config_cls.__name__} | {'yes' if spec.mergeable else 'no'} | "
              f"{'yes' if spec.quantizable else 'no'} | {spec.paper_url} |")
    return 0


def recipe_index(folder) -> list[dict]:
    """One row per YAML recipe of ``folder``: file, name, paper, command (train / federate), trainer, tiny variant.

    Rows are read from the YAML without building models; a file that is not a mapping is reported as unreadable."""
    import yaml

    rows = []
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict):
            rows.append({"file": path.name, "name": "", "paper": "(not a recipe mapping)", "command": "",
                         "trainer": "", "tiny": ""})
            continue
        trainer = data.get("trainer")
        trainer = trainer.get("name") if isinstance(trainer, dict) else trainer
        command = "federate" if "flasc" in data else "train"
        method = (data.get("method") or {}).get("name", "lora") if isinstance(data.get("method"), dict) else "lora"
        rows.append({"file": path.name, "name": str(data.get("name", "")), "paper": str(data.get("paper", "")),
                     "command": command, "trainer": str(trainer or ("flasc" if command == "federate" else method)),
                     "tiny": str(data.get("tiny") or "")})
    return rows


def cmd_recipes(args) -> int:
    """``peft-ext recipes``: which recipe reproduces which paper, and how to run it."""
    folder = Path(args.dir)
    if not folder.is_dir():
        raise UsageError(f"--dir {str(folder)!r} is not a folder of recipes (run from the repository root, or pass "
                         "--dir path/to/recipes).")
    rows = recipe_index(folder)
    if args.paper:
        needle = args.paper.lower()
        rows = [r for r in rows if needle in (r["paper"] + r["name"] + r["file"]).lower()]
        if not rows:
            raise UsageError(f"no recipe in {str(folder)!r} matches --paper {args.paper!r}.")
    for r in rows:
        tiny = f"  (tiny: {r['tiny']})" if r["tiny"] else ""
        print(f"{r['file']}  [{r['trainer']}]{tiny}\n    {r['paper'] or '(no paper named)'}\n"
              f"    peft-ext {r['command']} {folder / r['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
