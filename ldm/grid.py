"""Image grids, laid out as AUTOMATIC1111's web UI does by default."""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image


def grid_shape(count: int, rows: int | None = None) -> tuple[int, int]:
    """(rows, cols) for ``count`` images: ``round(sqrt(count))`` rows unless given,
    filled row by row (the web UI's default, ``n_rows = -1``)."""
    if count < 1:
        raise ValueError(f"a grid needs at least one image, got {count}")
    if rows is None:
        rows = round(math.sqrt(count))
    if rows < 1:
        raise ValueError(f"grid rows must be >= 1, got {rows}")
    rows = min(rows, count)
    return rows, math.ceil(count / rows)


def image_grid(images: Sequence[Image.Image], rows: int | None = None) -> Image.Image:
    """Images pasted row-major into cells the size of the largest one (black background)."""
    rows, cols = grid_shape(len(images), rows)
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (i % cols * width, i // cols * height))
    return grid
