"""Image-editing keys of a JSONL batch line, checked when the prompt file is read.

``image`` (img2img), with ``mask`` (inpainting) or ``extend`` (outpainting: margins
``[L, T, R, B]`` or ``"L,T,R,B"`` in pixels, the new area painted over ``fill``),
``strength``, ``mask_blur`` and ``mask_padding``. Paths are relative to the prompt
file's folder (absolute ones are taken as they are); they are inputs, only ever read.

Here a line's values are checked (:mod:`ldm.validation`, the pipeline's own checks)
and its paths must name regular files; the pictures themselves are read once the
model is loaded (:mod:`ldm.batchinputs`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .edit_request import IMAGE_STRENGTH, MASK_STRENGTH
from .editing import DEFAULT_FILL, DEFAULT_MASK_BLUR, FILLS
from .pngmeta import MAX_SIDE
from .validation import check_int, check_margins, check_strength

EDIT_KEYS = ("image", "mask", "strength", "extend", "fill", "mask_blur", "mask_padding")
_MASKED_ONLY = ("mask_blur", "mask_padding")


@dataclass(frozen=True)
class InputPath:
    """An input file: the path as the line gives it, and resolved (absolute, links followed)."""

    given: str
    resolved: str


@dataclass(frozen=True)
class Edit:
    """What a line edits and how. ``mask_blur``/``mask_padding`` are None without a mask,
    ``fill`` without ``extend``."""

    image: InputPath
    strength: float
    mask: InputPath | None = None
    extend: tuple[int, int, int, int] | None = None
    fill: str | None = None
    mask_blur: int | None = None
    mask_padding: int | None = None

    @property
    def masked(self) -> bool:
        """Repaints a region: a mask, or the margins ``extend`` adds."""
        return self.mask is not None or self.extend is not None

    def params(self) -> dict[str, Any]:
        """The edit's fields of :class:`ldm.pngmeta.GenerationParams`."""
        return {"strength": self.strength, "mask_blur": self.mask_blur, "mask_padding": self.mask_padding}

    def inputs(self) -> dict[str, InputPath]:
        """The files this edit reads, by role."""
        return {"image": self.image, **({"mask": self.mask} if self.mask else {})}


@dataclass(frozen=True)
class EditDefaults:
    """The command line's values for lines that edit and do not set their own."""

    strength: float | None = None  # None: by the line (IMAGE_STRENGTH, or MASK_STRENGTH with a mask)
    mask_blur: int = DEFAULT_MASK_BLUR
    mask_padding: int | None = None  # None: the whole picture is rendered
    fill: str = DEFAULT_FILL


def check_defaults(defaults: EditDefaults) -> None:
    if defaults.strength is not None:
        check_strength(defaults.strength)
    _pixels(defaults.mask_blur, "mask_blur")
    _padding(defaults.mask_padding)
    _fill(defaults.fill)


def _pixels(value: Any, name: str) -> int:
    # Capped as in PNG parameters: a blur or padding beyond any side is a typo.
    return check_int(value, name, 0, MAX_SIDE)


def _padding(value: Any) -> int | None:
    return None if value is None else _pixels(value, "mask_padding")


def input_path(value: Any, name: str, base: Path) -> InputPath:
    """``value`` relative to ``base`` (unless absolute), which must be a regular file."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a path (a non-empty string), got {value!r:.80}")
    path = base / value
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{name} {value!r:.200}: no such file ({path})") from None
    except (OSError, ValueError) as exc:  # too long, a loop of links, a NUL in the name ...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{name} {value!r:.200}: {reason}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{name} {value!r:.200}: not a regular file ({path})")
    return InputPath(value, str(path.resolve()))


def parse_extend(value: Any) -> tuple[int, int, int, int]:
    """``[L, T, R, B]`` or ``"L,T,R,B"``: margins in pixels, >= 0, not all zero."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",")]
        except ValueError:
            raise ValueError(f"extend must be 'LEFT,TOP,RIGHT,BOTTOM' in pixels, got {value!r:.80}") from None
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError(f"extend must be [left, top, right, bottom] in pixels, got {value!r:.80}")
    return check_margins(*value)


def _fill(value: Any) -> str:
    if value not in FILLS:
        raise ValueError(f"unknown fill {value!r:.80}; valid fills: {', '.join(FILLS)}")
    return value


def _check_keys(obj: dict[str, Any]) -> None:
    """Keys that need others: everything needs ``image``; blur and padding a mask or
    ``extend``; ``fill`` needs ``extend``, which makes its own mask."""
    if "image" not in obj:
        given = [k for k in EDIT_KEYS if k in obj]
        if given:
            raise ValueError(f"{given[0]} needs an 'image' to edit")
    if "mask" in obj and "extend" in obj:
        raise ValueError("give 'mask' or 'extend', not both ('extend' makes its own mask)")
    if "fill" in obj and "extend" not in obj:
        raise ValueError("fill needs 'extend' (it paints the added margins)")
    if "mask" not in obj and "extend" not in obj:
        given = [k for k in _MASKED_ONLY if k in obj]
        if given:
            raise ValueError(f"{given[0]} needs a 'mask' or 'extend'")


def _strength(value: Any, steps: int) -> float:
    """A strength that runs at least one of the line's ``steps`` (the sampler's own rule)."""
    from .samplers import first_step  # torch: loaded by the other sampling checks anyway

    strength = check_strength(value)
    first_step(steps, strength)
    return strength


def edit_from_object(obj: dict[str, Any], base: Path, defaults: EditDefaults, steps: int) -> Edit | None:
    """The edit a JSONL object asks for with ``steps`` steps (None: text to image);
    ValueError says what is wrong."""
    _check_keys(obj)
    if "image" not in obj:
        return None
    image = input_path(obj["image"], "image", base)
    mask = input_path(obj["mask"], "mask", base) if "mask" in obj else None
    extend = parse_extend(obj["extend"]) if "extend" in obj else None
    masked = mask is not None or extend is not None
    default_strength = defaults.strength
    if default_strength is None:
        default_strength = MASK_STRENGTH if masked else IMAGE_STRENGTH
    strength = _strength(obj.get("strength", default_strength), steps)
    if not masked:
        return Edit(image, strength)
    return Edit(
        image, strength, mask=mask, extend=extend, fill=_fill(obj.get("fill", defaults.fill)) if extend else None,
        mask_blur=_pixels(obj.get("mask_blur", defaults.mask_blur), "mask_blur"),
        mask_padding=_padding(obj.get("mask_padding", defaults.mask_padding)),
    )
