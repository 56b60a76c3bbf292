"""A concept the shipped toy model has never seen, for teaching it with a LoRA: the ring.

A ring is a disc of one palette colour with a round hole of the background colour in
its middle (hole radius ``HOLE`` of the outer radius), at the positions and sizes the
world gives circles. The word ``ring`` never occurs in the world's captions, so the
shipped model has no idea what it means; its captions are the world's
(:func:`ldm.toy.world.caption` with ``ring`` as the kind word), so the colour and
background words work as they do for the other kinds.

The world is extended by composition, never changed: a ring is the world's own
circle of radius ``r`` minus its circle of radius ``HOLE * r`` at the same centre.
The renderer's anti-aliasing is a box filter, linear in coverage, so
``outer - inner + background`` is exactly (up to uint8 rounding) a ring drawn at once.

A new colour was tried first and dropped: the shipped VAE cannot draw one (pink
pictures come back yellow or white from its encoder and decoder), so no U-Net
adapter could teach it. The VAE does keep rings' holes (see ``scripts/eval_lora.py``,
which measures the detector below on VAE round trips as well as on true pictures).

Detector (:func:`is_ring`): pixels take their nearest palette colour
(:func:`ldm.toy.score.color_map`); the background is the border's colour and the object
colour the most common interior colour besides it, as :mod:`ldm.toy.score` reads them;
the object's extent is the 2nd to 98th percentile of its pixels' rows and columns. A
picture shows a ring when at least half of the central disc (radius a quarter of the
extent's smaller side, inside a ring's hole) is not the object's colour. Every other
kind is solid there (a cat's face holds its eyes and nose, a third of the disc at most).
"""

from __future__ import annotations

import dataclasses
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomicio import atomic_write, atomic_write_bytes
from .score import _background, _object, color_map
from .world import COLORS, KINDS, PALETTE, Scene, Split, caption, make_batch, render, sample_scene

CONCEPT = "ring"
HOLE = 0.55  # hole radius / outer radius
CENTRE = 0.25  # radius of the disc the detector looks at, as a fraction of the extent's smaller side
HOLLOW = 0.5  # a ring: at least this fraction of that disc is not the object's colour
MIN_PIXELS = 10  # fewer object pixels: no object to judge
_CIRCLES_ONLY = tuple(1.0 if k == "circle" else 0.0 for k in KINDS)


@lru_cache(maxsize=1)
def heldout_ring_combos() -> frozenset[tuple[str, str]]:
    """The (colour, background) pairs no training ring has: 14 of the 56 (a quarter),
    picked by a fixed seed, so every colour and background is still seen on rings."""
    pairs = [(c, b) for c in COLORS for b in COLORS if c != b]
    rng = np.random.default_rng(zlib.crc32(b"ring"))
    return frozenset(pairs[int(i)] for i in rng.choice(len(pairs), size=14, replace=False))


