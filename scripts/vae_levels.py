"""Decode one latent at each VAE memory level, each in its own process: time, peak RSS
growth, ldm's estimate, and the difference to the whole decode.

    python scripts/vae_levels.py                       # full-size SD1.5 VAE (random weights), 1024 px
    python scripts/vae_levels.py --size 2048 --levels seamless tiled
    python scripts/vae_levels.py --tiny --size 256     # the tests' tiny model (a smoke test)

Levels: ``fast`` (``vae.decode``, the reference), ``seamless`` (:func:`ldm.seamless_vae.seamless_decode`:
layer by layer in tiles, the whole picture's statistics) and ``tiled`` (:func:`ldm.tiled_vae.tiled_decode`:
the whole VAE per 64-latent tile, blended). The latent is seeded noise; with random weights
the picture is noise too, which is what a seam test wants (every pixel differs from its
neighbours). Differences are in 1/255 of the [0, 255] picture; a seam is invisible below 2.
The peak RSS growth is measured from after loading (Linux VmHWM), one process per level
so that no level's peak hides another's. Without ``fast`` the differences are to ``seamless``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (sets up the paths of ldm and of the diffusers reference helpers)
from big_image import model_folder  # noqa: E402

LEVELS = ("fast", "seamless", "tiled")


def decode_one(level: str, size: int, tiny: bool, dtype: str, out: Path) -> dict:
    """In this process: load, decode at ``level``, save the uint8 picture to ``out``."""
    import numpy as np
    import torch

    from ldm import Pipeline
    from ldm.limits import level_needs
    from ldm.seamless_vae import seamless_decode
    from ldm.tiled_vae import tiled_decode

    pipe = Pipeline.from_pretrained(model_folder(tiny), device="cpu", dtype=dtype)
    vae = pipe.vae
    factor = pipe.config.vae.downsample_factor
    z = torch.randn(1, 4, size // factor, size // factor, generator=torch.Generator().manual_seed(0)).to(vae.dtype)
    decode = {"fast": vae.decode, "seamless": lambda t: seamless_decode(vae, t),
              "tiled": lambda t: tiled_decode(vae, t)}[level]
    loaded = bench.peak_rss_mib()
    start = time.perf_counter()
    with torch.inference_mode():
        image = decode(z)
    seconds = time.perf_counter() - start
    grown = bench.peak_rss_mib() - loaded
    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    np.save(out, pixels[0].numpy())
    needs = level_needs(pipe.config, size, size, dtype_bytes=vae.dtype.itemsize, guided=True, device="cpu",
                        level=level)["VAE"]
    return {"level": level, "seconds": round(seconds, 1), "peak_rss_growth_mib": round(grown),
            "estimate_mib": round(needs / 2**20)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="picture side in pixels (default 1024)")
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny SD1 model instead of the full size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # LEVEL OUT.npy: the child process
    args = p.parse_args(argv)
    if args.size < 64 or args.size % 64:
        p.error(f"--size must be a multiple of 64, got {args.size}")
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(decode_one(args.one[0], args.size, args.tiny, args.dtype, Path(args.one[1]))))
        return 0
    import numpy as np

    rows, pictures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in args.levels:
            out = Path(tmp) / f"{level}.npy"
            cmd = [sys.executable, __file__, "--size", str(args.size), "--dtype", args.dtype,
                   "--threads", str(args.threads), "--one", level, str(out)] + (["--tiny"] if args.tiny else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            pictures[level] = np.load(out).astype(np.int16)
    reference = "fast" if "fast" in pictures else args.levels[0]
    print(f"{'tiny SD1' if args.tiny else 'SD1.5 VAE architecture, random weights'}: one {args.size}x{args.size} "
          f"decode, {args.dtype}, {args.threads} thread(s); difference to {reference!r} in 1/255")
    for row in rows:
        d = np.abs(pictures[row["level"]] - pictures[reference])
        row.update(max_difference=int(d.max()), mean_difference=round(float(d.mean()), 3))
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
