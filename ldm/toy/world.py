"""A procedural toy world: cartoon cats (maybe in a hat) and plain shapes, with captions.

It is the training set of the model shipped in ``weights/``. Everything is a pure
function of a seed (numpy ``Generator``), drawn with PIL, so no data files exist.

A scene is one object (``cat``, ``circle``, ``square``, ``triangle`` or ``star``) in
one of eight well-separated colours on a flat background of another colour, at a
continuous position and size. Cats may wear a top hat or a party hat of a third colour.

Generalisation is tested on a held-out split: about 10% of the
(kind, colour, background) combinations never occur in the train split, and the
held-out caption templates are phrasings (connectives, orders) never trained on.

Caption grammar (what :func:`prompt_to_attributes` reads back): the kind is always
named; a colour word right before the kind word is the object colour, right before
``hat`` the hat colour, right before ``background`` the background colour. A hatted
cat's caption always mentions the hat, so a cat prompt without ``hat`` means no hat.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Split = Literal["train", "heldout"]

KINDS = ("cat", "circle", "square", "triangle", "star")
SHAPES = KINDS[1:]
# Cats are the star of the world; each plain shape gets an equal share of the rest.
KIND_WEIGHTS = np.array([0.4, 0.15, 0.15, 0.15, 0.15])
HAT_PROBABILITY = 0.5
HAT_STYLES = ("top", "party")

# Far apart in RGB (closest pair, orange/yellow, is ~80 apart) so pixels classify by nearest colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (250, 140, 20),
    "purple": (140, 50, 180),
}
COLORS = tuple(PALETTE)

# Object "radius" as a fraction of the image side. At 64 px and 8x latents the smallest
# cat is ~11 px across its head, about what the VAE's 8x8 latents keep ears and hats of.
SIZE_RANGE = (0.17, 0.28)
MARGIN = 0.06  # keeps the border pixels pure background
SUPERSAMPLE = 4  # anti-aliasing: draw at 4x, box-filter down


@dataclass(frozen=True)
class Scene:
    """One picture. ``x``, ``y``: centre of the object's bounding box, in [0, 1] of the
    image side (y down); ``size``: head/body radius as a fraction of the image side."""

    kind: str
    color: str
    background: str
    hat: bool = False
    hat_color: str | None = None
    hat_style: str | None = None
    x: float = 0.5
    y: float = 0.5
    size: float = 0.2

    def attributes(self) -> dict:
        """Every attribute a caption can state (``hat`` only for cats)."""
        attrs = {"kind": self.kind, "color": self.color, "background": self.background}
        if self.kind == "cat":
            attrs["hat"] = self.hat
            if self.hat:
                attrs["hat_color"] = self.hat_color
        return attrs


# --------------------------------------------------------------------------- splits


@lru_cache(maxsize=1)
def heldout_combos() -> frozenset[tuple[str, str, str]]:
    """The (kind, colour, background) combinations that never appear in the train split.

    Six of the 56 combinations of each kind (~10.7%), picked by a fixed seed, so every
    kind, colour and background still appears in training, only not together.
    """
    rng = np.random.default_rng(20240607)
    held = []
    for kind in KINDS:
        combos = [(kind, c, b) for c in COLORS for b in COLORS if c != b]
        for i in rng.choice(len(combos), size=6, replace=False):
            held.append(combos[int(i)])
    return frozenset(held)


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def _pick(rng: np.random.Generator, items, exclude=()) -> str:
    choices = [c for c in items if c not in exclude]
    return choices[int(rng.integers(len(choices)))]


def kind_odds(weights: Sequence[float]) -> np.ndarray:
    """``weights`` of the ``KINDS`` (in that order) as probabilities, checked."""
    odds = np.asarray(weights, dtype=float)
    if odds.shape != (len(KINDS),) or not np.isfinite(odds).all() or (odds < 0).any() or odds.sum() <= 0:
        raise ValueError(f"kind weights must be {len(KINDS)} non-negative numbers (for {', '.join(KINDS)}) "
                         f"with a positive sum, got {list(np.ravel(odds))}")
    return odds / odds.sum()


def sample_scene(rng: np.random.Generator, split: Split = "train",
                 kind_weights: Sequence[float] | None = None) -> Scene:
    """Draw one random scene from ``split`` ('train' or 'heldout' combinations).

    ``kind_weights``: the train split's odds of each of ``KINDS`` (default
    ``KIND_WEIGHTS``; they need not sum to 1)."""
    _check_split(split)
    odds = KIND_WEIGHTS if kind_weights is None else kind_odds(kind_weights)
    held = heldout_combos()
    if split == "heldout":
        ordered = sorted(held)
        kind, color, background = ordered[int(rng.integers(len(ordered)))]
    else:
        while True:
            kind = KINDS[int(rng.choice(len(KINDS), p=odds))]
            color = _pick(rng, COLORS)
            background = _pick(rng, COLORS, exclude=(color,))
            if (kind, color, background) not in held:
                break
    return _scene_for(rng, kind, color, background)


def kind_twin(scene: Scene, rng: np.random.Generator) -> Scene:
    """A train-split scene of the same colours as ``scene`` but another kind.

    Contrastive training sees such pairs in one batch as hard negatives: without them a
    small CLIP can match captions by colour alone and learns to blur "circle" and
    "square" together in its text space, which the U-Net then cannot tell apart either.
    A shape's twin is another shape (cats are easy to tell from shapes); a cat's twin is
    a shape. Every (colour, background) pair has some other train-split kind, since each
    kind holds out only six of its 56 pairs.
    """
    held = heldout_combos()
    others = [k for k in KINDS if k != scene.kind and (k, scene.color, scene.background) not in held]
    shapes = [k for k in others if k != "cat"]
    return _scene_for(rng, _pick(rng, shapes or others), scene.color, scene.background)


def _scene_for(rng: np.random.Generator, kind: str, color: str, background: str) -> Scene:
    """Random hat, size and position for a fixed (kind, colour, background)."""
    hat = kind == "cat" and bool(rng.random() < HAT_PROBABILITY)
    hat_color = _pick(rng, COLORS, exclude=(color, background)) if hat else None
    hat_style = HAT_STYLES[int(rng.integers(2))] if hat else None
    size = float(rng.uniform(*SIZE_RANGE))
    (x0, y0), (x1, y1) = _extent(kind, hat)
    half_w, half_h = (x1 - x0) * size / 2, (y1 - y0) * size / 2
    x = float(rng.uniform(MARGIN + half_w, 1 - MARGIN - half_w))
    y = float(rng.uniform(MARGIN + half_h, 1 - MARGIN - half_h))
    return Scene(kind, color, background, hat, hat_color, hat_style, x, y, size)


# --------------------------------------------------------------------------- rendering
# Shapes are drawn in units of the radius, relative to the body centre (y down).

_EAR = [(-0.95, -0.3), (-0.85, -1.45), (-0.2, -0.92)]
_TOP_HAT = [(-0.75, -1.02, 0.75, -0.84), (-0.5, -2.0, 0.5, -0.95)]  # brim, crown
_PARTY_HAT = [(-0.62, -0.86), (0.62, -0.86), (0.0, -2.0)]
_HAT_TOP = -2.0


def _star(outer: float = 1.25, inner: float = 0.5) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    return [(float(r * np.cos(a)), float(r * np.sin(a))) for r, a in zip(radii, angles)]


_STAR = _star()
_TRIANGLE = [(0.0, -1.2), (-1.039, 0.6), (1.039, 0.6)]


def _extent(kind: str, hat: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """Bounding box of the drawn object in radius units, ((x0, y0), (x1, y1))."""
    if kind == "cat":
        return (-1.0, _HAT_TOP if hat else _EAR[1][1]), (1.0, 1.0)
    if kind == "square":
        return (-0.9, -0.9), (0.9, 0.9)
    if kind in ("triangle", "star"):
        pts = np.array(_TRIANGLE if kind == "triangle" else _STAR)
        return tuple(pts.min(0)), tuple(pts.max(0))
    return (-1.0, -1.0), (1.0, 1.0)


def render(scene: Scene, size: int = 64, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Draw ``scene`` as a ``(size, size, 3)`` uint8 RGB array (anti-aliased by supersampling)."""
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    side = size * supersample
    img = Image.new("RGB", (side, side), PALETTE[scene.background])
    draw = ImageDraw.Draw(img)
    unit = scene.size * side
    (x0, y0), (x1, y1) = _extent(scene.kind, scene.hat)
    # (x, y) is the bounding-box centre; find the body centre from it.
    cx = scene.x * side - (x0 + x1) / 2 * unit
    cy = scene.y * side - (y0 + y1) / 2 * unit

    def pts(points):
        return [(cx + px * unit, cy + py * unit) for px, py in points]

    def disc(px, py, r, fill):
        draw.ellipse([cx + (px - r) * unit, cy + (py - r) * unit,
                      cx + (px + r) * unit, cy + (py + r) * unit], fill=fill)

    fill = PALETTE[scene.color]
    if scene.kind == "cat":
        _draw_cat(draw, scene, pts, disc, unit, cx, cy)
    elif scene.kind == "circle":
        disc(0, 0, 1.0, fill)
    elif scene.kind == "square":
        draw.rectangle(pts([(-0.9, -0.9), (0.9, 0.9)]), fill=fill)
    else:
        draw.polygon(pts(_TRIANGLE if scene.kind == "triangle" else _STAR), fill=fill)
    if supersample > 1:
        img = img.reduce(supersample)
    return np.asarray(img)


