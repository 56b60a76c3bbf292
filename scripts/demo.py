"""Render a few prompts with the shipped toy model (``make demo``), on the CPU, in seconds.

    python scripts/demo.py                     # weights/ldm-toy-lcm.safetensors, 4 steps -> out/demo/
    python scripts/demo.py --model weights/ldm-toy.safetensors   # the undistilled model, 20 steps
    python scripts/demo.py --model PATH --out DIR --steps 20 --seed 42

The default model is the shipped toy model distilled to 4 steps (latent consistency; its
4-step pictures score within 3 points of the 25-step original, ``scripts/eval_lcm.py``).
A guidance-distilled model is sampled with ``lcm`` at guidance 4.5 (into its guidance
embedding), any other with DPM++ 2M at guidance 7.5.

Each picture is written atomically as out/demo/NN-<prompt>.png, with its generation
parameters in the PNG (``ldm generate --from FILE`` makes it again), plus grid.png.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a checkout without installing
    sys.path.insert(0, str(ROOT))

PROMPTS = (
    "a cat wearing a hat",
    "a black cat wearing a red hat on a yellow background",
    "a red circle on a blue background",
    "a green triangle on a white background",
    "a purple star on an orange background",
    "a white cat on a blue background",
)
OUT = ROOT / "out" / "demo"
# (sampler, steps, guidance) for a guidance-distilled model and for any other.
DISTILLED = ("lcm", 4, 4.5)
UNDISTILLED = ("dpmpp_2m", 20, 7.5)
SEED = 42


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint (default: weights/ldm-toy-lcm.safetensors, or $LDM_WEIGHTS)")
    p.add_argument("--out", type=Path, default=OUT, help="output folder (default out/demo)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"default {DISTILLED[1]} for a guidance-distilled model, else {UNDISTILLED[1]}")
    p.add_argument("--seed", type=int, default=SEED, help=f"seed of the first picture (default {SEED})")
    p.add_argument("--device", default="cpu", help="default cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: as fast for this tiny model, and robust on a busy machine)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from ldm.grid import image_grid
    from ldm.paths import LCM_WEIGHTS, WEIGHTS_DIR, WEIGHTS_ENV
    from ldm.pipeline import Pipeline, default_weights_path
    from ldm.pngmeta import GenerationParams, save_png

    # The distilled model unless told otherwise ($LDM_WEIGHTS names the model to use everywhere).
    model = WEIGHTS_DIR / LCM_WEIGHTS if args.model is None and WEIGHTS_ENV not in os.environ else args.model
    if args.model is None and not (model or default_weights_path()).is_file():
        print(f"error: the shipped model is missing: {model or default_weights_path()}\n"
              "  A full clone of the repository contains it. Otherwise train it with\n"
              "  `python scripts/train_toy.py --bf16 vae` (1 to 3 hours on 2 CPU cores) and distil it with\n"
              "  `python scripts/train_lcm.py --seed 1` (30 minutes), or run\n"
              "  `python scripts/demo.py --model PATH` (or set LDM_WEIGHTS) with another checkpoint.",
              file=sys.stderr)
        return 1
    try:
        # float32 on every machine: the pictures in the README were made in it, and a CPU
        # default of bfloat16 (where that is faster) would change them slightly.
        pipe = Pipeline.from_pretrained(model, device=args.device, dtype="float32")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"loaded {pipe.model.source} in {time.perf_counter() - t0:.1f} s")

    distilled = pipe.config.unet.time_cond_proj_dim is not None
    sampler, default_steps, guidance = DISTILLED if distilled else UNDISTILLED
    steps = default_steps if args.steps is None else args.steps
    gen = pipe.generate(list(PROMPTS), steps=steps, sampler=sampler, guidance_scale=guidance, seed=args.seed,
                        progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    name = Path(pipe.model.source).stem
    for k, (image, prompt, seed) in enumerate(zip(gen.images, gen.prompts, gen.seeds)):
        params = GenerationParams(prompt=prompt, steps=steps, sampler=sampler, guidance_scale=guidance,
                                  guidance_embedding=gen.params["guidance_embedding"], seed=seed,
                                  width=image.width, height=image.height, model=name,
                                  dtype=gen.params["dtype"])
        path = save_png(image, args.out / f"{k + 1:02d}-{slug(prompt)}.png", params)
        print(f"{path}  {prompt!r} (seed {seed})")
    side = 2 * gen.images[0].width  # upscale the grid so the small pictures are visible
    grid = image_grid([im.resize((side, side), resample=0) for im in gen.images], rows=2)
    print(f"{save_png(grid, args.out / 'grid.png')}  all {len(PROMPTS)}")
    print(f"{len(PROMPTS)} pictures in {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
