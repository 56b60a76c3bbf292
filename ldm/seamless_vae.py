"""Seamless tiled VAE: the untiled result, computed a tile at a time, layer by layer.

:mod:`ldm.tiled_vae` runs the whole VAE on each tile and blends the tiles, which leaves
seams: every GroupNorm normalises a tile by the tile's own statistics, the mid-block
attention sees one tile, and a tile's border sees zero padding (on the toy VAE at SD's
64-latent tiles: up to 229/255 from the whole decode, ``scripts/tiled_vae_seams.py``).

Here the VAE runs layer by layer over the whole picture's activations instead, and only
the work inside a layer is tiled (the web UI Tiled VAE extension's idea of synchronised
GroupNorm statistics, taken to every layer):

- a convolution computes its output tile by tile, each tile reading its input region
  plus the halo its kernel needs (zero padding only at the picture's own border), so
  every output pixel is what the whole convolution gives; an upsampling convolution reads
  the 2x upsampled activation region by region, or, where the whole layer would run as
  four phases of its input (:mod:`ldm.models.upsample_conv`), convolves input tiles with
  a one-pixel halo;
- a GroupNorm takes its per-group mean and variance over the whole activation (reduced
  in chunks, merged in float64), then normalises each tile with them;
- the mid-block attention runs on the whole feature map at latent resolution (its
  memory is the attention chunk's business, :func:`ldm.models.layers.set_attention_chunk`).

The output equals ``vae.decode`` / ``vae.encode`` up to float rounding. Memory: one
layer's input and output activations (the untiled forward holds several temporaries of
each) and one tile's work. With ``store`` the whole activations live on another device
(CPU memory while the tiles compute on a GPU), so the compute device holds one tile's
work. The cost: each GroupNorm's input is read once more for its statistics, and the
halos are computed twice (1-2% at 256-pixel tiles).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.layers import ResnetBlock2D
from .models.unet import MidBlock2D
from .models.vae import DiagonalGaussian
from .models.upsample_conv import phase_filters, upsample_conv2d, use_upsample_phases
from .models.winograd import conv_forward

# Output pixels per tile side at every layer: 256 x 256 x 128 channels of float32 is 32 MiB.
TILE = 256
# Values per chunk when a GroupNorm's statistics are reduced (bounds its temporaries).
_STAT_ELEMENTS = 2**22

# A region of an activation (real or virtual), rows [r0, r1) and columns [c0, c1), on the
# compute device; the region always lies inside the activation.
Source = Callable[[int, int, int, int], Tensor]
# (top, bottom, left, right) zero padding of a convolution's input.
Padding = tuple[int, int, int, int]


class _Layers:
    """The tile-by-tile forward of VAE layers: where activations live, where tiles compute."""

    def __init__(self, compute: torch.device, store: torch.device, tile: int, batch: int) -> None:
        self.compute, self.store, self.tile, self.batch = compute, store, tile, batch

    # --- sources -----------------------------------------------------------------------------

    def region(self, x: Tensor) -> Source:
        return lambda r0, r1, c0, c1: x[:, :, r0:r1, c0:c1].to(self.compute)

    def normed(self, norm: nn.GroupNorm, x: Tensor) -> Source:
        """SiLU(GroupNorm(x)) with the whole activation's statistics, region by region."""
        mean, rstd = self.stats(norm, x)
        # GroupNorm as torch's CPU kernel computes it: x * scale + shift per channel, in
        # float32 for half-precision activations, rounded to their dtype before the SiLU.
        exact = torch.promote_types(x.dtype, torch.float32)
        per_channel = x.shape[1] // norm.num_groups
        scale = (rstd.repeat_interleave(per_channel, 1) * norm.weight.double()).to(exact)
        shift = (norm.bias.double() - mean.repeat_interleave(per_channel, 1) * scale.double()).to(exact)
        scale, shift = scale[:, :, None, None], shift[:, :, None, None]

        def source(r0: int, r1: int, c0: int, c1: int) -> Tensor:
            t = x[:, :, r0:r1, c0:c1].to(self.compute)
            return F.silu(torch.addcmul(shift, t.to(exact), scale).to(t.dtype), inplace=True)

        return source

    def upsampled(self, x: Tensor) -> Source:
        """Nearest-neighbour 2x of ``x`` (as ``F.interpolate(scale_factor=2)``), region by region."""
        def source(r0: int, r1: int, c0: int, c1: int) -> Tensor:
            t = x[:, :, r0 // 2:(r1 + 1) // 2, c0 // 2:(c1 + 1) // 2].to(self.compute)
            t = F.interpolate(t, scale_factor=2.0, mode="nearest")
            return t[:, :, r0 % 2:r0 % 2 + r1 - r0, c0 % 2:c0 % 2 + c1 - c0]

        return source

    # --- layers ------------------------------------------------------------------------------

    def stats(self, norm: nn.GroupNorm, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per (image, group), in float64: the mean and 1/sqrt(variance + eps) of all of
        ``x``, as ``norm`` computes them on the whole activation. Each chunk of a group's
        values gives its sum and its sum of squared deviations from its own mean; chunks
        merge exactly (Chan et al.'s pairwise update), so nothing cancels."""
        b, c = x.shape[:2]
        g = norm.num_groups
        flat = x.reshape(b, g, -1)  # a view where x is contiguous: each group's values in a row
        length = flat.shape[-1]
        step = max(1, _STAT_ELEMENTS // (b * g))
        count = 0
        mean = m2 = torch.zeros(b, g, dtype=torch.float64, device=self.compute)
        for k in range(0, length, step):
            chunk = flat[:, :, k:k + step].to(self.compute)
            chunk = chunk.to(torch.promote_types(chunk.dtype, torch.float32))
            n = chunk.shape[-1]
            # torch sums a chunk pairwise (float32 error ~1e-7 relative); chunks merge in float64.
            mean_n = chunk.sum(-1) / n
            m2_n = (chunk - mean_n[..., None]).square().sum(-1).double()
            mean_n = mean_n.double()
            delta = mean_n - mean
            mean = mean + delta * (n / (count + n))
            m2 = m2 + m2_n + delta.square() * (count * n / (count + n))
            count += n
        return mean, torch.rsqrt(m2 / count + norm.eps)

    def conv(self, conv: nn.Conv2d, source: Source, size: tuple[int, int], *, extra: Padding = (0, 0, 0, 0),
             add: Source | None = None, out: Tensor | None = None) -> Tensor:
        """``conv`` over the ``size`` activation that ``source`` reads (zero padded by the conv's
        own padding plus ``extra``), tile by tile into ``out`` (new, on the store device, unless
        given); ``add``: a region of the output's size added to each tile (a residual)."""
        if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or isinstance(conv.padding, str):
            raise ValueError(f"seamless VAE: unsupported convolution {conv}")
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        pad = (ph + extra[0], ph + extra[1], pw + extra[2], pw + extra[3])
        # A "same" convolution (stride 1, the kernel's own symmetric padding) pads every region
        # itself and its output is cropped to the tile: no padded copy of the region.
        same = (sh, sw) == (1, 1) and extra == (0, 0, 0, 0) and (kh, kw) == (2 * ph + 1, 2 * pw + 1)
        h, w = size
        ho, wo = (h + pad[0] + pad[1] - kh) // sh + 1, (w + pad[2] + pad[3] - kw) // sw + 1
        if out is None:
            out = torch.empty(self.batch, conv.out_channels, ho, wo, dtype=conv.weight.dtype, device=self.store)
        for o0 in range(0, ho, self.tile):
            o1 = min(o0 + self.tile, ho)
            r0, r1, above, below = _span(o0, o1, sh, kh, pad[0], h)
            for p0 in range(0, wo, self.tile):
                p1 = min(p0 + self.tile, wo)
                c0, c1, left, right = _span(p0, p1, sw, kw, pad[2], w)
                if same:
                    t = conv_forward(conv, source(r0, r1, c0, c1))
                    t = t[:, :, o0 - r0:o1 - r0, p0 - c0:p1 - c0]
                else:
                    t = F.pad(source(r0, r1, c0, c1), (left, right, above, below))
                    t = F.conv2d(t, conv.weight, conv.bias, stride=conv.stride, groups=conv.groups)
                if add is not None:
                    t = t + add(o0, o1, p0, p1)
                out[:, :, o0:o1, p0:p1] = t.to(self.store)
        return out

    def upsample_conv(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """``conv`` over ``x`` upsampled 2x (nearest): as four phases of ``x``
        (:mod:`ldm.models.upsample_conv`) where the whole layer would run so, each output
        tile from its input region plus a one-pixel halo; else over :meth:`upsampled`."""
        h, w = x.shape[-2:]
        if not use_upsample_phases(conv, x[:, :, :1, :1].to(self.compute).expand(x.shape)):
            return self.conv(conv, self.upsampled(x), (2 * h, 2 * w))
        filters, step = phase_filters(conv.weight), max(1, self.tile // 2)  # input pixels per tile side
        out = torch.empty(self.batch, conv.out_channels, 2 * h, 2 * w, dtype=conv.weight.dtype, device=self.store)
        for i0 in range(0, h, step):
            i1 = min(i0 + step, h)
            r0, r1, above, below = _span(i0, i1, 1, 3, 1, h)
            for j0 in range(0, w, step):
                j1 = min(j0 + step, w)
                c0, c1, left, right = _span(j0, j1, 1, 3, 1, w)
                t = F.pad(self.region(x)(r0, r1, c0, c1), (left, right, above, below))
                t = upsample_conv2d(t, conv.weight, conv.bias, bordered=True, filters=filters)
                out[:, :, 2 * i0:2 * i1, 2 * j0:2 * j1] = t.to(self.store)
        return out

    def resnet(self, block: ResnetBlock2D, x: Tensor) -> Tensor:
        """GroupNorm-SiLU-conv twice plus the shortcut (the VAE's resnet: no timestep)."""
        if block.time_emb_proj is not None:
            raise ValueError("seamless VAE: a resnet with a timestep embedding is not a VAE's")
        size = x.shape[-2:]
        h = self.conv(block.conv1, self.normed(block.norm1, x), size)
        if block.conv_shortcut is None:
            # conv2 reads h, so each output tile can replace the x it adds (x is not read again).
            return self.conv(block.conv2, self.normed(block.norm2, h), size, add=self.region(x), out=x)
        shortcut = block.conv_shortcut
        return self.conv(block.conv2, self.normed(block.norm2, h), size,
                         add=lambda *r: shortcut(self.region(x)(*r)))

    def mid(self, block: MidBlock2D, x: Tensor) -> Tensor:
        x = self.resnet(block.resnets[0], x)
        for attention, resnet in zip(block.attentions, block.resnets[1:]):
            x = self.resnet(resnet, attention(x.to(self.compute)).to(self.store))
        return x


def _span(o0: int, o1: int, stride: int, kernel: int, before: int, length: int) -> tuple[int, int, int, int]:
    """The input rows [lo, hi) that output rows [o0, o1) read, clipped to the input's
    ``length``, and the zero rows to add above and below."""
    lo, hi = o0 * stride - before, (o1 - 1) * stride - before + kernel
    return max(lo, 0), min(hi, length), max(-lo, 0), max(hi - length, 0)


def _layers(vae: Any, t: Tensor, name: str, tile: int, store: Any) -> _Layers:
    if not isinstance(t, Tensor) or t.ndim != 4:
        raise ValueError(f"seamless VAE: {name} must be a [B, C, H, W] tensor, got {getattr(t, 'shape', type(t))}")
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 8:
        raise ValueError(f"seamless VAE: tile must be an int of at least 8 pixels, got {tile!r}")
    compute = next(vae.parameters()).device
    return _Layers(compute, torch.device(store) if store is not None else compute, tile, t.shape[0])


@torch.no_grad()
def seamless_decode(vae: Any, z: Tensor, tile: int = TILE, store: Any = None) -> Tensor:
    """``vae.decode(z)`` (unscaled latents [B, C, h, w]) layer by layer in tiles of ``tile``
    pixels; activations kept on ``store`` (default: where the VAE computes). See the module notes."""
    layers = _layers(vae, z, "latents", tile, store)
    dec, device = vae.decoder, z.device
    z = vae.post_quant_conv(z.to(layers.compute))
    x = layers.conv(dec.conv_in, layers.region(z), z.shape[-2:])
    x = layers.mid(dec.mid_block, x)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            x = layers.resnet(resnet, x)
        if block.upsamplers is not None:
            x = layers.upsample_conv(block.upsamplers[0].conv, x)
    x = layers.conv(dec.conv_out, layers.normed(dec.conv_norm_out, x), x.shape[-2:])
    return x.to(device)


@torch.no_grad()
def seamless_encode(vae: Any, x: Tensor, tile: int = TILE, store: Any = None) -> DiagonalGaussian:
    """``vae.encode(x)`` (images [B, 3, H, W] in [-1, 1]) layer by layer in tiles of ``tile``
    pixels; activations kept on ``store``. See the module notes."""
    layers = _layers(vae, x, "images", tile, store)
    enc = vae.encoder
    device = x.device
    h = layers.conv(enc.conv_in, layers.region(x), x.shape[-2:])
    for block in enc.down_blocks:
        for resnet in block.resnets:
            h = layers.resnet(resnet, h)
        if block.downsamplers is not None:
            down = block.downsamplers[0]
            # Downsample2D(padding=0) pads only the bottom and right, as the original VAE does.
            extra = (0, 1, 0, 1) if down.padding == 0 else (0, 0, 0, 0)
            h = layers.conv(down.conv, layers.region(h), h.shape[-2:], extra=extra)
    h = layers.mid(enc.mid_block, h)
    h = layers.conv(enc.conv_out, layers.normed(enc.conv_norm_out, h), h.shape[-2:])
    return DiagonalGaussian(vae.quant_conv(h.to(layers.compute)).to(device))