def _draw_cat(draw, scene, pts, disc, unit, cx, cy) -> None:
    fill = PALETTE[scene.color]
    eye = PALETTE["white" if scene.color == "black" else "black"]
    draw.polygon(pts(_EAR), fill=fill)
    draw.polygon(pts([(-x, y) for x, y in _EAR]), fill=fill)
    disc(0, 0, 1.0, fill)
    disc(-0.38, -0.12, 0.15, eye)
    disc(0.38, -0.12, 0.15, eye)
    draw.polygon(pts([(-0.12, 0.18), (0.12, 0.18), (0.0, 0.33)]), fill=eye)
    if scene.hat:
        hat = PALETTE[scene.hat_color]
        if scene.hat_style == "party":
            draw.polygon(pts(_PARTY_HAT), fill=hat)
        else:
            for box in _TOP_HAT:
                draw.rectangle(pts([box[:2], box[2:]]), fill=hat)


# --------------------------------------------------------------------------- captions
# {p}: prefix, {n}: noun phrase ("a black cat"), {h}: hat clause (" wearing a red hat"),
# {bg}: background colour. Templates without {bg} are used when the background is unstated.
# Training wordings name the background before and after the object, with many
# connectives, as real captions do: a text encoder that saw one or two orders ties a
# colour to its place in the sentence ("a blue ..." at the start is the object) rather
# than to the noun it qualifies, and then misreads any new order. The held-out ones are
# phrasings never trained on (the connective "with" for a background, "on a ..." first,
# "a ... background with ..."), not new words.

