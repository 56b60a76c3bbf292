"""Tiled VAE decode and encode: any image size in the memory of one tile.

The latents (decode) or pixels (encode) are cut into overlapping square tiles, each
tile goes through the VAE alone, and every tile's first ``overlap`` rows and columns
are blended linearly into its upper and left neighbours' last ones, as diffusers'
``AutoencoderKL.tiled_decode`` / ``_tiled_encode`` do (``blend_v`` then ``blend_h``,
in row-major order, each neighbour already blended). Tiles start every
``tile - overlap``; unlike diffusers, no tile is made that lies wholly inside the
previous one (diffusers adds one whenever the size leaves a remainder of at most the
overlap, and blends it misaligned when it is narrower than the overlap), so every
seam blends across exactly ``overlap``, whatever the size.

Tiled output is not the untiled output: the VAE's GroupNorm layers take their mean
and variance over each tile instead of the whole image, and a tile's border pixels
see zero padding instead of their neighbours. The overlap hides the border; the
statistics differ by how much a tile's content differs from the whole image's.
An image that fits in one tile is decoded whole, so it equals the untiled result.
Blending runs row by row into a preallocated output, so beyond the output only one
row of tiles is held (diffusers keeps every decoded tile until the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .config import VAEConfig
from .models.vae import DiagonalGaussian

# diffusers' tile_overlap_factor: a quarter of the tile overlaps each neighbour.
OVERLAP_FRACTION = 0.25


@dataclass(frozen=True)
class Tiling:
    """Tile side and overlap, both in latent pixels (the encoder's tiles are
    ``factor`` times larger in image pixels)."""

    tile: int
    overlap: int

    def __post_init__(self) -> None:
        for name in ("tile", "overlap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"tiling {name} must be an int (latent pixels), got {value!r}")
        if self.tile < 2:
            raise ValueError(f"tiling tile must be at least 2 latent pixels, got {self.tile}")
        if not 0 < self.overlap <= self.tile // 2:
            raise ValueError(f"tiling overlap must be in 1..{self.tile // 2} (half the tile {self.tile}), "
                             f"got {self.overlap}")

    @classmethod
    def for_vae(cls, config: VAEConfig, tile: int | None = None) -> "Tiling":
        """diffusers' defaults for a VAE: tiles of ``sample_size`` image pixels
        (64 latents for SD's 512), a quarter of them overlapping."""
        tile = config.sample_size // config.downsample_factor if tile is None else tile
        return cls(tile, max(1, int(tile * OVERLAP_FRACTION)))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start along a side of ``length``: every ``tile - overlap``, until a
    tile reaches the end (the last one may be shorter, never by the overlap or more)."""
    if length < 1:
        raise ValueError(f"a side to tile must be at least 1, got {length}")
    starts = [0]
    while starts[-1] + tile < length:
        starts.append(starts[-1] + tile - overlap)
    return starts


def _ramps(extent: int, like: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    # The same weights, in the same dtype, as diffusers' per-row loop: (1 - y/E) and y/E.
    shape = [1] * like.ndim
    shape[dim] = extent
    down = torch.tensor([1 - y / extent for y in range(extent)], dtype=like.dtype, device=like.device)
    up = torch.tensor([y / extent for y in range(extent)], dtype=like.dtype, device=like.device)
    return down.view(shape), up.view(shape)


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """``b`` with its first ``extent`` entries along ``dim`` blended from ``a``'s last ones."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    down, up = _ramps(extent, b, dim)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * down + b.narrow(dim, 0, extent) * up
    b = b.clone()
    b.narrow(dim, 0, extent).copy_(head)
    return b


def tiled_apply(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: float) -> Tensor:
    """``fn`` over overlapping ``tile`` x ``tile`` tiles of ``x`` [B, C, H, W], blended.

    ``fn`` maps a [B, C, h, w] tile to [B, C', h*scale, w*scale]; ``tile`` and
    ``overlap`` are in ``x``'s pixels, and must map to whole output pixels.
    """
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return fn(x)
    for name, value in (("tile", tile), ("overlap", overlap), ("height", h), ("width", w)):
        if value * scale != int(value * scale):
            raise ValueError(f"tiled VAE: {name} {value} does not map to whole pixels at scale {scale}")
    extent, stride = int(overlap * scale), int((tile - overlap) * scale)
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out: Tensor | None = None
    above: list[Tensor] = []
    for i, top in enumerate(rows):
        row: list[Tensor] = []
        for j, left in enumerate(cols):
            t = fn(x[:, :, top:top + tile, left:left + tile])
            if out is None:
                out = t.new_empty((*t.shape[:2], int(h * scale), int(w * scale)))
            if i > 0:
                t = _blend(above[j], t, extent, 2)
            if j > 0:
                t = _blend(row[-1], t, extent, 3)
            row.append(t)
            # Each tile owns the rows and columns up to the next tile's start; the last, the rest.
            th = t.shape[2] if i == len(rows) - 1 else stride
            tw = t.shape[3] if j == len(cols) - 1 else stride
            y, x0 = int(top * scale), int(left * scale)
            out[:, :, y:y + th, x0:x0 + tw] = t[:, :, :th, :tw]
        above = row
    assert out is not None
    return out


def tiled_decode(vae: Any, z: Tensor, tiling: Tiling | None = None) -> Tensor:
    """``vae.decode(z)`` (unscaled latents [B, C, h, w]) tile by tile; see the module notes."""
    tiling = Tiling.for_vae(vae.config) if tiling is None else tiling
    _check_4d(z, "latents")
    return tiled_apply(vae.decode, z, tiling.tile, tiling.overlap, vae.config.downsample_factor)


def tiled_encode(vae: Any, x: Tensor, tiling: Tiling | None = None) -> DiagonalGaussian:
    """``vae.encode(x)`` (images [B, 3, H, W] in [-1, 1]) tile by tile: the posterior's
    moments (mean and log-variance) are blended, as diffusers' ``_tiled_encode`` does."""
    tiling = Tiling.for_vae(vae.config) if tiling is None else tiling
    _check_4d(x, "images")
    factor = vae.config.downsample_factor
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"tiled encode: image size {x.shape[-1]}x{x.shape[-2]} must be a multiple of {factor}")

    def moments(tile: Tensor) -> Tensor:
        return vae.quant_conv(vae.encoder(tile))

    return DiagonalGaussian(tiled_apply(moments, x, tiling.tile * factor, tiling.overlap * factor, 1 / factor))


def _check_4d(t: Any, name: str) -> None:
    if not isinstance(t, Tensor) or t.ndim != 4:
        raise ValueError(f"tiled VAE: {name} must be a [B, C, H, W] tensor, got {getattr(t, 'shape', type(t))}")

