"""The opt-in speed-ups that trade a little of the picture for time, as one value that
travels from the command line and batch files to ``Pipeline.generate`` and the PNG text.

``guidance_end`` (a fraction in (0, 1]; 1: off): classifier-free guidance only for that
fraction of the steps that run, the conditional pass alone after it
(:class:`ldm.denoisers.CFGDenoiser`). ``cache_interval`` (N >= 1; 1: off): the whole
U-Net on every N-th evaluation, its shallow branch on the kept deep features in between
(DeepCache, :mod:`ldm.models.feature_cache`). ``token_merging`` (a fraction in [0, 1); 0:
off): that fraction of the tokens merged around self-attention at the U-Net's highest
resolution (:mod:`ldm.models.token_merging`). All are off by default; the README gives
their cost on the shipped model (``scripts/eval_speedups.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .samplers import first_step
from .validation import check_guidance_end, check_int, check_merge_ratio

# JSONL keys, flags (--guidance-end ...), generate's arguments
KEYS = ("guidance_end", "cache_interval", "token_merging")


@dataclass(frozen=True)
class Speedups:
    guidance_end: float = 1.0
    cache_interval: int = 1
    token_merging: float = 0.0

    def __post_init__(self) -> None:
        check_guidance_end(self.guidance_end)
        check_int(self.cache_interval, "cache_interval", 1)
        check_merge_ratio(self.token_merging)

    @classmethod
    def from_attributes(cls, source: Any) -> "Speedups":
        """The values ``source`` (parsed flags, a picture's parameters) sets; None: off."""
        return cls(**{k: v for k in KEYS if (v := getattr(source, k, None)) is not None})

    @classmethod
    def from_object(cls, obj: dict[str, Any], defaults: "Speedups") -> "Speedups":
        """A JSONL line's keys over ``defaults`` (the command line's)."""
        return cls(**{k: obj.get(k, getattr(defaults, k)) for k in KEYS})

    def kwargs(self) -> dict[str, Any]:
        """As ``Pipeline.generate``'s keyword arguments."""
        return {"guidance_end": self.guidance_end, "cache_interval": self.cache_interval,
                "token_merging": self.token_merging}

    def params(self) -> dict[str, Any]:
        """As :class:`~ldm.pngmeta.GenerationParams` fields: only those in use (None: off),
        so a picture made without them has the web UI's keys alone."""
        return {"guidance_end": self.guidance_end if self.guidance_end < 1 else None,
                "cache_interval": self.cache_interval if self.cache_interval > 1 else None,
                "token_merging": self.token_merging if self.token_merging > 0 else None}

    def check_call(self, guided: bool, steps: int, strength: float | None = None) -> None:
        """What ``Pipeline.generate`` refuses for a call of ``steps`` (an edit of
        ``strength`` runs fewer), ``guided``: classifier-free guidance runs."""
        run = steps - (first_step(steps, strength) if strength is not None else 0)
        check_guidance_end(self.guidance_end, guided, run)
