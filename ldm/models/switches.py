"""Module-wide "auto" / "on" / "off" settings of the CPU fast paths, for comparisons
(``scripts/bench.py``, ``scripts/eval_toy.py``) and for turning one off, and the test each
of them makes first: that no gradient is wanted (they have no backward, or overwrite)."""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("auto", "on", "off")


class Switch:
    """One fast path's setting: ``"auto"`` (default: where it was measured to pay), ``"on"``
    (wherever it can run) or ``"off"``."""

    def __init__(self, name: str) -> None:
        self.name, self.mode = name, "auto"

    def set(self, mode: str) -> str:
        """Sets the mode; returns the one it replaces."""
        if mode not in MODES:
            raise ValueError(f"{self.name} mode must be one of {MODES}, got {mode!r:.80}")
        previous, self.mode = self.mode, mode
        return previous


def no_grad_wanted(*tensors: Tensor) -> bool:
    """Whether nothing records gradients through ``tensors`` (a fast path without a backward
    may run, a fresh intermediate may be overwritten)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