_TRAIN_PREFIXES = ("", "", "a picture of ", "an image of ", "a drawing of ", "a cartoon of ")
_TRAIN_HATS = (" wearing a {hc}hat", " with a {hc}hat", " in a {hc}hat")
_TRAIN_BG = ("{p}{n}{h} on a {bg} background", "{p}{n}{h}, {bg} background",
             "{p}{n}{h} against a {bg} background", "{p}{n}{h} in front of a {bg} background",
             "{p}{n}{h} over a {bg} background", "{p}{n}{h} and a {bg} background",
             "{bg} background, {p}{n}{h}", "a {bg} background behind {p}{n}{h}",
             "a {bg} background and {p}{n}{h}", "against a {bg} background, {p}{n}{h}",
             "in front of a {bg} background, {p}{n}{h}")
_HELDOUT_PREFIXES = ("", "a drawing of ")
_HELDOUT_HATS = (" wearing a {hc}hat",)
_HELDOUT_BG = ("{p}{n}{h} with a {bg} background", "a {bg} background with {p}{n}{h}",
               "on a {bg} background, {p}{n}{h}")
_NO_BG = "{p}{n}{h}"

P_COLOR, P_BACKGROUND, P_HAT_COLOR = 0.7, 0.5, 0.6


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _fix_articles(text: str) -> str:
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = _article(words[i + 1])
    return " ".join(words)


