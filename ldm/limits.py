"""Memory planning: estimate what a call needs before anything is allocated.

The estimates count the activations that dominate each phase, in elements times
bytes per element, and deliberately err low (they leave out allocator slack), so
that a refusal always means "this cannot fit", never "this might not":

- U-Net, per batch row: every skip connection kept for the up path
  (``channels x pixels`` of each resnet output and downsampler, per level) plus
  about twenty working tensors at the widest level (resnet intermediates, the
  attention's q/k/v and output, GEGLU's 8x-wide feed-forward input). Attention runs
  through torch SDPA, whose CPU and CUDA kernels do not keep the full score matrix.
- VAE decode, one image at a time (the pipeline decodes them one by one): about three
  tensors of ``channels x pixels`` at every decoder level, the full-resolution
  level dominating.

Measured on the CPU (``scripts/measure_memory.py``: peak RSS growth, shipped toy model,
fp32, two runs): the U-Net pass of one guided image grew 57-62 MiB at 512 px (estimate
47) and 223-322 MiB at 1024 px (estimate 188); its decode 216-256 MiB (estimate 159) and
744-800 MiB (estimate 636).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import ModelConfig

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


def plan_batch(config: ModelConfig, count: int, height: int, width: int, *, dtype_bytes: int,
               guided: bool, device: Any, available: int | None = None) -> int:
    """How many images one U-Net call may take (``count`` when all fit).

    Raises :class:`MemoryLimitError` when a single image does not fit.
    """
    available = available_bytes(device) if available is None else available
    rows = 2 if guided else 1
    per_image = rows * unet_bytes_per_row(config, height, width, dtype_bytes)
    decode = decode_bytes(config, height, width, dtype_bytes)
    if available is None:
        return count
    need = max(per_image, decode)
    if need > available:
        phase = "decoding it" if decode >= per_image else "the U-Net"
        raise MemoryLimitError(
            f"a {width}x{height} image needs at least {_gib(need)} for {phase} "
            f"({'with' if guided else 'without'} guidance), but only {_gib(available)} is free on "
            f"{device}; use a smaller size"
        )
    fit = max(1, min(count, available // per_image))
    if fit < count:
        logger.warning("%d images of %dx%d need %s at once, %s is free: running the U-Net %d at a time",
                       count, width, height, _gib(count * per_image), _gib(available), fit)
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