def ring_scene(rng: np.random.Generator, split: Split = "train",
               combo: tuple[str, str] | None = None) -> Scene:
    """A random ring: a world circle's position and size, with a (colour, background)
    pair of ``split`` (``train``: any pair but :func:`heldout_ring_combos`; ``heldout``:
    one of those), or ``combo`` when given."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    circle = sample_scene(rng, kind_weights=_CIRCLES_ONLY)
    if combo is None:
        held = heldout_ring_combos()
        pairs = sorted(held) if split == "heldout" else sorted(
            (c, b) for c in COLORS for b in COLORS if c != b and (c, b) not in held)
        combo = pairs[int(rng.integers(len(pairs)))]
    color, background = combo
    if color not in PALETTE or background not in PALETTE or color == background:
        raise ValueError(f"a ring needs two different palette colours, got {combo!r}")
    return dataclasses.replace(circle, kind=CONCEPT, color=color, background=background)


def render_ring(scene: Scene, size: int = 64) -> np.ndarray:
    """Draw a ring ``scene`` as ``(size, size, 3)`` uint8: the world's circle minus its
    smaller circle at the same centre (see the module docstring)."""
    if scene.kind != CONCEPT:
        raise ValueError(f"render_ring draws '{CONCEPT}' scenes, got kind {scene.kind!r}")
    circle = dataclasses.replace(scene, kind="circle")
    outer = render(circle, size).astype(np.int16)
    inner = render(dataclasses.replace(circle, size=scene.size * HOLE), size).astype(np.int16)
    hole = np.array(PALETTE[scene.background], np.int16)
    return np.clip(outer - inner + hole, 0, 255).astype(np.uint8)


def render_any(scene: Scene, size: int = 64) -> np.ndarray:
    """A ring or any world scene, drawn."""
    return render_ring(scene, size) if scene.kind == CONCEPT else render(scene, size)


def hollowness(picture: np.ndarray) -> float:
    """Fraction of the object's central disc that is not the object's colour (0 when no
    object is found); see the module docstring."""
    labels = color_map(picture)
    background = _background(labels)
    _, obj = _object(labels, background)
    if obj is None:
        return 0.0
    ys, xs = np.nonzero(labels == obj)
    if len(ys) < MIN_PIXELS:
        return 0.0
    (y0, y1), (x0, x1) = np.percentile(ys, [2, 98]), np.percentile(xs, [2, 98])
    radius = CENTRE * min(y1 - y0, x1 - x0)
    rows, cols = np.mgrid[: labels.shape[0], : labels.shape[1]]
    disc = (rows - (y0 + y1) / 2) ** 2 + (cols - (x0 + x1) / 2) ** 2 <= radius**2
    if not disc.any():
        return 0.0
    return float((labels[disc] != obj).mean())


def is_ring(picture: np.ndarray) -> bool:
    """Whether ``picture`` (uint8 ``(H, W, 3)``) shows a ring (see the module docstring)."""
    return hollowness(picture) >= HOLLOW


@dataclasses.dataclass(frozen=True)
class ConceptPrompt:
    prompt: str
    wording: str  # "train" or "heldout" caption templates
    scene: Scene  # one ring that fits the prompt


def ring_prompts(n: int, seed: int = 0) -> list[ConceptPrompt]:
    """``n`` prompts for rings of held-out (colour, background) pairs, stating both, cycling
    through the pairs evenly; the first half in training wording, the rest in the world's
    held-out phrasings."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = np.random.default_rng(zlib.crc32(b"ring prompts") + seed)
    combos = sorted(heldout_ring_combos())
    order = rng.permutation(len(combos))
    out = []
    for i in range(n):
        wording: Split = "train" if i < n // 2 else "heldout"
        scene = ring_scene(rng, combo=combos[order[i % len(combos)]])
        out.append(ConceptPrompt(caption(scene, rng, wording, full=True), wording, scene))
    return out


def write_picture_set(folder: str | Path, rings: int, others: int = 0, seed: int = 0, size: int = 64,
                      ring_repeats: int = 1, reg_folder: str | Path | None = None) -> list[Path]:
    """Write a LoRA training folder in kohya-ss's layout: ``rings`` ring pictures of the
    train pairs in ``<ring_repeats>_ring/`` (each shown ``ring_repeats`` times per epoch)
    and ``others`` ordinary world pictures in ``1_world/`` (kohya-ss's regularisation
    pictures: they keep the other kinds as they were) of ``reg_folder`` (default:
    ``folder``), each ``NNNN.png`` with its world caption in ``NNNN.txt``. Returns the
    picture paths."""
    if rings < 0 or others < 0 or rings + others == 0 or ring_repeats < 1:
        raise ValueError(f"need at least one picture and ring_repeats >= 1, got rings={rings}, others={others}, "
                         f"ring_repeats={ring_repeats}")
    folder = Path(folder)
    rng = np.random.default_rng(zlib.crc32(b"ring set") + seed)
    scenes = [ring_scene(rng) for _ in range(rings)]
    batch = make_batch(int(rng.integers(2**31)), others, size)
    groups = ((folder / f"{ring_repeats}_{CONCEPT}", [render_ring(s, size) for s in scenes],
               [caption(s, rng) for s in scenes]),
              (Path(reg_folder or folder) / "1_world", list(batch.images), batch.captions))
    paths = []
    for sub, pictures, texts in groups:
        for i, (picture, text) in enumerate(zip(pictures, texts)):
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"{i:04d}.png"
            atomic_write(path, lambda f, p=picture: Image.fromarray(p).save(f, format="PNG"))
            atomic_write_bytes(path.with_suffix(".txt"), (text + "\n").encode())
            paths.append(path)
    return paths