def caption(scene: Scene, rng: np.random.Generator, split: Split = "train",
            full: bool = False) -> str:
    """A random caption of ``scene``. Colours may be left out (``full=True`` states all).

    The kind is always named, and so is a hat. ``split='heldout'`` uses templates
    whose phrasings never occur in training.
    """
    _check_split(split)
    say_color = full or rng.random() < P_COLOR
    say_bg = full or rng.random() < P_BACKGROUND
    say_hc = scene.hat and (full or rng.random() < P_HAT_COLOR)
    prefixes, hats, bgs = ((_TRAIN_PREFIXES, _TRAIN_HATS, _TRAIN_BG) if split == "train"
                           else (_HELDOUT_PREFIXES, _HELDOUT_HATS, _HELDOUT_BG))
    p = prefixes[int(rng.integers(len(prefixes)))]
    n = f"a {scene.color} {scene.kind}" if say_color else f"a {scene.kind}"
    h = ""
    if scene.hat:
        h = hats[int(rng.integers(len(hats)))].format(hc=f"{scene.hat_color} " if say_hc else "")
    template = bgs[int(rng.integers(len(bgs)))] if say_bg else _NO_BG
    return _fix_articles(template.format(p=p, n=n, h=h, bg=scene.background))


def prompt_to_attributes(prompt: str) -> dict:
    """The attributes a prompt in the world's grammar states.

    Keys present only when stated: ``kind``, ``color``, ``background``, ``hat_color``;
    ``hat`` (bool) whenever the kind is ``cat``. Words outside the grammar are ignored;
    an empty prompt gives ``{}``.
    """
    words = [w.strip(".,;:!?") for w in prompt.lower().split()]
    attrs: dict = {}
    for i, word in enumerate(words):
        before = words[i - 1] if i > 0 and words[i - 1] in PALETTE else None
        if word in KINDS and "kind" not in attrs:
            attrs["kind"] = word
            if before:
                attrs["color"] = before
        elif word == "hat" and before:
            attrs["hat_color"] = before
        elif word == "background" and before:
            attrs["background"] = before
    if attrs.get("kind") == "cat":
        attrs["hat"] = "hat" in words
    return attrs


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]
    scenes: list[Scene]


def make_batch(seed: int, n: int, size: int = 64, split: Split = "train",
               p_empty: float = 0.0) -> Batch:
    """``n`` scenes of ``split`` rendered at ``size`` with random captions.

    A fraction ``p_empty`` of captions is replaced by ``""`` (for classifier-free guidance).
    """
    _check_split(split)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split) for _ in range(n)]
    captions = [caption(s, rng, split) for s in scenes]
    if p_empty > 0:
        empty = rng.random(n) < p_empty
        captions = ["" if e else c for c, e in zip(captions, empty)]
    images = np.stack([render(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    return Batch(images, captions, scenes)


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    attributes: dict
    scene: Scene  # one scene that fits the prompt (for reference pictures)


def eval_prompts(n: int, seed: int = 0, paraphrase: bool = False) -> list[EvalPrompt]:
    """``n`` evaluation prompts for held-out (kind, colour, background) combinations.

    The combinations are cycled through evenly. Every prompt states all attributes. With ``paraphrase=True`` the prompts also use
    the held-out templates; otherwise the training templates (so a failure is about
    the combination, not the wording).
    """
    rng = np.random.default_rng(zlib.crc32(b"eval") + seed)
    combos = sorted(heldout_combos())
    order = rng.permutation(len(combos))  # cycle through all combinations evenly
    out = []
    for i in range(n):
        scene = _scene_for(rng, *combos[order[i % len(combos)]])
        text = caption(scene, rng, "heldout" if paraphrase else "train", full=True)
        out.append(EvalPrompt(text, prompt_to_attributes(text), scene))
    return out
