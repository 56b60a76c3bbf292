"""3x3 convolutions by Winograd's minimal filtering, on the CPU.

A 3x3 convolution computes each output from 9 inputs per channel pair. Winograd's
algorithm (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"; cuDNN's
and NNPACK's Winograd kernels) cuts overlapping input tiles, transforms each (``B^T d B``),
multiplies it element by element with the transformed filter (``G g G^T``) and transforms
the product back (``A^T m A``). F(4x4, 3x3) makes 16 outputs from 6x6 tiles with 36
multiplications per channel pair where the direct convolution needs 144; F(2x2, 3x3) 4
outputs from 4x4 tiles with 16 where it needs 36. The products over all channels are one
batched GEMM, ``[tiles, C_in] x [C_in, C_out]`` per tile position, so the work that
dominates still runs in oneDNN's GEMM, on 4x (2.25x) fewer multiply-adds. The transforms
are small GEMMs (36x36 and 16x36 for F4) over a chunk of tile rows at a time, so their
data stays in cache; the filter is transformed on each call, or once per weight over a
denoising loop in bfloat16 (:func:`filter_workspace`'s ``keep``).

The cost is rounding: the transforms add and subtract inputs scaled by up to 5 and
outputs by up to 8. One convolution's relative error against exact arithmetic, 320
channels over 32x32 (this module's code against a float64 convolution):

| dtype | direct | F(2x2, 3x3) | F(2x4, 3x3) | F(4x4, 3x3) |
|---|---|---|---|---|
| float32 | 2.3e-7 | 4.0e-7 | 7.7e-7 | 2.7e-6 |
| bfloat16 | 2.9e-3 | 5.6e-3 | 9.6e-3 | 3.1e-2 |

So float32 uses F4 (:data:`TRANSFORMS`) and bfloat16 F2: F4 in bfloat16 tripled the
SD1.5 U-Net's distance to float32 (1.35% -> 4.0%) and made the VAE decode's 6.2%.
F(2x4, 3x3) is F(2, 3) down the rows and F(4, 3) on the points 0, +-1/2, +-3/2 across
(scaling by at most 27/8; on Lavin's 0, +-1, +-2 it rounds like F4): 24 products per 8
outputs, 3 per output against F2's 4. bfloat16 runs it where the filters are kept over a
denoising loop (:func:`kept_transforms`): its filter is transformed in float32 (its ninths
are not exact in bfloat16), 24/9 of the weight. In the SD1.5 U-Net at 512 px (one bfloat16
step, float32 direct as reference) the distance was 1.63% direct, 1.70% with F2 and 1.87%
with F2 and F(2x4) where the filters are kept, and the step 0.96x as long (7.0-7.2 s
against 7.4-7.5 alternating, one EPYC thread).

Measured on one thread of an AMD EPYC with AVX512-BF16 (no AMX), full SD1.5 architecture
at 512 px (``scripts/bench.py`` prints these lines for its size): qualifying layers ran
1.2-2.4x faster in float32 and 1.2-1.5x in bfloat16. The filter is transformed on each
call (one GEMM over the weight: a 1280-channel bfloat16 one takes 35-40 ms), so over too
few output pixels (batch x height x width, :data:`MIN_PIXELS`) it costs more than it
saves, and with few channels the GEMM is too small to pay for the transforms; those
layers stay direct. At 512 px (batch 2: the 64x64 and 32x32 levels qualify) the U-Net step
took 0.93 of the direct one in float32 and 0.94 in bfloat16; the VAE decode 0.72 in
float32 and 0.81-0.84 in bfloat16. Distance to the float32 direct result: U-Net 3.4e-6 in
float32, 1.38% in bfloat16 (1.27% direct); decode 5.9e-6, 1.45% (1.21%).

Most of a large filter's transform was the first touch of fresh memory (a 1280-channel
filter is over glibc's 32 MB limit for reusing freed memory), so inside
:func:`filter_workspace`, which the pipeline's memory runner enters around each phase, the
filters are written into one reused buffer: a third of the time, and the U-Net's 16x16 and
8x8 levels (1280 channels) pay too (:data:`MIN_PIXELS_WORKSPACE`, :data:`MIN_CHANNELS_WORKSPACE`;
float32 there with F2, :func:`transforms_for`).
One float32 U-Net step at 512 px took 15.2 s against 16.6 s without the workspace (two
steps each, twice); bfloat16 8.3-8.5 s against 8.5. Keeping every transformed filter
instead measured 7.8 s in bfloat16 before the workspace (1.8 GB more memory, 3.9 s more on
the first step); on top of the workspace, bfloat16 filters kept over a denoising loop
save 0.2-0.5 s a step (see :func:`filter_workspace` and :data:`KEEP_MIN_STEPS`).

Where it runs (:func:`use_winograd`): a CPU tensor in float32, or bfloat16 on a CPU whose
flags say AVX512-BF16 without AMX (where it was measured; with AMX the direct
convolution's tiles are expected to win), without gradients, through a 3x3 stride-1
padding-1 :class:`Conv3x3` with at least :data:`MIN_CHANNELS` channels in and out (128 in
float32, 256 in bfloat16), over at least :data:`MIN_PIXELS` output pixels (2,048 in float32,
1,024 in bfloat16; inside the workspace 64 and 256 with 1,280 channels; with bfloat16
filters kept, 64 with 2,560 channels in: :data:`MIN_IN_CHANNELS_KEPT`).
:func:`set_winograd` turns it off, or on for every eligible layer whatever its size.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cpuinfo import cpu_flags
from .memory_format import memory_format_of
from .switches import Switch, no_grad_wanted

# Batch x height x width: below, transforming the filter costs more than the GEMMs save. Measured
# at SD1.5's U-Net levels at 512 px: float32 paid from 2,048 (128 F4 tiles: 1.3-1.8x, 0.5-0.7x at
# 512) and bfloat16 from 1,024 (256 F2 tiles: 1.2-1.5x; 0.6-0.8x at 512).
MIN_PIXELS = {torch.float32: 2048, torch.bfloat16: 1024}
# Fewer channels make the GEMM too small to pay for the transforms: at 128 channels a bfloat16
# layer measured 0.6-0.8x (1.2-1.3x from 256), a float32 one at 64 channels 0.9-1.0x (1.2-1.4x from 128).
MIN_CHANNELS = {torch.float32: 128, torch.bfloat16: 256}
# Inside filter_workspace() transforming costs about a third as much, and float32 layers under
# 2,048 pixels run F(2x2, 3x3), whose filters are 16/9 of the weights (F4's 4x). Timed layer by
# layer at SD1.5's 1280-channel levels, transform included: float32 F2 0.63-0.80x the direct
# time over 16x16 and 8x8, batch 1 and 2 (down to 64 pixels); bfloat16 0.67-0.88x from 256
# pixels, 1.35-1.5x over 128 and 64 at 1280 channels in. With fewer channels the GEMMs are too
# small: 640 channels over 2x16x16 1.0x (float32) and 1.17x (bfloat16), 320 over 2x8x8 2.4x.
MIN_PIXELS_WORKSPACE = {torch.float32: 64, torch.bfloat16: 256}
MIN_CHANNELS_WORKSPACE = 1280
# Kept filters pay from this many U-Net evaluations on (see filter_workspace): SD1.5 at
# 512 px in bfloat16 (one thread of an AMD EPYC, alternating with the workspace alone) ran
# its later steps 0.5-0.8 s faster (7.0-7.1 s against 7.6-7.7; 7.6-7.7 against 8.3-8.4 in
# another run), the first 2.5-3.9 s slower (1,622 MiB of fresh pages, the F(2x4) filters
# transformed in float32: 2.4-3.0 s of it): it pays from about the sixth step. At 256 px fewer
# layers run as Winograd, so fewer filters are kept: the first step 0.2-0.3 s slower, the later
# ones 0.1 s faster (1.9-2.0 s against 2.0-2.1): it pays from about the third.
KEEP_MIN_STEPS = 8
# With bfloat16 filters kept, the larger tiles of F(2x4, 3x3) (24 products per 8 outputs, against
# F(2x2, 3x3)'s 16 per 4) pay from this many pixels: SD1.5's layers at 512 px (one EPYC thread,
# filters kept) 2x320x64x64 38.5 ms against 47.8, 2x640x32x32 35.0 / 40.8, 2x1280x16x16 38.4 / 42.2,
# 1x1280x16x16 19.1 / 21.0; over 2x8x8 19.8 / 17.4 (two tiles across: the transforms weigh more).
MIN_PIXELS_WIDE = 256
# With bfloat16 filters kept, no filter is transformed on a call, and over fewer than
# MIN_PIXELS_WORKSPACE pixels F(2x2, 3x3) pays where oneDNN's direct kernel is slow, with
# many channels in: 2560 -> 1280 over 2x8x8 33.6 ms against 67.8 direct (119 GFLOP/s) and
# over 1x8x8 16.6 / 51.4; 1280 -> 1280 only 17.4 / 20.8 (2x8x8) for 52 MB more kept.
MIN_IN_CHANNELS_KEPT = 2560
MIN_PIXELS_KEPT = 64
FILTER_BLOCK = 32768  # weights per float32 block of a filter transform: 3 MiB of products in F(2x4)
TILES_PER_CHUNK = 256  # tiles transformed at once: ~9 MiB of bfloat16 at 512 channels
SWITCH = Switch("Winograd")
KEEP_SWITCH = Switch("kept filters")
WIDE_SWITCH = Switch("F(2x4) tiles")
# (dtype, device) -> one flat buffer inside filter_workspace(); None outside.
_WORKSPACE: ContextVar[dict[tuple, Tensor] | None] = ContextVar("ldm_filter_workspace", default=None)
# id(weight) -> (its data then, its version then, its filters) inside filter_workspace(keep=True).
_KEPT: ContextVar[dict[int, tuple[Tensor, int, Tensor]] | None] = ContextVar("ldm_kept_filters", default=None)


class Transform1D:
    """F(m, 3) in one dimension: ``m`` outputs of a 3-tap filter from ``m + 2`` inputs, by
    the input transform ``bt`` [m+2, m+2], filter transform ``g`` [m+2, 3] and output
    transform ``at`` [m, m+2]."""

    def __init__(self, m: int, bt: tuple, g: tuple, at: tuple) -> None:
        self.m = m
        self.bt, self.g, self.at = (torch.tensor(rows, dtype=torch.float64) for rows in (bt, g, at))


class Transforms:
    """F(m_h x m_w, 3 x 3) from two 1-D transforms (rows, then columns): input tiles of
    ``alpha`` = (m_h + 2, m_w + 2), and the flattened 2-D transforms (row-major tiles) of
    input tiles [positions, positions], filters [positions, 9] and products [m_h m_w,
    positions], where ``positions`` = alpha_h alpha_w is the number of GEMMs."""

    def __init__(self, rows: Transform1D, cols: Transform1D) -> None:
        self.m, self.alpha = (rows.m, cols.m), (rows.m + 2, cols.m + 2)
        self.positions = self.alpha[0] * self.alpha[1]
        self.input, self.filter, self.output = (torch.kron(getattr(rows, name), getattr(cols, name))
                                                for name in ("bt", "g", "at"))


# Lavin & Gray's matrices: F(2, 3) on points 0, 1, -1 (and infinity); F(4, 3) on 0, 1, -1,
# 2, -2. F(4, 3) on 0, +-1/2, +-3/2 (Toom-Cook's construction) rounds less: its transforms
# scale by at most 27/8 and 16/9 where the other's reach 8 and 5.
F2_1D = Transform1D(2, ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
                    ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
                    ((1, 1, 1, 0), (0, 1, -1, -1)))
F4_1D = Transform1D(4, ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
                    ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                     (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
                    ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)))
F4_HALVES_1D = Transform1D(
    4, ((9 / 16, 0, -5 / 2, 0, 1, 0), (0, -9 / 8, -9 / 4, 1 / 2, 1, 0), (0, 9 / 8, -9 / 4, -1 / 2, 1, 0),
        (0, -3 / 8, -1 / 4, 3 / 2, 1, 0), (0, 3 / 8, -1 / 4, -3 / 2, 1, 0), (0, 9 / 16, 0, -5 / 2, 0, 1)),
    ((16 / 9, 0, 0), (-1, -1 / 2, -1 / 4), (-1, 1 / 2, -1 / 4), (1 / 9, 1 / 6, 1 / 4), (1 / 9, -1 / 6, 1 / 4), (0, 0, 1)),
    ((1, 1, 1, 1, 1, 0), (0, 1 / 2, -1 / 2, 3 / 2, -3 / 2, 0), (0, 1 / 4, 1 / 4, 9 / 4, 9 / 4, 0),
     (0, 1 / 8, -1 / 8, 27 / 8, -27 / 8, 1)))
F2 = Transforms(F2_1D, F2_1D)
F4 = Transforms(F4_1D, F4_1D)
F2X4 = Transforms(F2_1D, F4_HALVES_1D)
TRANSFORMS = {torch.float32: F4, torch.bfloat16: F2}


def transforms_for(x: Tensor) -> Transforms:
    """The transform for a layer over ``x``: :data:`TRANSFORMS` of its dtype, but F(2x2, 3x3)
    for float32 under :data:`MIN_PIXELS` (only inside :func:`filter_workspace` do such layers
    run): its filter is 16/9 of the weight where F4's is 4x, and a 1280-channel layer over
    2x8x8 took 0.80x the direct time with F2, 1.6x with F4, transforms included. bfloat16
    with its filters kept: :func:`kept_transforms`."""
    n, _, h, w = x.shape
    if x.dtype == torch.bfloat16 and keeping():
        return kept_transforms(n * h * w)
    return F2 if x.dtype == torch.float32 and n * h * w < MIN_PIXELS[torch.float32] else TRANSFORMS[x.dtype]


def kept_transforms(pixels: int) -> Transforms:
    """The transform of a bfloat16 layer whose filters are kept (:func:`filter_workspace`'s
    ``keep``) over ``pixels`` (batch x height x width): F(2x4, 3x3) from
    :data:`MIN_PIXELS_WIDE` (unless :func:`set_wide_tiles` says "off"), else F(2x2, 3x3)."""
    return F2X4 if pixels >= MIN_PIXELS_WIDE and WIDE_SWITCH.mode != "off" else F2


def keeping() -> bool:
    """Whether bfloat16 filters are kept here (inside ``filter_workspace(keep=True)``, kept
    filters not switched off)."""
    return _KEPT.get() is not None and KEEP_SWITCH.mode != "off"


def set_winograd(mode: str) -> str:
    """``"auto"`` (default: where :func:`use_winograd` says), ``"on"`` (every eligible
    CPU convolution, whatever the CPU and size) or ``"off"``; returns the mode it replaces."""
    return SWITCH.set(mode)


def set_kept_filters(mode: str) -> str:
    """``"auto"`` / ``"on"`` (default; the same: filters kept where :func:`filter_workspace`
    is asked to) or ``"off"`` (made on every call); returns the mode it replaces."""
    return KEEP_SWITCH.set(mode)


def set_wide_tiles(mode: str) -> str:
    """``"auto"`` / ``"on"`` (default; the same: F(2x4, 3x3) where bfloat16 filters are kept
    and the layer has :data:`MIN_PIXELS_WIDE`) or ``"off"`` (F(2x2, 3x3) there too: less
    rounding, see the module docs); returns the mode it replaces."""
    return WIDE_SWITCH.set(mode)


def cpu_suits_winograd(dtype: torch.dtype) -> bool:
    """float32 on any CPU; bfloat16 where it is native (AVX512-BF16) without AMX tiles,
    whose convolutions are expected to leave the memory-bound transforms nothing to win."""
    if dtype == torch.float32:
        return True
    flags = cpu_flags()
    return dtype == torch.bfloat16 and "avx512_bf16" in flags and "amx_bf16" not in flags


def eligible(conv: nn.Conv2d) -> bool:
    """Whether the layer is a plain 3x3 convolution that keeps the input's size."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def runnable(switch: Switch, conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether a CPU convolution fast path set by ``switch`` can run ``conv`` on ``x`` at
    all: not switched off, an :func:`eligible` layer, a 4-D CPU tensor in float32 or
    bfloat16 (the weight's dtype) and no gradients wanted (training runs the direct
    convolution, as diffusers), and not inside ``torch.compile``, which picks its own
    convolution kernels (and whose graph these paths' per-layer choices would break)."""
    return (switch.allows() and x.device.type == "cpu" and x.dim() == 4 and eligible(conv)
            and no_grad_wanted(x, conv.weight)
            and x.dtype in (torch.float32, torch.bfloat16) and conv.weight.dtype == x.dtype)


def use_winograd(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv`` applied to ``x`` runs as Winograd here (see the module docs)."""
    if not runnable(SWITCH, conv, x):
        return False
    if SWITCH.mode == "on":
        return True
    n, _, h, w = x.shape
    workspace = _WORKSPACE.get() is not None
    return (size_suits_winograd(n * h * w, conv.in_channels, conv.out_channels, x.dtype, workspace, keeping())
            and cpu_suits_winograd(x.dtype))


def size_suits_winograd(pixels: int, c_in: int, c_out: int, dtype: torch.dtype, workspace: bool,
                        kept: bool = False) -> bool:
    """Whether a layer from ``c_in`` to ``c_out`` channels over ``pixels`` (batch x height x
    width) pays as Winograd in ``dtype`` (float32 or bfloat16), inside
    :func:`filter_workspace` or not, with bfloat16 filters ``kept`` or not (see
    :data:`MIN_PIXELS` and what follows)."""
    channels = min(c_in, c_out)
    if channels < MIN_CHANNELS[dtype]:
        return False
    if pixels >= MIN_PIXELS[dtype]:
        return True
    if not workspace or channels < MIN_CHANNELS_WORKSPACE:
        return False
    if pixels >= MIN_PIXELS_WORKSPACE[dtype]:
        return True
    return kept and dtype == torch.bfloat16 and c_in >= MIN_IN_CHANNELS_KEPT and pixels >= MIN_PIXELS_KEPT


@contextlib.contextmanager
def filter_workspace(keep: bool = False) -> Iterator[None]:
    """Within this context, the filters Winograd transforms on each call are written into
    one buffer, kept and grown to the largest, instead of a fresh allocation each time. A
    1280-channel filter is 52 MB in bfloat16, over glibc's 32 MB limit for reusing freed
    memory, so each fresh one is new pages of the OS, whose first touch cost two thirds of
    the transform: 35 -> 11 ms (bfloat16 F2), 144 -> 48 ms (float32 F4), one thread of an
    AMD EPYC. Then Winograd pays over fewer pixels with many channels
    (:data:`MIN_PIXELS_WORKSPACE`, :data:`MIN_CHANNELS_WORKSPACE`): SD1.5's 16x16 and 8x8
    levels. The buffer holds the largest filter transformed (at 512 px in SD1.5: 105 MB in
    bfloat16, 210 MB in float32) until the context ends. The memory runner enters it around
    each phase; nested uses share the outermost one's buffer (and its ``keep``).

    ``keep``: bfloat16 filters (:func:`kept_transforms`: F(2x4, 3x3), 24/9 of the weight,
    or F(2x2, 3x3), 16/9) are kept, one per weight and transform, until the context ends,
    and a layer called again reuses its own: a denoising loop transforms each filter once.
    A weight changed in place (a LoRA merged, its version counter moves; a change through
    ``.data`` moves none, so ldm makes none) or replaced is transformed again. With filters
    kept, the widest layers run as Winograd over fewer pixels too (:data:`MIN_IN_CHANNELS_KEPT`).
    Kept filters are fresh memory (1,622 MiB for SD1.5 at 512 px), made on the first step:
    see :data:`KEEP_MIN_STEPS`."""
    if _WORKSPACE.get() is not None:
        yield
        return
    token, kept = _WORKSPACE.set({}), _KEPT.set({} if keep else None)
    try:
        yield
    finally:
        _KEPT.reset(kept)
        _WORKSPACE.reset(token)


def layer_filters(weight: Tensor, tf: Transforms) -> Tensor:
    """:func:`transform_filter` of ``weight`` for a layer's call: the one kept from an earlier
    call inside ``filter_workspace(keep=True)`` where the weight is unchanged, else made (in
    the workspace's buffer, or kept)."""
    kept = _KEPT.get()
    if not keeping() or weight.dtype != torch.bfloat16:
        return transform_filter(weight, tf, scratch=True)
    key = (id(weight), tf.m)  # a layer may run F2 at batch 1 and F(2x4) at batch 2
    entry = kept.get(key)
    # The entry holds the memory its filters came from (so no other tensor can be there
    # while it lives, whatever object id() now names) and that memory's version counter then
    # (an inference tensor has none; it changes only inside inference mode, where ldm
    # changes no weights).
    version = -1 if weight.is_inference() else weight._version
    if entry is not None and entry[0].data_ptr() == weight.data_ptr() and entry[1] == version:
        return entry[2]
    kept.pop(key, None)  # a changed weight's old filters go first
    filters = transform_filter(weight, tf)
    kept[key] = (weight.detach(), version, filters)
    return filters


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """``numel`` values of the workspace's buffer (valid until the next call), or None
    outside :func:`filter_workspace`."""
    buffers = _WORKSPACE.get()
    if buffers is None:
        return None
    key = (dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # the smaller one goes before the larger is made
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def filter_products(weight: Tensor, matrix: Tensor, scratch: bool = False) -> Tensor:
    """``matrix`` [rows, 9] times every flattened [C_out, C_in, 3, 3] filter, as a
    contiguous [rows, C_out, C_in] in the weight's dtype, rounded once, with float32
    accumulation: one GEMM over the weight as it lies (contiguous, or copied so once) where
    the matrix's entries are exact in the weight's dtype (F2's halves and quarters in
    bfloat16) or that is float32; else (F(4, 3)'s ninths in bfloat16) in float32, a block of
    :data:`FILTER_BLOCK` weights at a time, written into the result as it goes. A float32
    copy and a permuted copy of the whole weight made a 1280-channel bfloat16 Winograd
    filter take 170 ms against 35-40 ms. ``scratch``: in :func:`filter_workspace`'s buffer
    where there is one, valid until the next such call."""
    c_out, c_in = weight.shape[:2]
    rows = matrix.shape[0]
    out = _scratch(rows * c_out * c_in, weight.dtype, weight.device) if scratch else None
    if out is None:
        out = torch.empty(rows * c_out * c_in, dtype=weight.dtype, device=weight.device)
    out = out.view(rows, c_out, c_in)
    weight = weight.detach()
    if weight.dtype == torch.float32 or matrix.to(weight.dtype).double().equal(matrix.double()):
        g = weight.contiguous().reshape(c_out * c_in, 9)
        torch.mm(matrix.to(weight), g.t(), out=out.view(rows, c_out * c_in))
        return out
    m = matrix.to(weight.device, torch.float32)
    step = max(1, FILTER_BLOCK // c_in)
    for start in range(0, c_out, step):
        g = weight[start:start + step].reshape(-1, 9).float()  # copies this block only
        out[:, start:start + step] = (m @ g.t()).view(rows, -1, c_in)
    return out


def transform_filter(weight: Tensor, tf: Transforms, scratch: bool = False) -> Tensor:
    """``G g G^T`` of every [C_out, C_in, 3, 3] filter, as [positions, C_in, C_out] in the
    weight's dtype: the transpose of :func:`filter_products`' contiguous result, which
    the GEMMs read as it is."""
    return filter_products(weight, tf.filter, scratch).transpose(1, 2)


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, tf: Transforms) -> Tensor:
    """A 3x3 convolution, stride 1, zero padding 1, of ``x`` [N, C_in, H, W] by ``weight``
    [C_out, C_in, 3, 3]; the output has the input's memory format.

    Beyond the output it holds one chunk's padded input rows, transformed tiles and products
    (about ``TILES_PER_CHUNK x positions x (C_in + C_out)`` values), never a padded copy of
    the whole input."""
    n, c_in, h, w = x.shape
    (mh, mw), (ah, aw) = tf.m, tf.alpha
    filters = layer_filters(weight, tf)
    c_out = filters.shape[2]
    rows, cols = -(-h // mh), -(-w // mw)
    to_input = tf.input.to(device=x.device, dtype=x.dtype)
    to_output = tf.output.to(device=x.device, dtype=x.dtype)
    out = torch.empty((n, c_out, h, w), dtype=x.dtype, device=x.device,
                      memory_format=memory_format_of(x)).permute(0, 2, 3, 1)
    nhwc = x.permute(0, 2, 3, 1)
    chunk = max(1, TILES_PER_CHUNK // cols)
    row_stride = (cols * mw + 2) * c_in
    aligned = w % mw == 0
    for i in range(n):
        for r0 in range(0, rows, chunk):
            r = min(chunk, rows - r0)
            tiles = r * cols
            top, bottom = r0 * mh - 1, (r0 + r) * mh + 1  # input rows this chunk reads
            # Its rows, zero-padded at the image's edges and to whole tiles: [r*mh+2, cols*mw+2, C_in].
            slab = F.pad(nhwc[i, max(top, 0):min(bottom, h)],
                         (0, 0, 1, 1 + cols * mw - w, max(-top, 0), max(bottom - h, 0))).contiguous()
            # [ah, aw, r, cols, C_in]: the overlapping input tiles (strides mh and mw), a view.
            view = slab.as_strided((ah, aw, r, cols, c_in), (row_stride, c_in, mh * row_stride, mw * c_in, 1))
            v = (to_input @ view.reshape(ah * aw, tiles * c_in)).view(ah * aw, tiles, c_in)
            products = torch.bmm(v, filters)
            y = (to_output @ products.view(ah * aw, tiles * c_out)).view(mh, mw, r, cols, c_out)
            if bias is not None:
                y += bias  # here, while the chunk is in cache
            y = y.permute(2, 0, 3, 1, 4)  # [r, mh, cols, mw, C_out]
            valid = min(r * mh, h - r0 * mh)
            target = out[i, r0 * mh:r0 * mh + valid]
            if aligned and valid == r * mh:
                target.view(r, mh, cols, mw, c_out).copy_(y)
            else:  # partial tiles at the right or bottom edge
                target.copy_(y.reshape(r * mh, cols * mw, c_out)[:valid, :w])
    return out.permute(0, 3, 1, 2)


def conv_forward(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv`` applied to ``x``: as Winograd where :func:`use_winograd` says, else as
    ``nn.Conv2d`` computes it; its module hooks do not run (the seamless VAE calls layers
    this way, region by region)."""
    if use_winograd(conv, x):
        return winograd_conv2d(x, conv.weight, conv.bias, transforms_for(x))
    return conv._conv_forward(x, conv.weight, conv.bias)


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) that runs as Winograd where
    :func:`use_winograd` says."""

    def forward(self, x: Tensor) -> Tensor:
        return conv_forward(self, x)
