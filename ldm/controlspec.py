"""A ControlNet asked for in text (``ldm generate --control``, a batch line's ``control``):
its model, hint file, preprocessor and settings, checked before any model loads.

- ``MODEL:HINT[:SCALE]`` (:func:`parse_control`): split from the right. A last field that
  reads as a number is the scale; the field before it is the hint image; everything before
  that is the model, so a model path may hold ``:`` (``/data/a:b/canny.safetensors:edges.png``)
  and a hint path may not (give such a file through a link). MODEL is a file or folder, else
  a ControlNet name found in the model search folders (:func:`ldm.modelref.find_controlnet`).
- ``NAME[:key=value,...]`` (:func:`parse_preprocess`): a preprocessor of
  :data:`ldm.control_preprocess.PREPROCESSORS` and its whole-number parameters, e.g.
  ``canny:low=50,high=150``. Shuffle's ``seed`` is not given: the hint of each image is drawn
  from that image's seed (so an image can be made again alone, from its own text).

The hint is made at the output size (:func:`make_hint`: the preprocessor's pixel-perfect
mode), so the same hint file, preprocessor and size give the same hint every time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEEDED = "seed"  # the parameter the image's seed fills (shuffle's)
BLANK_SIDE = 8  # the smallest picture a preprocessor takes
# ldm.control_preprocess (OpenCV) is imported where a hint is checked or made, not with the
# command line's modules.


@dataclass(frozen=True)
class ControlText:
    """``MODEL:HINT[:SCALE]`` split (None: no scale given)."""

    model: str
    hint: str
    scale: float | None = None


def check_scale(value: Any, name: str = "scale") -> float:
    """A ControlNet scale: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (1 is full strength), got {value!r}")
    return float(value)


def check_range(start: Any, end: Any, where: str = "control") -> tuple[float, float]:
    """``start`` / ``end`` fractions of the steps, 0 <= start < end <= 1."""
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{where} {name} must be a fraction of the steps from 0 to 1, got {value!r}")
    if start >= end:
        raise ValueError(f"{where} start ({start:g}) must be below its end ({end:g}): the ControlNet would act on "
                         "no step")
    return float(start), float(end)


def parse_control(text: str) -> ControlText:
    """``MODEL:HINT[:SCALE]`` (see the module docstring); ValueError says what is missing."""
    parts = text.split(":")
    scale = None
    if len(parts) >= 3:
        try:
            scale = float(parts[-1])
        except ValueError:
            pass
        else:
            parts.pop()
    if len(parts) < 2 or not parts[-1] or not ":".join(parts[:-1]):
        raise ValueError(f"expected MODEL:HINT.png[:SCALE], got {text!r}")
    return ControlText(":".join(parts[:-1]), parts[-1], None if scale is None else check_scale(scale))


def parse_preprocess(text: str) -> tuple[str, dict[str, int]]:
    """``NAME[:key=value,...]`` -> (name, parameters), checked (see :func:`check_preprocess`)."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        try:
            params[key.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise ValueError(f"expected NAME[:key=value,...] with whole-number values (e.g. canny:low=50,high=150), "
                             f"got {text!r}")
    return name, check_preprocess(name, params)


def check_preprocess(name: Any, params: dict[str, Any]) -> dict[str, int]:
    """The preprocessor's parameters with its defaults for those not given (shuffle's seed
    aside); ValueError for an unknown name, parameter or value, in the preprocessor's words."""
    from .control_preprocess import PREPROCESSORS, parameters, preprocess

    if not isinstance(name, str) or name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}; valid: {', '.join(PREPROCESSORS)}")
    if SEEDED in params and SEEDED in parameters(name):
        raise ValueError(f"{name}'s {SEEDED} is not given: each image's hint is drawn from the image's seed")
    preprocess(name, np.zeros((BLANK_SIDE, BLANK_SIDE, 3), np.float32), **params)  # its own checks
    full = {**parameters(name), **params}
    full.pop(SEEDED, None)
    return full


def make_hint(name: str, params: dict[str, int], image: Any, width: int, height: int, seed: int) -> np.ndarray:
    """The hint of ``image`` for a ``width`` x ``height`` picture whose (first) seed is ``seed``."""
    from .control_preprocess import preprocess

    return preprocess(name, image, size=(width, height), **params, **({SEEDED: seed} if seeded(name) else {}))


def seeded(name: str) -> bool:
    """Whether preprocessor ``name``'s hint depends on the image's seed (one call per image)."""
    from .control_preprocess import parameters

    return SEEDED in parameters(name)


def controlnet_path(text: str, base: Path = Path(".")) -> Path:
    """A ControlNet file or folder (relative to ``base``), else one found by name in the
    model search folders; FileNotFoundError names both tries."""
    from .modelref import find_controlnet

    path = base / text
    if path.exists():
        return path
    if os.sep in text or (os.altsep and os.altsep in text) or text.startswith("."):
        raise FileNotFoundError(f"ControlNet {text!r}: no such file or folder ({path})")
    return find_controlnet(text, None)
