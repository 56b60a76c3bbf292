"""Training checkpoints: written through :mod:`ldm.atomicio`, so a crash mid-write
leaves the previous checkpoint intact, never a truncated one; read back as data only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..atomicio import atomic_write


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, creating its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint written by :func:`save_checkpoint`, or None if there is none.

    ``weights_only=True``: a training checkpoint is data, never code.
    """
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
