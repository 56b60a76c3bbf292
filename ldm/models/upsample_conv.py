"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution, without the upsampled
tensor, on the CPU.

After a nearest-neighbour 2x upsampling, the 3x3 window of an output pixel covers only
2x2 distinct input pixels: in one dimension, output ``2i`` reads ``x[i-1]`` with the
filter's first tap and ``x[i]`` with the sum of the other two, output ``2i+1`` reads
``x[i]`` with the sum of the first two and ``x[i+1]`` with the last. So each of the four
output phases (row parity, column parity) is a 2x2 convolution of the input itself with
summed filters (the sub-pixel view of Shi et al. 2016 and Odena et al.'s "resize-
convolution"): 16 multiply-adds per channel pair and input pixel where the convolution of
the upsampled tensor needs 36 (2.25x fewer), and the tensor 4x the input's size is never
made. All four phases are one oneDNN convolution with 4x the output channels over the
input padded by one; four strided copies interleave them. The result is the same
convolution up to the order of additions (float32: within 1e-6 relative) and, in
bfloat16, the rounding of the summed filters.

Where it runs (:func:`use_upsample_phases`): the U-Net's and the VAE's upsampling layers
(:class:`ldm.models.layers.Upsample2D`, to twice the size, and the seamless VAE's tiles of
them, :mod:`ldm.seamless_vae`) on a CPU tensor in float32 or
bfloat16 without gradients, from :data:`MIN_PIXELS` input pixels. In float32 not where
:mod:`ldm.models.winograd` runs that convolution: its F(4x4, 3x3) on the upsampled tensor
needs 9 products per input pixel and channel pair where the phases need 16, but pays for
its transforms, and measured as fast (1.5-2.3x the direct convolution, more rounding).
:func:`set_upsample_phases` turns it off, or on wherever it can run.

Measured on one thread of an AMD EPYC with AVX512-BF16, :class:`~ldm.models.layers.Upsample2D`
alone at SD1.5's sizes for a 512 px image (the U-Net's 640 channels over 2x32x32, the
VAE's 512 over 64x64 and 128x128, 256 over 256x256): in bfloat16 1.8-2.1x faster than
interpolating and convolving (Winograd on the upsampled tensor: 1.4-1.6x), with less
rounding (2.4e-3 relative to float32, against 5.1e-3 for Winograd and 1.7e-3 direct); in
float32 2.0-2.2x (Winograd 1.7-2.3x), 1e-6 from float32's direct result (Winograd 3e-6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .memory_format import memory_format_of
from .switches import Switch
from .winograd import filter_products, runnable, use_winograd

SWITCH = Switch("Upsample phases")
# Input pixels (batch x height x width): with fewer, summing the filters costs more than the
# convolution saves (1280 channels in bfloat16: 0.3x over 2x8x8, 0.9x over 2x16x16; 2x at 2x32x32).
MIN_PIXELS = 2048


def _taps() -> Tensor:
    """[16, 9]: row ``4 * (2a + b) + 2u + v`` sums the 3x3 taps that phase (a, b)'s tap
    (u, v) stands for (row-major 3x3 filters)."""
    halves = torch.tensor([[[1, 0, 0], [0, 1, 1]],    # even outputs: x[i-1], x[i]
                           [[1, 1, 0], [0, 0, 1]]],   # odd outputs: x[i], x[i+1]
                          dtype=torch.float64)
    return torch.stack([torch.kron(halves[a], halves[b]) for a in (0, 1) for b in (0, 1)]).reshape(16, 9)


TAPS = _taps()


def set_upsample_phases(mode: str) -> str:
    """``"auto"`` (default: where :func:`use_upsample_phases` says), ``"on"`` (every CPU
    upsampling convolution it can run) or ``"off"``; returns the mode it replaces."""
    return SWITCH.set(mode)


def use_upsample_phases(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv`` applied to ``x`` upsampled 2x runs here as four phases of ``x``."""
    if not runnable(SWITCH, conv, x):
        return False
    if SWITCH.mode == "on":
        return True
    n, c, h, w = x.shape
    if n * h * w < MIN_PIXELS:
        return False
    return x.dtype == torch.bfloat16 or not use_winograd(conv, x[:, :, :1, :1].expand(n, c, 2 * h, 2 * w))


def phase_filters(weight: Tensor) -> Tensor:
    """[4 * C_out, C_in, 2, 2] from a [C_out, C_in, 3, 3] weight: phase (a, b)'s filters at
    rows ``(2a + b) * C_out ...``, in the weight's dtype and memory format."""
    c_out, c_in = weight.shape[:2]
    sums = filter_products(weight, TAPS).view(2, 2, 2, 2, c_out, c_in)  # [a, b, u, v, C_out, C_in]
    fmt = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return sums.permute(0, 1, 4, 5, 2, 3).reshape(4 * c_out, c_in, 2, 2).contiguous(memory_format=fmt)


def upsample_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, *, bordered: bool = False,
                    filters: Tensor | None = None) -> Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``
    for a 3x3 ``weight``, computed from ``x`` [N, C_in, H, W]; the output is channels_last
    where the convolution's would be (the input or the weight channels_last).
    ``bordered``: ``x`` carries a one-pixel border (its neighbours in a larger picture, or
    zeros), and the result is that of its interior, [N, C_out, 2 (H - 2), 2 (W - 2)] (a
    tile of :mod:`ldm.seamless_vae`). ``filters``: :func:`phase_filters` of ``weight``,
    when the caller reuses them across tiles."""
    filters = phase_filters(weight) if filters is None else filters
    # Over x padded by one, output (i + a, j + b) of phase (a, b) is output pixel (2i + a, 2j + b).
    phases = F.conv2d(x, filters, None if bias is None else bias.repeat(4), padding=0 if bordered else 1)
    n, c_out, h, w = phases.shape[0], weight.shape[0], phases.shape[2] - 1, phases.shape[3] - 1
    out = torch.empty((n, c_out, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=memory_format_of(phases))
    grid = out.view(n, c_out, h, 2, w, 2)
    for a in (0, 1):
        for b in (0, 1):
            k = 2 * a + b
            grid[:, :, :, a, :, b].copy_(phases[:, k * c_out:(k + 1) * c_out, a:a + h, b:b + w])
    return out
