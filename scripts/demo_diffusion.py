"""A real, measured multi-LoRA composition: a tiny diffusion model trained here on scikit-learn's digits, two concept
LoRAs, composed with Merge, Switch, Composite and CMLoRA, scored by classifiers trained on the same data.

No pretrained diffusion weights ship offline, so everything is trained by this script, on one CPU thread:

* **Data**: scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 -> [-1, 1]), at their native 8x8 size (the
  issue suggests upscaling to 16x16; 8x8 keeps the whole run inside the CPU budget of a shared machine).
* **Base model**: ``peft_ext.diffusion.tiny.tiny_pipeline(unet_channels=1, sample_size=8)`` -- a real
  ``StableDiffusionPipeline`` whose UNet works in **pixel space** (1 channel); it generates with
  ``output_type="latent"``, which returns the UNet's space without the (unused) VAE. Trained from scratch with the
  DDPM noise-prediction loss on all digits (normal style: light strokes on a dark ground), empty prompt,
  ``--base-steps`` AdamW steps, batch 128.
* **Concept LoRAs** (diffusers' PEFT backend, ``unet.add_adapter``; r=8 on attention ``to_q/k/v/out.0`` and the resnet
  convolutions ``conv1/conv2``), each ``--lora-steps`` steps on a subset: **seven** = the digit 7 only (content), and
  **inverted** = all digits with inverted colours (style: dark strokes on a light ground).
* **Composition** of the two (the target: an inverted 7) with ``merge`` (both active, weight 1 each), ``switch``
  (``switch_step`` 5), ``composite`` and ``cmlora`` (paper mode, c=0; the high/low-frequency order from
  ``lora_frequency_metrics`` with ``min_radius`` 2 on these 8x8 images: the adapter with the higher metric is H), plus
  each LoRA alone and the base model as references. ``--samples`` images each, ``--steps`` DDIM steps, no guidance
  (the prompt is empty), the same noise for every method.
* **Scores**: an inversion classifier (logistic regression on the 64 pixels, normal vs inverted digits) and a digit
  classifier (logistic regression, 10 classes, on normal digits; an image the inversion classifier calls inverted is
  inverted back first), both trained on the same data; their accuracies on real digits are in the JSON. Per method
  the fraction of samples classified as 7, as inverted, and as both (the composition succeeded), the histogram of
  predicted digits, the UNet and deep-block evaluations per image and the CPU seconds of the generation.

Rerun (from the repository root)::

    .venv/bin/python scripts/demo_diffusion.py           # about 20 CPU minutes on one thread
    .venv/bin/python scripts/demo_diffusion.py --quick   # a smoke test
    .venv/bin/python scripts/demo_diffusion.py --model-cache /tmp/digits.pt   # keep the trained model for reruns

Writes ``--out`` (default ``results/demo_diffusion.json``) atomically and prints the markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import benchlib
import numpy as np
import torch
import torch.nn.functional as F

from peft_ext._io import atomic_write_json
from peft_ext.diffusion.cmlora import CMLoRAConfig, cmlora, lora_frequency_metrics, order_by_frequency
from peft_ext.diffusion.compose import composite, merge, switch
from peft_ext.diffusion.tiny import tiny_pipeline

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def digits_data():
    """(images in [-1, 1] of shape (n, 1, 8, 8), labels) of scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    return x, torch.tensor(d.target)


