"""Toy-world pieces for evaluating image edits: where a scene's object is, and the edits
(a new colour, a new kind) whose success ``ldm.toy.score`` can read back.

A scene's background is one flat palette colour and its border is pure background
(``world.MARGIN``), so the object is exactly the set of pixels that differ from it,
anti-aliased edges included.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

from .world import COLORS, KINDS, PALETTE, Scene, heldout_combos, render, sample_scene

Box = tuple[int, int, int, int]


def object_mask(scene: Scene, size: int = 64, dilate: int = 0) -> np.ndarray:
    """Bool ``(size, size)``: the pixels of ``scene``'s object (a cat's hat included),
    grown by ``dilate`` pixels (a square neighbourhood)."""
    if dilate < 0:
        raise ValueError(f"dilate must be >= 0, got {dilate}")
    pixels = render(scene, size).astype(np.int16)
    mask = np.abs(pixels - np.array(PALETTE[scene.background], np.int16)).max(-1) > 0
    if dilate:
        grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * dilate + 1))
        mask = np.asarray(grown) > 0
    return mask


def object_box(scene: Scene, size: int = 64, margin: int = 0) -> Box:
    """``(x0, y0, x1, y1)`` (end-exclusive) around the object, grown by ``margin`` and kept inside the picture."""
    ys, xs = np.nonzero(object_mask(scene, size))
    return (max(0, int(xs.min()) - margin), max(0, int(ys.min()) - margin),
            min(size, int(xs.max()) + 1 + margin), min(size, int(ys.max()) + 1 + margin))


def box_mask(box: Box, size: int) -> np.ndarray:
    """Bool ``(size, size)``, True inside ``box``."""
    mask = np.zeros((size, size), dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()) + seed)


def _trained(kind: str, color: str, background: str) -> bool:
    return (kind, color, background) not in heldout_combos()


def _other(rng: np.random.Generator, items: tuple[str, ...], exclude: set[str]) -> str:
    choices = [c for c in items if c not in exclude]
    return choices[int(rng.integers(len(choices)))]


def edit_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` train-split scenes to edit, the same for a given ``seed``."""
    rng = _rng("edit scenes", seed)
    return [sample_scene(rng) for _ in range(n)]


def recolored(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with its object in another colour (not its background's or hat's), a
    combination the train split has: an edit that needs no generalisation."""
    while True:
        color = _other(rng, COLORS, {scene.color, scene.background, scene.hat_color or ""})
        if _trained(scene.kind, color, scene.background):
            return replace(scene, color=color)


def rekinded(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with another kind of object in another colour, same background and place
    (a new cat wears no hat: the prompt says so, and the masked region is the old object's)."""
    while True:
        kind = _other(rng, KINDS, {scene.kind})
        color = _other(rng, COLORS, {scene.color, scene.background})
        if _trained(kind, color, scene.background):
            return Scene(kind, color, scene.background, x=scene.x, y=scene.y, size=scene.size)
