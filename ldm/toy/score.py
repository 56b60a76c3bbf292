"""Reading a toy-world picture's attributes back from its pixels, to score generations.

Colours are read by rules: each pixel takes the nearest palette colour, and only
*interior* pixels count (all 3x3 neighbours share the colour), which drops the blended
edge pixels that anti-aliasing or a VAE leave (red on yellow blends to orange). The
object's kind and whether a cat wears a hat come from a small CNN
(:mod:`ldm.toy.classifier`), since hand-written shape rules are brittle.
"""

from __future__ import annotations

import numpy as np

from .world import COLORS, PALETTE

_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
MAX_DISTANCE = 90.0  # a pixel farther than this from every palette colour is "no colour"
HAT_REGION = 0.35  # top fraction of the object's height where a hat sits
MIN_HAT_FRACTION = 0.03  # of the object's interior pixels


def _check(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    return img


def color_map(img: np.ndarray) -> np.ndarray:
    """Index into ``COLORS`` of each pixel's nearest palette colour; -1 if none is near."""
    img = _check(img).astype(np.float32)
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, cheaper than materialising every difference.
    dist2 = (img * img).sum(-1, keepdims=True) - 2 * img @ _RGB.T + (_RGB * _RGB).sum(-1)
    labels = dist2.argmin(-1)
    labels[dist2.min(-1) > MAX_DISTANCE ** 2] = -1
    return labels


def _interior(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood all has their colour (image edge counts as same)."""
    pad = np.pad(labels, 1, mode="edge")
    h, w = labels.shape
    keep = labels >= 0
    for dy in range(3):
        for dx in range(3):
            keep &= pad[dy:dy + h, dx:dx + w] == labels
    return keep


def _mode(values: np.ndarray) -> int | None:
    values = values[values >= 0]
    return int(np.bincount(values, minlength=len(COLORS)).argmax()) if values.size else None


def _background(labels: np.ndarray) -> int:
    ring = max(1, labels.shape[0] // 32)
    border = np.concatenate([labels[:ring].ravel(), labels[-ring:].ravel(),
                             labels[:, :ring].ravel(), labels[:, -ring:].ravel()])
    mode = _mode(border)
    if mode is None:  # no border pixel near any palette colour: use the whole picture
        mode = _mode(labels.ravel())
    return 0 if mode is None else mode


def _object(labels: np.ndarray, bg: int) -> tuple[np.ndarray, int | None]:
    inner = _interior(labels) & (labels != bg)
    if not inner.any():  # tiny or blurry object: fall back to every coloured pixel
        return inner, _mode(labels[labels != bg])
    return inner, _mode(labels[inner])


def _hat(labels: np.ndarray, inner: np.ndarray, obj: int | None) -> int | None:
    if obj is None or not inner.any():
        return None
    rows = np.nonzero(inner.any(1))[0]
    top, bottom = rows.min(), rows.max()
    cut = top + max(1, int(round(HAT_REGION * (bottom - top + 1))))
    region = labels[top:cut][inner[top:cut]]
    hat = region[region != obj]
    if hat.size < max(2, MIN_HAT_FRACTION * inner.sum()):
        return None
    return _mode(hat)


def _name(index: int | None) -> str | None:
    return None if index is None else COLORS[index]


def read_colors(img: np.ndarray) -> dict[str, str | None]:
    """``{"background", "color", "hat_color"}`` read from one picture (None: not found)."""
    labels = color_map(img)
    bg = _background(labels)
    inner, obj = _object(labels, bg)
    return {"background": COLORS[bg], "color": _name(obj), "hat_color": _name(_hat(labels, inner, obj))}


def score_images(images, attributes: list[dict], classifier=None) -> list[dict[str, bool]]:
    """For each image, whether each stated attribute is visible: ``{name: bool}``.

    ``color``, ``background`` and ``hat_color`` are read from pixels; ``kind`` and
    ``hat`` need ``classifier`` (a :class:`~ldm.toy.classifier.ToyClassifier`, a path to
    one, or None for the default file ``weights/toy_classifier.safetensors``).
    """
    images = [_check(im) for im in images]
    if len(images) != len(attributes):
        raise ValueError(f"{len(images)} images but {len(attributes)} attribute dicts")
    predictions = [None] * len(images)
    if any("kind" in a or "hat" in a for a in attributes):
        from .classifier import classify, get_classifier

        predictions = classify(get_classifier(classifier), images)
    results = []
    for img, attrs, pred in zip(images, attributes, predictions):
        colors = read_colors(img)
        out: dict[str, bool] = {}
        for name in ("background", "color", "hat_color"):
            if name in attrs:
                out[name] = colors[name] == attrs[name]
        if "kind" in attrs:
            out["kind"] = pred["kind"] == attrs["kind"]
        if "hat" in attrs:
            out["hat"] = pred["hat"] == attrs["hat"]
        results.append(out)
    return results
