"""Make one large image (default 2048x2048) with the full-size SD1.5 architecture
(random weights, the folder scripts/bench.py builds) and report the memory plan ldm
chose and the peak RSS.

    python scripts/big_image.py                              # 2048x2048, 2 steps: long on a CPU
    python scripts/big_image.py --size 256 --steps 1 --tiny  # a smoke test on the tiny test model

The random weights make a noise picture; what this shows is that the size finishes,
in how much memory, at which memory level (``--memory`` to force one).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (sets up the paths of ldm and of the diffusers reference helpers)

import torch  # noqa: E402
from reference import SD1_TINY, save_diffusers_folder  # noqa: E402

from ldm import Pipeline  # noqa: E402
from ldm.limits import MEMORY_CHOICES  # noqa: E402
from ldm.memory import runner_of  # noqa: E402

PROMPT = "a mountain lake at dawn, highly detailed"


def model_folder(tiny: bool) -> Path:
    """The random-weight folder: full-size SD1.5 (bench's, built once), or the tests' tiny SD1."""
    if not tiny:
        return bench.build_folder(bench.CACHE / "sd15-random")
    folder = bench.CACHE / "sd1-tiny"
    return folder if (folder / "model_index.json").is_file() else save_diffusers_folder(SD1_TINY, folder, seed=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    p.add_argument("--steps", type=int, default=2, help="sampling steps (default 2)")
    p.add_argument("--memory", choices=MEMORY_CHOICES, default="auto", help="memory level (default auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the device's)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny SD1 model instead of the full size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=bench.CACHE / "big-image.png", help="where the PNG goes")
    args = p.parse_args(argv)
    if args.size < 8 or args.size % 8:
        p.error(f"--size must be a positive multiple of 8, got {args.size}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows the plan's log line
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(model_folder(args.tiny), device=args.device, dtype=args.dtype)
    loaded = bench.peak_rss_mib()
    start = time.perf_counter()
    gen = pipe.generate(PROMPT, steps=args.steps, width=args.size, height=args.size, seed=0, memory=args.memory)
    seconds = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gen.images[0].save(args.out)
    plan = runner_of(pipe).plan  # the level the call ended at (lower than chosen after an OOM retry)
    report = dict(model="tiny SD1" if args.tiny else "SD1.5 architecture, random weights", size=args.size,
                  steps=args.steps, device=str(pipe.device), dtype=str(pipe.dtype).removeprefix("torch."),
                  memory_level=plan.level, reason=plan.reason, seconds=round(seconds, 1),
                  peak_rss_mib_after_load=round(loaded), peak_rss_mib=round(bench.peak_rss_mib()),
                  image=str(args.out))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
