"""DreamBooth-style TARA training from the command line: one concept's photos -> a TARA adapter folder.

    python scripts/train_tara.py --pipeline path/to/stable-diffusion --images photos/ \
        --prompt "a photo of sks dog" --rare-word sks --class-word dog --concept dog --out out/tara_dog
    python scripts/train_tara.py --tiny --images photos/ --steps 5 --out out/tara_tiny   # offline, seconds

The pipeline is a local diffusers ``StableDiffusionPipeline`` folder (``--tiny``: the random offline test pipeline).
Images (png / jpg / webp) are centre-cropped, resized to the pipeline's resolution and scaled to [-1, 1]. Every
``TaraTrainConfig`` field is an option (``--learning-rate``, ``--alignment-loss-weight``, ...; defaults are the
official SD1.5 setting). The adapter is written with ``save_tara`` (atomic); ``compose_tara`` combines several such
folders for multi-concept generation (docs/diffusion.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_images(folder: Path, size: int):
    """``[N, 3, size, size]`` in [-1, 1] from the images of ``folder`` (centre crop, bicubic resize)."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise SystemExit(f"--images {str(folder)!r}: no {'/'.join(IMAGE_SUFFIXES)} files in that folder.")
    out = []
    for path in files:
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def main(argv=None) -> int:
    from peft_ext.diffusion import TaraTrainConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", type=Path, help="local diffusers StableDiffusionPipeline folder")
    source.add_argument("--tiny", action="store_true", help="the random offline test pipeline (peft_ext.diffusion)")
    parser.add_argument("--images", type=Path, required=True, help="folder of the concept's photos")
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    for f in dataclasses.fields(TaraTrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default,
                            help=f"{f.metadata.get('help', '')} (default {f.default!r})")
    args = parser.parse_args(argv)

    import torch

    from peft_ext.diffusion import save_tara, tiny_pipeline, train_tara

    if args.tiny:
        pipe = tiny_pipeline(seed=args.seed)
    else:
        if not (args.pipeline / "model_index.json").is_file():
            raise SystemExit(f"--pipeline {str(args.pipeline)!r} is not a diffusers pipeline folder "
                             "(no model_index.json).")
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None)
        if torch.cuda.is_available():
            pipe = pipe.to("cuda")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = load_images(args.images, size).to(pipe.device)
    try:
        config = TaraTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TaraTrainConfig)})
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    try:
        history = train_tara(pipe, images, config)
    except ValueError as exc:  # a prompt / word mismatch found once the tokenizer is known
        raise SystemExit(str(exc)) from None
    save_tara(pipe.unet, args.out, adapter_name=config.adapter_name)
    losses = history["loss"]
    print(json.dumps({"adapter": str(args.out), "images": len(images), "steps": len(losses),
                      "first_loss": losses[0], "last_loss": losses[-1]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
