"""Random masks for training an inpainting model, as SD's inpainting models were made:
synthetic masks of several shapes, and in 25% of samples everything masked (so the model
still draws from a prompt alone, which is also how it runs without an image).

- ``box``: one to three rectangles (an object to replace);
- ``strokes``: thick polylines, as a brush paints them;
- ``border``: a band along one or two sides (outpainting: the old picture on one side,
  the new area on the other);
- ``full``: the whole picture.

Masks are float32 ``(size, size)`` of 0/1 (1 = repainted), drawn from a numpy generator
only, so a dataset item's mask is a pure function of its seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

MASK_ODDS: dict[str, float] = {"full": 0.25, "box": 0.30, "strokes": 0.25, "border": 0.20}
BOX_SIDE = (0.15, 0.7)  # of the picture's side
STROKE_WIDTH = (0.06, 0.18)
BORDER_DEPTH = (0.15, 0.6)


def mask_settings() -> dict[str, object]:
    """What a training checkpoint records of the mask recipe (a change must not be resumed)."""
    return {"odds": MASK_ODDS, "box": BOX_SIDE, "stroke": STROKE_WIDTH, "border": BORDER_DEPTH}


def random_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One random mask of ``size`` x ``size``; its kind drawn by ``MASK_ODDS``."""
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    names = tuple(MASK_ODDS)
    odds = np.array([MASK_ODDS[n] for n in names])
    kind = names[int(rng.choice(len(names), p=odds / odds.sum()))]
    return _DRAW[kind](rng, size)


def _canvas(size: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    image = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(image))
    return (np.asarray(image) > 127).astype(np.float32)


def full_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.ones((size, size), dtype=np.float32)


def box_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    boxes = []
    for _ in range(int(rng.integers(1, 4))):
        w, h = (max(2, int(rng.uniform(*BOX_SIDE) * size)) for _ in range(2))
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        boxes.append((x, y, x + w - 1, y + h - 1))
    return _canvas(size, lambda d: [d.rectangle(b, fill=255) for b in boxes])


def stroke_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    strokes = []
    for _ in range(int(rng.integers(1, 5))):
        points = [tuple(float(v) for v in rng.uniform(0, size, 2)) for _ in range(int(rng.integers(2, 6)))]
        strokes.append((points, max(2, int(rng.uniform(*STROKE_WIDTH) * size))))

    def draw(d: ImageDraw.ImageDraw) -> None:
        for points, width in strokes:
            d.line(points, fill=255, width=width, joint="curve")
            for x, y in (points[0], points[-1]):  # round ends, as a brush leaves
                d.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)

    return _canvas(size, draw)


def border_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.float32)
    sides = rng.permutation(4)[: int(rng.integers(1, 3))]
    for side in sides:
        depth = max(1, int(rng.uniform(*BORDER_DEPTH) * size))
        if side == 0:
            mask[:, :depth] = 1  # left
        elif side == 1:
            mask[:depth] = 1  # top
        elif side == 2:
            mask[:, size - depth:] = 1  # right
        else:
            mask[size - depth:] = 1  # bottom
    return mask


_DRAW: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "full": full_mask, "box": box_mask, "strokes": stroke_mask, "border": border_mask,
}
