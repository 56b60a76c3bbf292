"""What the CPU is and which instructions it has, as the kernel reports them (Linux's
/proc/cpuinfo; elsewhere unknown: no model name, no flags)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _field(name: str) -> str | None:
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC 9R14 ...``), else what :mod:`platform` says."""
    return _field("model name") or platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (``avx512_bf16``, ``amx_bf16`` ...); empty where unknown."""
    return frozenset((_field("flags") or "").split())
