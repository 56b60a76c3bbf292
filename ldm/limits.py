"""Memory planning: estimate what a call needs before anything is allocated.

The estimates count the activations that dominate each phase, in elements times
bytes per element, and deliberately err low (they leave out allocator slack), so
that a refusal always means "this cannot fit", never "this might not":

- U-Net, per batch row: every skip connection kept for the up path
  (``channels x pixels`` of each resnet output and downsampler, per level) plus
  about twenty working tensors at the widest level (resnet intermediates, the
  attention's q/k/v and output, GEGLU's 8x-wide feed-forward input). Attention runs
  through torch SDPA, whose CPU and CUDA kernels do not keep the full score matrix.
- The filter buffer of Winograd convolutions on the CPU (:func:`filter_workspace_bytes`,
  210 MB in float32 and 105 MB in bfloat16 at SD1.5's widths), and in bfloat16, at the
  levels before "sliced", the filters kept over a denoising loop (:func:`kept_filter_bytes`,
  1,472 MiB for SD1.5 at 512 px, mostly F(2x4) filters of 24 values per 9 weights).
- VAE decode, one image at a time (the pipeline decodes them one by one): about three
  tensors of ``channels x pixels`` at every decoder level, the full-resolution
  level dominating.

Measured on the CPU (``scripts/measure_memory.py``: peak RSS growth, shipped toy model,
fp32, two runs): the U-Net pass of one guided image grew 57-62 MiB at 512 px (estimate
47) and 223-322 MiB at 1024 px (estimate 188); its decode 216-256 MiB (estimate 159) and
744-800 MiB (estimate 636).

Memory levels (:func:`plan_memory`), from fastest to leanest, each keeping what the one
before it does except where it says: ``fast`` (the VAE and attention whole), ``seamless``
(the VAE layer by layer in tiles over the whole picture's activations, the same picture,
:mod:`ldm.seamless_vae`), ``tiled`` (instead, the VAE decodes and encodes tile by tile,
blended, :mod:`ldm.tiled_vae`), ``sliced`` (attention runs a chunk of
queries at a time, :func:`ldm.models.layers.chunked_sdpa`), ``offload`` (on an
accelerator: each model waits in CPU memory until its phase runs). At ``sliced`` and
``offload`` the VAE runs seamless where that fits the free memory, else in blended tiles
(the plan's :attr:`MemoryPlan.vae_mode`, one of :data:`VAE_MODES`, which a PNG records as
"VAE tiling"). On an accelerator a seamless VAE's activations may instead wait in CPU
memory, only a tile's work on the device (:attr:`MemoryPlan.vae_store`): where they do
not fit the device but fit there, rather than blended tiles. ``auto`` takes the first
level whose estimated peak, doubled, fits the free memory (the leanest when none does),
and says so in one log line.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from .config import ModelConfig

if TYPE_CHECKING:  # torch stays unimported until a plan is made (the CLI starts without it)
    from .tiled_vae import Tiling

logger = logging.getLogger("ldm")

_UNET_WORKING_TENSORS = 20
_DECODER_TENSORS_PER_LEVEL = 3
GIB = 1024**3


class MemoryLimitError(ValueError):
    """A request that cannot fit in the memory of its device; the message has the numbers."""


def unet_bytes_per_row(config: ModelConfig, height: int, width: int, dtype_bytes: int) -> int:
    """Activation bytes of one U-Net batch row at an image size of ``height`` x ``width``."""
    u = config.unet
    factor = config.vae.downsample_factor
    pixels = (height // factor) * (width // factor)
    levels = len(u.block_out_channels)
    skips = u.block_out_channels[0] * pixels  # conv_in's output
    for i, channels in enumerate(u.block_out_channels):
        per_level = u.layers_per_block + (1 if i < levels - 1 else 0)
        skips += channels * (pixels // 4**i) * per_level
    working = _UNET_WORKING_TENSORS * u.block_out_channels[0] * pixels
    return (skips + working) * dtype_bytes


def decode_bytes(config: ModelConfig, height: int, width: int, dtype_bytes: int) -> int:
    """Activation bytes of decoding one ``height`` x ``width`` image."""
    total = 0
    for j, channels in enumerate(config.vae.block_out_channels):
        total += _DECODER_TENSORS_PER_LEVEL * channels * (height * width // 4**j)
    return total * dtype_bytes


def available_bytes(device: Any) -> int | None:
    """Memory a new allocation can use on ``device``; None when it cannot be read."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        return _meminfo_available()
    return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _size(n: int) -> str:
    return _gib(n) if n >= GIB else f"{n / 2**20:.0f} MiB"


