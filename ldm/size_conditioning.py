"""SDXL's micro-conditioning: the size, crop and aesthetic ids its U-Net reads.

SDXL was trained on pictures of many sizes, cropped at random, and told of both
(Podell et al. 2023, section 2.2): the U-Net's ``text_time`` embedding takes the
picture's original size, the crop's top-left corner and the size it is asked to draw,
``(h, w, top, left, h, w)``, each id through a 256-wide sinusoidal embedding. Asking
for a large original size and a (0, 0) crop is asking for a whole, sharp picture; the
defaults are the output size and (0, 0), as diffusers and the web UI use. The refiner
takes an aesthetic score in place of the target size, ``(h, w, top, left, score)``:
6.0 for the prompt and 2.5 for the negative prompt by default (diffusers' and the web
UI's values), so guidance also pushes towards "more aesthetic".
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .conditioning import Conditioning, ScheduledConditioning
from .config import ModelConfig

logger = logging.getLogger("ldm")

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
# Outside this range of the native area (1024 x 1024 for SDXL) the model draws sizes it
# was hardly trained on: warned, not refused (users do ask for them on purpose).
AREA_RANGE = (0.5, 2.0)
_SCORE_ARGS = ("aesthetic_score", "negative_aesthetic_score")

Cond = Conditioning | ScheduledConditioning


def _pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)):
        what = "(height, width) in pixels, each >= 1" if minimum else "(top, left) in pixels, each >= 0"
        raise ValueError(f"{name} must be two whole numbers {what}, got {value!r}")
    return int(value[0]), int(value[1])


def _score(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number such as 6.0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SizeConditioning:
    """The ids of one call (the same for every image of it)."""

    kind: str  # ModelConfig.size_conditioning: "size" or "aesthetic"
    original_size: tuple[int, int]
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int] | None  # "size" only
    aesthetic_score: float | None  # "aesthetic" only
    negative_aesthetic_score: float | None

    @classmethod
    def build(cls, config: ModelConfig, height: int, width: int, *, original_size: Any = None,
              crops_coords_top_left: Any = None, target_size: Any = None, aesthetic_score: Any = None,
              negative_aesthetic_score: Any = None) -> "SizeConditioning | None":
        """The call's ids for a model of ``config`` drawing ``height`` x ``width``; None for
        a model without size conditioning. Arguments that the model does not read are
        refused, naming the model kind."""
        given = {name: value for name, value in (
            ("original_size", original_size), ("crops_coords_top_left", crops_coords_top_left),
            ("target_size", target_size), ("aesthetic_score", aesthetic_score),
            ("negative_aesthetic_score", negative_aesthetic_score)) if value is not None}
        kind = config.size_conditioning
        unread = [n for n in given if kind is None or (kind == "size" and n in _SCORE_ARGS)
                  or (kind == "aesthetic" and n == "target_size")]
        if unread:
            reads = {None: "no size conditioning (only SDXL models have it)",
                     "size": "size conditioning (the aesthetic scores are the SDXL refiner's)",
                     "aesthetic": "the SDXL refiner's conditioning: original size, crop and aesthetic scores"}[kind]
            raise ValueError(f"{', '.join(unread)}: this {config.family} model reads {reads}")
        if kind is None:
            return None
        native = config.default_size
        area = height * width / native**2
        if not AREA_RANGE[0] <= area <= AREA_RANGE[1]:
            logger.warning("%dx%d is %.2fx the area SDXL was trained at (%dx%d); expect poorer pictures "
                           "(sizes near %d pixels in all, such as 1152x896, suit it)", width, height, area,
                           native, native, native * native)
        out = (height, width)
        aesthetic = kind == "aesthetic"
        return cls(
            kind,
            _pair(original_size, "original_size", 1) if original_size is not None else out,
            _pair(crops_coords_top_left, "crops_coords_top_left", 0) if crops_coords_top_left is not None else (0, 0),
            None if aesthetic else (_pair(target_size, "target_size", 1) if target_size is not None else out),
            (_score(aesthetic_score, "aesthetic_score") if aesthetic_score is not None else AESTHETIC_SCORE)
            if aesthetic else None,
            (_score(negative_aesthetic_score, "negative_aesthetic_score") if negative_aesthetic_score is not None
             else NEGATIVE_AESTHETIC_SCORE) if aesthetic else None,
        )

    def ids(self, negative: bool = False) -> list[float]:
        """diffusers' ``add_time_ids`` (``negative``: the negative prompt's)."""
        last = ((self.negative_aesthetic_score if negative else self.aesthetic_score),) if self.kind == "aesthetic" \
            else self.target_size
        return [float(v) for v in (*self.original_size, *self.crops_coords_top_left, *last)]

    def attach(self, cond: Cond, uncond: Cond | None) -> tuple[Cond, Cond | None]:
        """``cond`` and ``uncond`` with their ``time_ids``, one row per image."""
        def rows(c: Cond, negative: bool) -> Cond:
            ids = torch.tensor([self.ids(negative)], dtype=torch.float32).repeat(c.batch_size, 1)
            return c.replace(time_ids=ids)

        return rows(cond, False), (rows(uncond, True) if uncond is not None else None)

    def params(self) -> dict[str, Any]:
        """The settings, for a Generation's params (what the model reads, nothing else)."""
        return {k: v for k, v in asdict(self).items() if k != "kind" and v is not None}
