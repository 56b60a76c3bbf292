"""ControlNet hints of toy-world scenes, and the object's mask read back from a picture.

The world knows where it draws each object (``Scene.x``, ``y``, ``size``), so a hint
costs nothing: :func:`silhouette` is the scene's whole object (a cat with its ears,
eyes and hat) in white on black, drawn by :func:`ldm.toy.world.render` itself, at the
same position and size and with the same anti-aliasing; :func:`outline` is that
silhouette's boundary. Both are ``(size, size, 3)`` uint8 RGB pictures, what a
ControlNet hint image is (the pipeline feeds it in [0, 1]).

:func:`object_mask` reads where a generated picture's object is, to compare with the
hint (:func:`iou`). The rule: each pixel is read as a mix of the background colour and
one other palette colour, the one whose mix fits it best (least distance in RGB), and
belongs to the object when that colour makes up more than half of it (:data:`CUT`); then holes inside
the object are filled. For a pixel between the object's and the background's colours
this is "closer to the object colour than to the background colour", the same 50%
cut as the silhouette's anti-aliased edge; a cat's hat and eyes, of other colours,
count as object as they do in the silhouette, and eyes that share the background's
colour are filled back in. On the world's own pictures the mask equals the silhouette
but for a few edge pixels (``tests/test_toy_controlnet.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.ndimage import binary_erosion, binary_fill_holes

from .world import COLORS, PALETTE, SUPERSAMPLE, Scene, render

HINT_KINDS = ("silhouette", "outline")
# A pixel is the object's when more than half of it is: the cut sits between the coverages
# 8/16 and 9/16 that the world's 4x4 supersampling makes, so 8-bit rounding of a pixel at
# exactly half never tips it one way in the silhouette and the other way in a colour mix.
CUT = 17 / 32
OUTLINE_WIDTH = 2  # pixels at 64x64: thin enough to leave the inside empty, thick enough for 8x latents


def _check_scene(scene: Scene) -> Scene:
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be an ldm.toy.world.Scene, got {type(scene).__name__}")
    return scene


def silhouette_mask(scene: Scene, size: int = 64, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """``(size, size)`` bool: the pixels the world draws ``scene``'s object on (more than
    half covered, :data:`CUT`, after the same supersampling :func:`~ldm.toy.world.render` does)."""
    return silhouette(scene, size, supersample)[..., 0] / 255 > CUT


def silhouette(scene: Scene, size: int = 64, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """``scene``'s object in white on black, ``(size, size, 3)`` uint8, anti-aliased.

    The scene is drawn by the world's renderer with every part of the object white on a
    black ground; a cat's eyes and nose (then drawn in the ground's black) are filled
    back in, so the silhouette is the object's whole outer shape, anti-aliased only at
    its outer edge."""
    scene = _check_scene(scene)
    mono = dataclasses.replace(scene, color="white", background="black",
                               hat_color="white" if scene.hat else None)
    grey = render(mono, size, supersample).astype(np.float32).mean(-1)
    lo, hi = (float(np.mean(PALETTE[c])) for c in ("black", "white"))
    level = np.clip((grey - lo) / (hi - lo), 0.0, 1.0)  # the palette's black and white are not 0 and 255
    # Inside the outer edge everything is object: the eyes' anti-aliased rims too.
    level[binary_erosion(binary_fill_holes(level > CUT))] = 1.0
    return np.repeat(np.round(level * 255).astype(np.uint8)[..., None], 3, axis=-1)


def outline(scene: Scene, size: int = 64, width: int = OUTLINE_WIDTH,
            supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The boundary of ``scene``'s silhouette, ``width`` pixels wide inside it, white on
    black, ``(size, size, 3)`` uint8."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    mask = silhouette_mask(scene, size, supersample)
    edge = mask & ~binary_erosion(mask, iterations=width, border_value=0)
    return np.repeat((edge * 255).astype(np.uint8)[..., None], 3, axis=-1)


def hint(scene: Scene, kind: str = "silhouette", size: int = 64) -> np.ndarray:
    """The ``kind`` hint of ``scene`` (one of :data:`HINT_KINDS`)."""
    if kind == "silhouette":
        return silhouette(scene, size)
    if kind == "outline":
        return outline(scene, size)
    raise ValueError(f"unknown hint kind {kind!r}; valid: {', '.join(HINT_KINDS)}")


def object_mask(image: np.ndarray, background: str) -> np.ndarray:
    """``(H, W)`` bool: where ``image`` (``(H, W, 3)`` RGB) shows the object rather than
    its ``background`` colour (a palette name), holes filled (see the module doc)."""
    if background not in COLORS:
        raise ValueError(f"unknown background colour {background!r}; valid: {', '.join(COLORS)}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    ground = np.array(PALETTE[background], dtype=np.float32)
    others = np.array([PALETTE[c] for c in COLORS if c != background], dtype=np.float32) - ground
    pixels = image.reshape(-1, 3).astype(np.float32) - ground
    # Each pixel as a mix ground + t * (other - ground) of the ground and each other colour:
    # the best-fitting mix says which colour it is and how much of it.
    t = np.clip(pixels @ others.T / (others * others).sum(-1), 0.0, 1.0)  # (N, colours)
    residual = ((pixels[:, None, :] - t[..., None] * others[None]) ** 2).sum(-1)
    share = np.take_along_axis(t, residual.argmin(-1)[:, None], axis=1)[:, 0]
    return binary_fill_holes((share > CUT).reshape(image.shape[:2]))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes: {a.shape} and {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