MEMORY_LEVELS = ("fast", "seamless", "tiled", "sliced", "offload")
MEMORY_CHOICES = ("auto", *MEMORY_LEVELS)
LEVEL_MEANING = {
    "fast": "VAE and attention whole",
    "seamless": "seamless tiled VAE",
    "tiled": "tiled VAE",
    "sliced": "sliced attention, seamless tiled VAE where it fits, else tiled",
    "offload": "sliced attention, seamless tiled VAE where it fits, else tiled, models offloaded to CPU "
               "between phases",
}
# How the VAE runs, from fastest to leanest (the words a PNG's "VAE tiling" records): whole,
# seamless (ldm.seamless_vae: the same picture, up to rounding) or blended tiles
# (ldm.tiled_vae: visibly another picture where tiles overlap).
VAE_MODES = ("none", "seamless", "blended")
# The mode of each level; None: seamless where it fits, else blended.
LEVEL_VAE_MODE = {"fast": "none", "seamless": "seamless", "tiled": "blended", "sliced": None, "offload": None}
# The level that runs the VAE in each mode and nothing leaner (``memory=`` to remake a picture).
MODE_LEVEL = {"none": "fast", "seamless": "seamless", "blended": "tiled"}
# Devices whose SDPA kernels (flash / memory-efficient) never hold the N x N score
# matrix: measured on this CPU, 16384 tokens grew the RSS by 8 MiB, not the 1 GiB of scores.
_FUSED_ATTENTION = ("cpu", "cuda")
# Queries per attention call at the "sliced" level, unless the budget asks for fewer.
ATTENTION_CHUNK = 1024
_MIN_ATTENTION_CHUNK = 64
PHASES = ("U-Net", "VAE")
# "auto" takes a level when twice its estimate fits: the estimates err low (measured
# growth was up to 1.7x them, see above), and on a CPU an allocation that overshoots
# is often not an error to retry but the kernel's OOM killer. Refusals use the bare
# estimate, so nothing that might fit is refused.
CHOICE_HEADROOM = 2


def check_memory(memory: Any, device: Any) -> str:
    """``memory`` (a level name or "auto"), checked against ``device``."""
    import torch

    if not isinstance(memory, str) or memory not in MEMORY_CHOICES:
        raise ValueError(f"memory must be one of {MEMORY_CHOICES}, got {memory!r}")
    if memory == "offload" and torch.device(device).type == "cpu":
        raise ValueError("memory='offload' moves models between an accelerator and the CPU; on cpu the leanest "
                         "level is 'sliced'")
    return memory


def device_levels(device: Any) -> tuple[str, ...]:
    """The levels that mean something on ``device`` (no offload from the CPU to itself)."""
    import torch

    return MEMORY_LEVELS[:-1] if torch.device(device).type == "cpu" else MEMORY_LEVELS


def _attention_scores(rows: int, heads: int, queries: int, keys: int, device: Any) -> int:
    """Elements of the score matrix an SDPA call holds (none for the fused kernels)."""
    import torch

    return 0 if torch.device(device).type in _FUSED_ATTENTION else rows * heads * queries * keys


def attention_chunk(config: ModelConfig, height: int, width: int, *, dtype_bytes: int, guided: bool,
                    budget: int | None) -> int:
    """Queries per attention call at the "sliced" level: :data:`ATTENTION_CHUNK`, or fewer
    (a power of two, at least 64) when the U-Net's widest self-attention would otherwise
    hold more than a quarter of ``budget`` bytes of scores."""
    tokens = _latent_pixels(config, height, width)
    rows = 2 if guided else 1
    chunk = ATTENTION_CHUNK
    if budget is not None:
        per_query = rows * max(config.unet.num_attention_heads) * tokens * dtype_bytes
        while chunk > _MIN_ATTENTION_CHUNK and chunk * per_query > budget // 4:
            chunk //= 2
    return chunk


