"""Module-wide "auto" / "on" / "off" settings of the CPU fast paths, for comparisons
(``scripts/bench.py``, ``scripts/eval_toy.py``) and for turning one off, and the tests each
of them makes first: that it is not inside ``torch.compile`` (:meth:`Switch.allows`) and
that no gradient is wanted (they have no backward, or overwrite)."""

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

    def allows(self) -> bool:
        """Whether the path may run at all: not switched off, and not inside ``torch.compile``,
        where its per-call choices (data-dependent checks, CPU flags, its own kernels) would
        break the graph; the compiled model is the plain one and inductor picks the kernels.
        Tested first, before anything dynamo would have to trace."""
        return self.mode != "off" and not torch.compiler.is_compiling()


def no_grad_wanted(*tensors: Tensor) -> bool:
    """Whether nothing records gradients through ``tensors`` (a fast path without a backward
    may run, a fresh intermediate may be overwritten)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
