"""The one table of dtype names that ldm accepts (API, CLI, YAML, convert).

Torch-free at import so that building the command line stays cheap.
"""

from __future__ import annotations

from typing import Any

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