def _latent_pixels(config: ModelConfig, height: int, width: int) -> int:
    factor = config.vae.downsample_factor
    return (height // factor) * (width // factor)


def check_vae_mode(mode: Any, name: str = "vae_tiling") -> str:
    """``mode``, one of :data:`VAE_MODES`."""
    if not isinstance(mode, str) or mode not in VAE_MODES:
        raise ValueError(f"{name} must be one of {VAE_MODES}, got {mode!r:.80}")
    return mode


def _level_modes(level: str) -> tuple[str, ...]:
    """The VAE modes ``level`` may run."""
    mode = LEVEL_VAE_MODE[level]
    return ("seamless", "blended") if mode is None else (mode,)


def _level_mode(level: str, mode: str | None) -> str:
    """``mode`` if ``level`` may run it (None: the level's leanest), else ValueError."""
    modes = _level_modes(level)
    if mode is None:
        return modes[-1]
    if mode not in modes:
        raise ValueError(f"memory level {level!r} runs the VAE {' or '.join(modes)}, not {mode!r}")
    return mode


def level_needs(config: ModelConfig, height: int, width: int, *, dtype_bytes: int, guided: bool, device: Any,
                level: str, chunk: int = ATTENTION_CHUNK, resident: Mapping[str, int] | None = None,
                vae_mode: str | None = None, vae_store: str | None = None) -> dict[str, int]:
    """Estimated peak bytes on the device of each phase at ``level``: the U-Net's for one
    image (both guidance rows), the VAE's for one image. ``resident``: bytes of the weights
    on the device (``unet``, ``vae``, ``text``), which "offload" frees while another phase
    runs. ``vae_mode``: one the level may run (default: its leanest); ``vae_store="cpu"``: a
    seamless VAE's activations wait in CPU memory (:func:`seamless_host_bytes`)."""
    if level not in MEMORY_LEVELS:
        raise ValueError(f"memory level must be one of {MEMORY_LEVELS}, got {level!r}")
    vae_mode = _level_mode(level, vae_mode)
    _check_store(vae_store, vae_mode, device_levels(device))
    rank = MEMORY_LEVELS.index(level)
    rows = 2 if guided else 1
    u = config.unet
    pixels = _latent_pixels(config, height, width)
    queries = None if rank < MEMORY_LEVELS.index("sliced") else chunk
    scores = 0
    for i, kind in enumerate(u.down_block_types):
        if "CrossAttn" in kind or i == len(u.down_block_types) - 1:  # the mid block attends at the last level
            n = pixels // 4**i
            scores = max(scores, _attention_scores(rows, u.num_attention_heads[i], min(queries or n, n), n, device))
    unet = rows * unet_bytes_per_row(config, height, width, dtype_bytes) + scores * dtype_bytes
    unet += filter_workspace_bytes(config, dtype_bytes, device)
    if keeps_filters(level):
        unet += kept_filter_bytes(config, height, width, dtype_bytes=dtype_bytes, guided=guided, device=device)
    if vae_mode == "seamless":
        vae = _seamless_vae_bytes(config, height, width, dtype_bytes, device=device, stored=vae_store is None)
    else:
        vae = _vae_bytes(config, height, width, dtype_bytes, tiled=vae_mode == "blended", queries=queries,
                         device=device)
    if level == "offload" and resident:
        # While one phase runs the others' weights wait in CPU memory.
        unet -= resident.get("vae", 0) + resident.get("text", 0)
        vae -= resident.get("unet", 0) + resident.get("text", 0)
    return {"U-Net": max(unet, 0), "VAE": max(vae, 0)}


def filter_workspace_bytes(config: ModelConfig, dtype_bytes: int, device: Any) -> int:
    """The buffer Winograd convolutions transform their filters into during the U-Net's
    phase (:func:`ldm.models.winograd.filter_workspace`), on a CPU that runs them: the
    largest layer's filter (the up path's first, two of the deepest level's widths in, one
    out) in F(2x2, 3x3), 16 values per weight's 9; float32 layers over many pixels use F4,
    36 (so this errs low, as the estimates do). Float16 on the CPU is counted as bfloat16
    (it has no Winograd path: up to 105 MB high for SD1.5)."""
    import torch

    from .models.winograd import cpu_suits_winograd

    dtype = {4: torch.float32, 2: torch.bfloat16}.get(dtype_bytes)
    if torch.device(device).type != "cpu" or dtype is None or not cpu_suits_winograd(dtype):
        return 0
    widest = max(config.unet.block_out_channels)
    return 16 * 2 * widest * widest * dtype_bytes


def keeps_filters(level: str) -> bool:
    """Whether the U-Net's Winograd filters may be kept over a denoising loop at ``level``
    (:func:`ldm.models.winograd.filter_workspace`): where it runs whole, before "sliced"."""
    return MEMORY_LEVELS.index(level) < MEMORY_LEVELS.index("sliced")


def kept_filter_bytes(config: ModelConfig, height: int, width: int, *, dtype_bytes: int, guided: bool,
                      device: Any) -> int:
    """The Winograd filters a bfloat16 U-Net keeps over a denoising loop on a CPU that runs
    them (:func:`ldm.models.winograd.filter_workspace`): for each resnet's 3x3 convolution
    that runs as Winograd at this size with kept filters, its transform's products per 9
    weights (24 in F(2x4, 3x3), 16 in F(2x2, 3x3): :func:`~ldm.models.winograd.kept_transforms`).
    The upsamplers' and a ControlNet's are left out, so this errs low, as the estimates do:
    for SD1.5 at 512 px 1,472 MiB against 1,622 kept."""
    import torch

    from .models.winograd import cpu_suits_winograd, kept_transforms, size_suits_winograd

    if torch.device(device).type != "cpu" or dtype_bytes != 2 or not cpu_suits_winograd(torch.bfloat16):
        return 0
    factor, rows = config.vae.downsample_factor, 2 if guided else 1
    total = 0
    for level, c_in, c_out in _resnet_convs(config.unet):
        side = 2**level  # each level halves the latents, rounding up
        pixels = rows * -(-(height // factor) // side) * -(-(width // factor) // side)
        if size_suits_winograd(pixels, c_in, c_out, torch.bfloat16, workspace=True, kept=True):
            total += kept_transforms(pixels).positions * c_in * c_out * dtype_bytes
    return total


@functools.cache
def _resnet_convs(config: Any) -> tuple[tuple[int, int, int], ...]:
    """(level, channels in, channels out) of every resnet's two 3x3 convolutions in the
    U-Net of ``config``, read from one built on the meta device (no memory)."""
    import torch

    from .models.unet import UNet

    with torch.device("meta"):
        unet = UNet(config)
    last = len(unet.down_blocks) - 1
    blocks = [(i, b) for i, b in enumerate(unet.down_blocks)] + [(last, unet.mid_block)]
    blocks += [(last - i, b) for i, b in enumerate(unet.up_blocks)]
    return tuple((level, conv.in_channels, conv.out_channels) for level, block in blocks
                 for resnet in block.resnets for conv in (resnet.conv1, resnet.conv2))


def _vae_bytes(config: ModelConfig, height: int, width: int, dtype_bytes: int, *, tiled: bool,
               queries: int | None, device: Any) -> int:
    """One image through the decoder (the encoder mirrors it with fewer layers): whole,
    or one tile at a time into the full-size output and one row of tiles."""
    from .tiled_vae import Tiling

    factor = config.vae.downsample_factor
    side = Tiling.for_vae(config.vae).tile * factor
    out = 0
    if tiled and (height > side or width > side):
        out = config.vae.out_channels * (height + side) * width * dtype_bytes
        height, width = min(height, side), min(width, side)
    tokens = _latent_pixels(config, height, width)
    scores = _attention_scores(1, 1, min(queries or tokens, tokens), tokens, device)
    return decode_bytes(config, height, width, dtype_bytes) + out + scores * dtype_bytes


def _seamless_vae_bytes(config: ModelConfig, height: int, width: int, dtype_bytes: int, device: Any,
                        stored: bool = True) -> int:
    """One image through the decoder layer by layer (:mod:`ldm.seamless_vae`): at the
    costliest layer, its whole input and output activations (a resnet's input, middle and
    output; an upsampler's input and 4x output; none with ``stored=False``, where they wait
    in CPU memory) and one tile's work (the input region, its float32 normalised copy, the
    output), and the mid-block attention on the whole latent."""
    from .seamless_vae import TILE

    work = max(dtype_bytes, 4)
    peak = 0
    for before, channels, pixels, activations in _seamless_layers(config, height, width, dtype_bytes):
        tile = (2 * before + channels) * min(TILE**2, pixels) * work
        peak = max(peak, (activations if stored else 0) + tile)
    widths = config.vae.block_out_channels[::-1]
    tokens = _latent_pixels(config, height, width)
    attention = (3 * widths[0] * tokens + _attention_scores(1, 1, tokens, tokens, device)) * dtype_bytes
    return max(peak, attention)


def _seamless_layers(config: ModelConfig, height: int, width: int,
                     dtype_bytes: int) -> list[tuple[int, int, int, int]]:
    """The seamless decoder's levels, latent side first: (the previous level's channels,
    channels, pixels, bytes of the whole activations its costliest layer holds at once)."""
    widths = config.vae.block_out_channels[::-1]
    levels = len(widths)
    out, before = [], widths[0]
    for i, channels in enumerate(widths):
        pixels = height * width // 4 ** (levels - 1 - i)
        held = (before + 2 * channels) * pixels
        if i < levels - 1:
            held = max(held, channels * (pixels // 4 + pixels))
        out.append((before, channels, pixels, held * dtype_bytes))
        before = channels
    return out


def seamless_host_bytes(config: ModelConfig, height: int, width: int, dtype_bytes: int) -> int:
    """CPU memory a seamless VAE whose activations wait there (``vae_store="cpu"``) needs
    for one image: the costliest layer's whole activations."""
    return max(held for *_, held in _seamless_layers(config, height, width, dtype_bytes))


VAE_STORES = (None, "cpu")


def _check_store(store: Any, mode: str, levels: tuple[str, ...]) -> None:
    if store not in VAE_STORES:
        raise ValueError(f"vae_store must be one of {VAE_STORES}, got {store!r:.80}")
    if store is not None and (mode != "seamless" or "offload" not in levels):
        raise ValueError("vae_store='cpu' keeps a seamless VAE's activations in CPU memory while it computes on "
                         f"an accelerator; not for VAE tiling {mode!r}"
                         + ("" if "offload" in levels else " on the CPU"))


@dataclass(frozen=True)
class MemoryPlan:
    """How one call runs: its memory level, how its VAE runs, and the tiles and chunk the
    leaner levels use."""

    level: str
    tiling: Tiling
    chunk: int
    levels: tuple[str, ...]  # the levels of the device, fastest first
    reason: str
    vae_mode: str | None = None  # one of VAE_MODES; None: the level's leanest
    vae_store: str | None = None  # "cpu": a seamless VAE's activations wait in CPU memory

    def __post_init__(self) -> None:
        if self.level not in self.levels:
            raise ValueError(f"memory level must be one of {self.levels} here, got {self.level!r}")
        object.__setattr__(self, "vae_mode", _level_mode(self.level, self.vae_mode))
        _check_store(self.vae_store, self.vae_mode, self.levels)

    @property
    def label(self) -> str:
        """The level, what it means and the VAE's mode, for messages."""
        store = ", activations in CPU memory" if self.vae_store else ""
        return f"{self.level} ({LEVEL_MEANING[self.level]}; VAE tiling {self.vae_mode}{store})"

    @property
    def vae_seamless(self) -> bool:
        """Whether the VAE runs layer by layer in tiles (:mod:`ldm.seamless_vae`)."""
        return self.vae_mode == "seamless"

    @property
    def vae_tiling(self) -> Tiling | None:
        """The VAE's blended tiles, None where it runs whole or seamless."""
        return self.tiling if self.vae_mode == "blended" else None

    @property
    def attention_chunk(self) -> int | None:
        """Queries per attention call, None where attention runs whole."""
        return self.chunk if self._at_least("sliced") else None

    @property
    def offload(self) -> bool:
        """Whether models wait in CPU memory between phases."""
        return self._at_least("offload")

    def _at_least(self, level: str) -> bool:
        """Whether this plan is ``level`` or leaner (each level keeps the ones before it)."""
        return MEMORY_LEVELS.index(self.level) >= MEMORY_LEVELS.index(level)

    def at(self, level: str, reason: str) -> "MemoryPlan":
        """This plan at the leaner ``level``, its VAE in the least lean mode there that is
        no less lean than this one's (activations kept where they were)."""
        mode = next(m for m in _level_modes(level) if VAE_MODES.index(m) >= VAE_MODES.index(self.vae_mode))
        return replace(self, level=level, vae_mode=mode, reason=reason,
                       vae_store=self.vae_store if mode == "seamless" else None)

    def lower(self, reason: str) -> "MemoryPlan | None":
        """The next leaner plan (None after the last), for a retry after running out of
        memory: on an accelerator a seamless VAE first keeps its activations in CPU memory
        (the same picture); then the next level, its VAE never less lean than this one's;
        after the last level, a seamless VAE in blended tiles."""
        if self.vae_mode == "seamless" and self.vae_store is None and "offload" in self.levels:
            return replace(self, vae_store="cpu", reason=reason)
        rank = self.levels.index(self.level)
        if rank + 1 < len(self.levels):
            return self.at(self.levels[rank + 1], reason)
        if self.vae_mode == "seamless":
            return replace(self, vae_mode="blended", vae_store=None, reason=reason)
        return None


def plan_memory(config: ModelConfig, height: int, width: int, *, dtype_bytes: int, guided: bool, device: Any,
                memory: str = "auto", available: int | None = None,
                resident: Mapping[str, int] | None = None, vae_mode: str | None = None,
                host_available: int | None = None) -> MemoryPlan:
    """The memory level for one image of ``height`` x ``width``: ``memory`` when a level
    is named, else ("auto") the first level of :data:`MEMORY_LEVELS` whose estimated
    peak fits ``available`` (default: what :func:`available_bytes` reads) with
    :data:`CHOICE_HEADROOM`, else the leanest. At "sliced" and "offload" the VAE runs
    seamless when that fits, else in blended tiles. ``vae_mode`` (remaking a picture that
    recorded one): with "auto", the first level that fits running the VAE so; where none
    does, or ``memory`` names a level that runs it otherwise, a warning says the picture
    may differ. On an accelerator a seamless VAE whose activations do not fit the device
    keeps them in CPU memory where they fit there (``host_available``, default: the CPU's
    free memory), rather than giving up the seamless picture. One log line says which and
    why. Raises :class:`MemoryLimitError` (with the numbers) when even the leanest level
    cannot fit."""
    from .tiled_vae import Tiling

    memory = check_memory(memory, device)
    if vae_mode is not None:
        check_vae_mode(vae_mode)
    levels = device_levels(device)
    available = available_bytes(device) if available is None else available
    chunk = attention_chunk(config, height, width, dtype_bytes=dtype_bytes, guided=guided, budget=available)

    host_free = None
    if "offload" in levels:  # an accelerator: activations may wait in CPU memory
        host_free = available_bytes("cpu") if host_available is None else host_available

    def needs(level: str, mode: str | None = None, store: str | None = None) -> dict[str, int]:
        return level_needs(config, height, width, dtype_bytes=dtype_bytes, guided=guided, device=device,
                           level=level, chunk=chunk, resident=resident, vae_mode=mode, vae_store=store)

    def fits_as(level: str, mode: str | None, store: str | None) -> bool:
        return available is not None and CHOICE_HEADROOM * max(needs(level, mode, store).values()) <= available

    def store_of(level: str, mode: str | None) -> str | None:
        """Where a seamless VAE at ``level`` keeps its activations: on the device where they
        fit, else in CPU memory where they fit there (the offloaded weights wait there too)."""
        mode = _level_mode(level, mode)
        if mode != "seamless" or host_free is None or fits_as(level, mode, None):
            return None
        host = seamless_host_bytes(config, height, width, dtype_bytes)
        host += sum((resident or {}).values()) if level == "offload" else 0
        return "cpu" if CHOICE_HEADROOM * host <= host_free and fits_as(level, mode, "cpu") else None

    def fits(level: str, mode: str | None = None) -> bool:
        return fits_as(level, mode, store_of(level, mode))

    def run_of(level: str) -> tuple[str, str | None]:
        """How the VAE runs at ``level``: its mode and where its activations wait."""
        mode = mode_of(level)
        return mode, store_of(level, mode)

    if available is not None:
        _refuse_over(needs(levels[-1]), available, width, height, guided, device, levels[-1])
    kept = [lvl for lvl in levels if vae_mode in _level_modes(lvl) and fits(lvl, vae_mode)]
    # The recorded mode is kept where it fits, or where a level is asked for or nothing can be measured.
    keep = vae_mode if kept or memory != "auto" or available is None else None

    def mode_of(level: str) -> str:
        """The VAE mode ``level`` runs: the one to keep where it may, else the least lean that fits."""
        modes = _level_modes(level)
        return keep if keep in modes else next((m for m in modes if fits(level, m)), modes[-1])

    if memory != "auto":
        level, reason = memory, f"asked for (memory={memory!r})"
    elif available is None:
        level, reason = MODE_LEVEL[vae_mode or "none"], f"the free memory of {device} cannot be read"
    elif kept:
        level = kept[0]
        reason = f"the picture was made with VAE tiling {vae_mode!r}; {_size(available)} free on {device}"
    else:
        level = next((lvl for lvl in levels if fits(lvl, mode_of(lvl))), levels[-1])
        fast = needs("fast")
        phase = max(PHASES, key=lambda p: fast[p])
        reason = f"the {phase} of a {width}x{height} image needs ~{_size(fast[phase])} at 'fast'"
        if level != "fast":
            reason += f", ~{_size(max(needs(level, *run_of(level)).values()))} at {level!r}"
        reason += f"; {_size(available)} free on {device}"
    mode, store = run_of(level)
    if store is not None:
        reason += f" (the VAE's activations, ~{_size(seamless_host_bytes(config, height, width, dtype_bytes))}, " \
                  f"wait in CPU memory: {_size(host_free)} free there)"
    plan = MemoryPlan(level, Tiling.for_vae(config.vae), chunk, levels, reason, mode, store)
    logger.info("memory: %s: %s", plan.label, reason)
    if vae_mode is not None and mode != vae_mode:
        logger.warning("the picture was made with VAE tiling %r, this run uses %r (%s): it may differ %s", vae_mode,
                       mode, reason, "by rounding" if "blended" not in (mode, vae_mode) else "where tiles overlap")
    return plan


def _refuse_over(needs: Mapping[str, int], available: int, width: int, height: int, guided: bool, device: Any,
                 level: str) -> None:
    phase = max(PHASES, key=lambda p: needs[p])
    if needs[phase] > available:
        raise MemoryLimitError(
            f"a {width}x{height} image needs at least {_size(needs[phase])} for {phase} "
            f"({'with' if guided else 'without'} guidance) even at memory level {level!r} "
            f"({LEVEL_MEANING[level]}), but only {_size(available)} is free on {device}; use a smaller size"
        )


def plan_batch(config: ModelConfig, count: int, height: int, width: int, *, dtype_bytes: int,
               guided: bool, device: Any, available: int | None = None) -> int:
    """How many images one U-Net call may take (``count`` when all fit).

    Raises :class:`MemoryLimitError` when a single image does not fit even at the
    leanest memory level of ``device``.
    """
    available = available_bytes(device) if available is None else available
    if available is None:
        return count
    leanest = device_levels(device)[-1]
    needs = level_needs(config, height, width, dtype_bytes=dtype_bytes, guided=guided, device=device,
                        level=leanest)
    _refuse_over(needs, available, width, height, guided, device, leanest)
    shared = filter_workspace_bytes(config, dtype_bytes, device)  # one buffer for the whole call
    per_image = needs["U-Net"] - shared
    fit = max(1, min(count, (available - shared) // max(per_image, 1)))
    if fit < count:
        logger.warning("%d images of %dx%d need %s at once, %s is free: running the U-Net %d at a time",
                       count, width, height, _gib(shared + count * per_image), _gib(available), fit)
    return int(fit)


def check_native_size(config: ModelConfig, where: str, *, dtype_bytes: int, device: Any,
                      available: int | None = None) -> None:
    """Refuse, at load, a model whose native size alone cannot be generated on ``device``."""
    size = config.default_size
    try:
        plan_batch(config, 1, size, size, dtype_bytes=dtype_bytes, guided=True, device=device,
                   available=available)
    except MemoryLimitError as exc:
        raise MemoryLimitError(f"{where}: its config's native size {size}x{size} "
                               f"(unet.sample_size {config.unet.sample_size}) cannot run here: {exc}") from None
