"""How far tiled VAE decoding is from the untiled decode, and why: on the shipped toy VAE.

    python scripts/tiled_vae_seams.py                 # a 768 px mosaic, 64- and 32-latent tiles
    python scripts/tiled_vae_seams.py --size 1024 --tiles 64:16

The toy VAE has SD's four levels (narrower, one resnet fewer per block), so 64-latent tiles
(SD's default, 512 px) relate to its receptive field roughly as they do on SD. The picture
is a 3x3 mosaic of toy scenes on different backgrounds (tiles then see different colour
statistics), encoded whole; its latents are decoded:

1. whole (the reference);
2. in tiles as ``pipe(..., memory="tiled")`` decodes them (:func:`ldm.tiled_vae.tiled_decode`,
   diffusers' blending);
3. in the same tiles, every GroupNorm given the whole picture's statistics, recorded in
   pass 1: what the statistics alone account for (the rest is tile borders and the mid-block
   attention seeing one tile);
4. the same, with the statistics from a decode of the latents at half size instead: a cheap
   estimate of them (the "fast decoder" idea of the web UI's Tiled VAE extension);
5. layer by layer in tiles of 256 px over the whole picture's activations, as
   ``pipe(..., memory="seamless")`` decodes them (:func:`ldm.seamless_vae.seamless_decode`).

Printed per row: the largest and the mean difference to the whole decode, in 1/255 of the
[0, 255] picture, and the seconds each decode took. A seam is invisible below about 2/255.
``--model`` takes any checkpoint, e.g. the full-size SD1.5 architecture with random weights
that ``make bench`` builds (``.cache/bench/sd15-random``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a checkout without installing
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

MOSAIC = (("cat", "red", "blue"), ("star", "green", "white"), ("circle", "blue", "orange"),
          ("square", "yellow", "black"), ("triangle", "purple", "yellow"), ("cat", "orange", "green"),
          ("star", "white", "purple"), ("circle", "black", "red"), ("square", "red", "white"))


def mosaic(size: int) -> np.ndarray:
    """A ``size`` px picture: 3x3 toy scenes, one object each on its own background."""
    from ldm.toy.world import Scene, render

    cell = size // 3
    cells = [render(Scene(kind, colour, background, x=0.5, y=0.5, size=0.3), cell)
             for kind, colour, background in MOSAIC]
    return np.concatenate([np.concatenate(cells[r * 3:r * 3 + 3], 1) for r in range(3)], 0)


@contextlib.contextmanager
def fixed_group_norm_statistics(vae: nn.Module, record: bool) -> Iterator[None]:
    """Every GroupNorm of ``vae`` records its per-group mean and variance (``record``) or
    normalises with the ones it recorded last, whatever its input (a tile)."""
    norms = [m for m in vae.modules() if isinstance(m, nn.GroupNorm)]

    def forward(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        if record:
            self.recorded = (grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True))
        mean, var = self.recorded
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape_as(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)

    for m in norms:
        m.forward = forward.__get__(m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    to255 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    d = (to255(a) - to255(b)).abs()
    return float(d.max()), float(d.mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped toy model)")
    p.add_argument("--size", type=int, default=768, help="picture side in pixels, a multiple of 24 (default 768)")
    p.add_argument("--tiles", nargs="+", default=["64:16", "32:8"],
                   help="TILE:OVERLAP in latent pixels (default 64:16, SD's, and 32:8)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.size < 48 or args.size % 24:
        p.error(f"--size must be a multiple of 24 of at least 48, got {args.size}")
    torch.set_num_threads(args.threads)

    from ldm.pipeline import Pipeline
    from ldm.seamless_vae import seamless_decode
    from ldm.tiled_vae import Tiling, tiled_decode

    try:
        tilings = [Tiling(*(int(v) for v in t.split(":"))) for t in args.tiles]
    except (TypeError, ValueError) as exc:
        p.error(f"--tiles: {exc}")
    pipe = Pipeline.from_pretrained(args.model, device="cpu", dtype="float32")
    vae = pipe.vae
    x = torch.from_numpy(mosaic(args.size)).permute(2, 0, 1)[None].float() / 127.5 - 1
    print(f"{pipe.model.source}: a {args.size} px mosaic, latents {args.size // 8}x{args.size // 8}; "
          "difference to the whole decode, max / mean in 1/255")
    with torch.no_grad():
        z = vae.encode(x).mean
        t0 = time.perf_counter()
        whole = vae.decode(z)
        print(f"whole decode: {time.perf_counter() - t0:.1f} s")
        with fixed_group_norm_statistics(vae, record=True):
            vae.decode(z)
        t0 = time.perf_counter()
        seamless = seamless_decode(vae, z)
        print("layer by layer in 256 px tiles, as memory='seamless' decodes  "
              f"{'%.0f / %.2f' % difference(seamless, whole)}"
              f"  ({time.perf_counter() - t0:.1f} s)")
        for tiling in tilings:
            name = f"tiles of {tiling.tile} latents, overlap {tiling.overlap}"
            t0 = time.perf_counter()
            tiled = tiled_decode(vae, z, tiling)
            print(f"{name}: as memory='tiled' decodes  {'%.0f / %.2f' % difference(tiled, whole)}"
                  f"  ({time.perf_counter() - t0:.1f} s)")
            with fixed_group_norm_statistics(vae, record=False):
                print(f"{name}: the whole picture's GroupNorm statistics  "
                      f"{'%.0f / %.2f' % difference(tiled_decode(vae, z, tiling), whole)}")
        half = F.interpolate(z, scale_factor=0.5, mode="area")
        with fixed_group_norm_statistics(vae, record=True):
            vae.decode(half)
        for tiling in tilings:
            with fixed_group_norm_statistics(vae, record=False):
                print(f"tiles of {tiling.tile} latents, overlap {tiling.overlap}: statistics of a half-size decode  "
                      f"{'%.0f / %.2f' % difference(tiled_decode(vae, z, tiling), whole)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