def train(unet, scheduler, embeds, data, steps: int, lr: float, batch: int, params, seed: int, log: str) -> list:
    """DDPM noise-prediction training of ``params`` on ``data``; returns the loss every 100 steps."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=embeds.expand(batch, -1, -1)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
            print(f"{log} step {step}: loss {loss.item():.4f}", flush=True)
    unet.eval()
    return losses


def add_concept_lora(unet, name: str, r: int = 8):
    """A fresh LoRA adapter (B = 0: starts as the base model) with only its parameters trainable."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=LORA_TARGETS), adapter_name=name)
    unet.set_adapters([name])
    params = []
    for pname, p in unet.named_parameters():
        p.requires_grad_(f".{name}." in pname and "lora_" in pname)
        if p.requires_grad:
            params.append(p)
    return params


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    benchlib.add_common_options(p, "results/demo_diffusion.json", "200 base steps, 60 per LoRA, 32 samples")
    p.add_argument("--base-steps", type=int, default=None, help="base-model training steps (default 1500)")
    p.add_argument("--lora-steps", type=int, default=None, help="training steps per concept LoRA (default 400)")
    p.add_argument("--samples", type=int, default=None, help="images per method (default 200)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per image (default 20)")
    p.add_argument("--model-cache", default=None, help="file to save the trained base + LoRAs to, or to load them from "
                   "when it exists (same seed and steps), so that scoring can be rerun without training")
    args = p.parse_args(argv)
    benchlib.apply_sizes(args, dict(base_steps=1500, lora_steps=400, samples=200),
                         dict(base_steps=200, lora_steps=60, samples=32))
    benchlib.set_threads(p, args.threads)
    benchlib.seed_everything(args.seed)
    cpu0, wall0 = time.process_time(), time.time()

    x, y = digits_data()
    pipe = tiny_pipeline(seed=args.seed, sample_size=8, unet_channels=1)
    unet, scheduler = pipe.unet, pipe.scheduler
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("", "cpu", 1, False)
    concepts = {"seven": x[y == 7], "inverted": -x}
    if args.model_cache and os.path.isfile(args.model_cache):  # trained earlier with the same settings: reuse
        saved = torch.load(args.model_cache, weights_only=False)
        if saved["args"] != [args.seed, args.base_steps, args.lora_steps]:
            p.error(f"--model-cache {args.model_cache} was trained with seed/base/lora steps {saved['args']}")
        for name in concepts:
            add_concept_lora(unet, name)
        unet.load_state_dict(saved["state"])
        losses, timings = saved["losses"], saved["timings"]
    else:
        timings = {}
        losses = {"base": train(unet, scheduler, embeds, x, args.base_steps, 2e-3, 128, list(unet.parameters()),
                                args.seed, "base")}
        timings["train_base_cpu_s"] = round(time.process_time() - cpu0, 1)
        timings["train_base_cpu_s_per_step"] = round(timings["train_base_cpu_s"] / max(args.base_steps, 1), 4)
        for k, (name, data) in enumerate(concepts.items()):
            c0 = time.process_time()
            params = add_concept_lora(unet, name)
            losses[name] = train(unet, scheduler, embeds, data, args.lora_steps, 2e-3, 64, params, args.seed + 1 + k,
                                 name)
            timings[f"train_{name}_cpu_s"] = round(time.process_time() - c0, 1)
        if args.model_cache:
            tmp = args.model_cache + ".tmp"
            torch.save(dict(state=unet.state_dict(), losses=losses, timings=timings,
                            args=[args.seed, args.base_steps, args.lora_steps]), tmp)
            os.replace(tmp, args.model_cache)
    unet.set_adapters(list(concepts))
    unet.requires_grad_(False)

    # scorers trained on the same data (pixels in [0, 1]): an inversion classifier (normal vs inverted digits) and a
    # digit classifier on normal digits, applied after undoing a detected inversion (one linear classifier over both
    # styles cannot work: inverting flips the sign of every linear score, and it scored 10 % on its own training set)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    flat = ((x.reshape(len(x), -1) + 1) / 2).numpy()
    both_styles = np.concatenate([flat, 1 - flat])
    inv_labels = np.r_[np.zeros(len(flat)), np.ones(len(flat))]
    inv_clf = LogisticRegression(max_iter=3000).fit(both_styles, inv_labels)
    fit_x, held_x, fit_y, held_y = train_test_split(flat, y.numpy(), test_size=0.25, random_state=args.seed)
    held_acc = LogisticRegression(max_iter=3000).fit(fit_x, fit_y).score(held_x, held_y)
    digit_clf = LogisticRegression(max_iter=3000).fit(flat, y.numpy())

    def classify(pix: np.ndarray):
        inv = inv_clf.predict(pix) == 1
        digits = digit_clf.predict(np.where(inv[:, None], 1 - pix, pix))
        return digits, inv

    real_digits, real_inv = classify(both_styles)
    classifiers = dict(digit_heldout_accuracy=round(float(held_acc), 4),
                       digit_accuracy_both_styles=round(float((real_digits == np.r_[y.numpy(), y.numpy()]).mean()), 4),
                       inversion_accuracy=round(float((real_inv == inv_labels.astype(bool)).mean()), 4))
    print("classifiers:", classifiers, flush=True)

    def score(images: torch.Tensor) -> dict:
        pix = ((images.clamp(-1, 1).reshape(len(images), -1) + 1) / 2).numpy()
        digits, inv = classify(pix)
        is7 = digits == 7
        return dict(p_seven=float(is7.mean()), p_inverted=float(inv.mean()), p_both=float((is7 & inv).mean()),
                    digit_histogram=np.bincount(digits, minlength=10).tolist())

    def kwargs():
        return dict(prompt="", num_images_per_prompt=args.samples, num_inference_steps=args.steps, guidance_scale=1.0,
                    output_type="latent", generator=torch.Generator().manual_seed(args.seed + 1000))

    names = list(concepts)
    c0 = time.process_time()
    metrics = lora_frequency_metrics(pipe, names, min_radius=2, **kwargs())
    high, low = order_by_frequency(metrics, threshold=(max(metrics.values()) + min(metrics.values())) / 2)
    if not low:  # equal metrics: keep the listed order, the second adapter as the low-frequency one
        high, low = names[:1], names[1:]
    timings["frequency_metrics_cpu_s"] = round(time.process_time() - c0, 1)

    runs = {
        "base (no LoRA)": lambda: _plain(pipe, [], kwargs()),
        "seven alone": lambda: _plain(pipe, ["seven"], kwargs()),
        "inverted alone": lambda: _plain(pipe, ["inverted"], kwargs()),
        "merge": lambda: merge(pipe, names, **kwargs()),
        "switch": lambda: switch(pipe, names, switch_step=5, **kwargs()),
        "composite": lambda: composite(pipe, names, **kwargs()),
        "cmlora": lambda: cmlora(pipe, high, low, CMLoRAConfig(cache_interval=0), **kwargs()),
    }
    rows, table = [], []
    for method, run in runs.items():
        c0 = time.process_time()
        with torch.no_grad():
            out = run()
        cpu = time.process_time() - c0
        row = dict(method=method, **score(out.images), unet_evals_per_image=out.unet_evals,
                   deep_evals_per_image=out.deep_evals, generation_cpu_s=round(cpu, 2))
        rows.append(row)
        table.append([method, f"{row['p_seven']:.2f}", f"{row['p_inverted']:.2f}", f"{row['p_both']:.2f}",
                      str(out.unet_evals), str(out.deep_evals), f"{cpu:.1f}"])
        print(row, flush=True)
    md = benchlib.markdown(["method", "P(7)", "P(inverted)", "P(inverted 7)", "UNet evals / image",
                            "deep evals / image", f"CPU s ({args.samples} images)"], table)
    print(md)
    payload = dict(demo="digits multi-LoRA composition", args=vars(args), rows=rows, table=md, losses=losses,
                   classifiers=classifiers,
                   frequency_metrics=metrics, cmlora_order=dict(high=high, low=low), timings=timings,
                   total_cpu_s=round(time.process_time() - cpu0, 1), wall_s=round(time.time() - wall0, 1),
                   load_average=benchlib.load_average(), versions=benchlib.versions())
    atomic_write_json(args.out, payload)
    return payload


class _Plain:
    """The result of one plain pipeline call with a fixed set of adapters (references of the demo)."""

    def __init__(self, images, unet_evals):
        self.images, self.unet_evals, self.deep_evals = images, unet_evals, unet_evals


def _plain(pipe, adapters: list, kwargs: dict) -> _Plain:
    from peft_ext.diffusion.compose import count_unet_evals

    with count_unet_evals(pipe.unet) as counter:
        if adapters:
            pipe.unet.enable_adapters()
            pipe.unet.set_adapters(adapters)
            images = pipe(**kwargs).images
        else:
            pipe.unet.disable_adapters()
            try:
                images = pipe(**kwargs).images
            finally:
                pipe.unet.enable_adapters()
    return _Plain(images, counter["n"])


if __name__ == "__main__":
    main(sys.argv[1:])
