"""The one table of dtype names that ldm accepts (API, CLI, YAML, convert), and the
dtype a model runs in when none is asked for (:func:`default_dtype`).

Torch-free at import so that building the command line stays cheap.

The default on CPU is the faster of float32 and bfloat16 on this machine, never an
emulated path: bfloat16 only where the CPU computes it natively (oneDNN's AVX512-BF16 or
AMX kernels; elsewhere it is emulated, ~140x slower) *and* a once-per-process probe
measures it at least :data:`BF16_MIN_SPEEDUP` times faster than float32. Native is not
enough: on an AVX512-BF16 Xeon without AMX, oneDNN's bfloat16 kernels ran at 82 GFLOP/s
against float32's ~120, and a full-size SD1.5 U-Net step was 1.35x slower in bfloat16.
``LDM_CPU_DTYPE`` (``float32``, ``bfloat16`` or ``auto``) overrides the rule; an explicit
``dtype=`` always wins over both.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("ldm")

# Canonical name -> accepted aliases (the names people type: fp16, half, bf16 ...).
DTYPE_ALIASES: dict[str, tuple[str, ...]] = {
    "float32": ("fp32", "float"),
    "float16": ("fp16", "half"),
    "bfloat16": ("bf16",),
}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPE_ALIASES)
_CANONICAL = {alias: name for name, aliases in DTYPE_ALIASES.items() for alias in (name, *aliases)}


def canonical_dtype_name(name: str) -> str:
    """``"fp16"`` -> ``"float16"``; ValueError naming the valid names otherwise."""
    if not isinstance(name, str) or name not in _CANONICAL:
        raise ValueError(f"dtype {name!r} is not valid; valid values: {', '.join(sorted(_CANONICAL))}")
    return _CANONICAL[name]


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name PNG text, manifests and messages use."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: Any) -> Any:
    """A ``torch.dtype`` from a name or a dtype (floating dtypes of the table only); None stays None."""
    import torch

    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype {dtype} is not valid; valid values: {', '.join(DTYPE_NAMES)}")
        return dtype
    return getattr(torch, canonical_dtype_name(dtype))


CPU_DTYPE_ENV = "LDM_CPU_DTYPE"
CPU_DTYPE_CHOICES = ("auto", "float32", "bfloat16")
# bfloat16 keeps ~3 significant digits: it must buy a clear speed-up, above the run-to-run
# noise of a few-millisecond probe, before it replaces float32 (AMX gives several times).
BF16_MIN_SPEEDUP = 1.25


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (CPUs: AVX512-BF16 or AMX, as oneDNN
    reports; elsewhere it is emulated, about 100x slower than float32 on CPU)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def runs_natively(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes ``dtype`` in hardware: float32 everywhere, bfloat16 as
    :func:`native_bf16` says, float16 on GPUs (a CPU's float16 is not one ldm offers as fast)."""
    import torch

    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return native_bf16(device)
    return dtype == torch.float16 and device.type in ("cuda", "mps")


def dtype_to_remake(recorded: str, device: torch.device, source: Any) -> torch.dtype | None:
    """The dtype to make a picture again in, given the one it was made in (``recorded``, a
    canonical name): that one where ``device`` runs it natively, so that the picture is the
    same; otherwise None (the device's default) with a warning that says so, since an
    emulated dtype would be many times slower. ``source`` names the picture in messages."""
    dtype, default = parse_dtype(recorded), default_dtype(device)
    if runs_natively(device, dtype):
        if dtype != default:
            logger.info("%s was made in %s: making it again in %s (--dtype to choose another)", source, recorded,
                        recorded)
        return dtype
    fallback = dtype_name(default)
    logger.warning("%s was made in %s, which this %s does not compute natively: making it in %s instead, so the "
                   "picture will differ slightly (--dtype %s forces it, many times slower)", source, recorded,
                   device.type, fallback, recorded)
    return None


def warn_emulated(device: torch.device, dtype: torch.dtype) -> None:
    """A warning for bfloat16 asked on a CPU that only emulates it."""
    import torch

    if dtype == torch.bfloat16 and device.type == "cpu" and not native_bf16(device):
        logger.warning("bfloat16 on this CPU is emulated (no AVX512-BF16 / AMX): a 320-channel convolution ran "
                       "~140x slower than in float32 on such a CPU (0.20 s vs 28.7 s); use dtype float32")


def _best_seconds(fn: Any, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN builds its kernels and reorders weights on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def bf16_speedup() -> float:
    """How many times faster bfloat16 runs than float32 on this CPU, at this thread count:
    the geometric mean over a matmul and a 3x3 convolution shaped like a Stable Diffusion
    U-Net's first stage (320 channels, a 32x32 tile of tokens), best of three runs each.

    Measured once per process (~80 ms on one busy core; cached): the capability flags say
    whether bfloat16 is native, not whether its kernels beat float32's here. Call it only
    where :func:`native_bf16` holds: emulated bfloat16 would take seconds."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 320, generator=gen), torch.randn(320, 320, generator=gen)
    x, w = torch.randn(1, 64, 32, 32, generator=gen), torch.randn(64, 64, 3, 3, generator=gen)
    ratios = []
    with torch.inference_mode():
        for op, args in ((torch.mm, (a, b)), (torch.nn.functional.conv2d, (x, w))):
            fp32 = _best_seconds(lambda: op(*args))
            low = [t.bfloat16() for t in args]
            ratios.append(fp32 / _best_seconds(lambda: op(*low)))
    return float((ratios[0] * ratios[1]) ** 0.5)


@functools.lru_cache(maxsize=1)
def _measured_cpu_dtype() -> torch.dtype:
    """The rule of the module docstring, decided and logged once per process."""
    import torch

    cpu = torch.device("cpu")
    if not native_bf16(cpu):
        logger.info("default dtype on CPU: float32 (bfloat16 is emulated on this CPU)")
        return torch.float32
    speedup = bf16_speedup()
    dtype = torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else torch.float32
    logger.info("default dtype on CPU: %s (bfloat16 is native here and measured %.2fx float32's speed; "
                "bfloat16 needs >= %.2fx; pass dtype= or set %s to choose)", dtype_name(dtype),
                speedup, BF16_MIN_SPEEDUP, CPU_DTYPE_ENV)
    return dtype


def cpu_dtype_override() -> str | None:
    """``$LDM_CPU_DTYPE`` as a canonical name, None when unset, empty or ``auto``;
    ValueError naming the variable and its valid values otherwise."""
    value = os.environ.get(CPU_DTYPE_ENV, "").strip()
    if value in ("", "auto"):
        return None
    name = _CANONICAL.get(value)
    if name not in CPU_DTYPE_CHOICES:
        raise ValueError(f"{CPU_DTYPE_ENV}={value!r} is not valid; valid values: {', '.join(CPU_DTYPE_CHOICES)} "
                         "(or the aliases fp32, float, bf16)")
    return name


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model runs in on ``device`` when none is asked for: float16 on CUDA
    (half precision is the norm on GPUs), on CPU the faster of float32 and bfloat16 as the
    module docstring says (``$LDM_CPU_DTYPE`` overrides), float32 elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.float16
    if device.type != "cpu":
        return torch.float32
    override = cpu_dtype_override()
    return getattr(torch, override) if override is not None else _measured_cpu_dtype()
