"""ControlNet hint preprocessors that need no downloaded weights: Canny edges, scribble and
threshold binarisation, content shuffle; and ready-made hints for everything else.

Every function takes an image (a PIL image, a path or an H×W×3 array, read by
:func:`ldm.editing.load_image`) and returns the hint as float32 H×W×3 in [0, 1], the size of
the image given. A hint is the picture a ControlNet was trained to follow, so each one
reproduces the code that made its training hints:

- ``canny``: lllyasviel/ControlNet's ``annotator/canny`` (``cv2.Canny(img, low, high)`` on the
  RGB uint8 image; white one-pixel edges on black, repeated on three channels). OpenCV's
  Canny is used as it is, not re-implemented: on colour it takes, per pixel, the channel with
  the largest L1 Sobel magnitude, quantises directions in fixed point and joins weak edges to
  strong ones through 8-neighbours. A Canny of the grey picture is not a substitute: on a drawn
  test picture it differs at 3,496 pixels where the colour Canny finds 7,261 edge pixels.
  ``low`` and ``high`` are the hysteresis thresholds on that L1 magnitude: a pixel above
  ``high`` starts an edge, one above ``low`` continues an edge it touches. Defaults 100 and 200,
  as ControlNet's ``gradio_canny2image`` and sd-webui-controlnet's sliders (which span 1..255).
- ``scribble``: a sketch drawn dark on a light background (pen on paper) becomes white strokes
  on black, as ControlNet's ``gradio_scribble2image`` does: white where the darkest channel is
  below ``threshold`` (127), so coloured strokes count too. This inversion is the one
  sd-webui-controlnet's "invert (from white bg & black line)" applies to a drawing.
- ``threshold``: sd-webui-controlnet's ``threshold`` preprocessor: white where the darkest
  channel is above ``threshold`` (127); light strokes on a dark background stay as they are.
- ``shuffle``: ContentShuffleDetector of ControlNet 1.1 (sd-webui-controlnet
  ``annotator/shuffle``): each output pixel is read, bilinearly, from where a smooth random
  flow field points (uniform noise on a grid of 256-pixel cells, upscaled with bicubic
  interpolation). The extension draws the noise from NumPy's legacy global generator seeded
  by the render seed; ``shuffle`` draws the same numbers from its own ``RandomState(seed)``,
  so a seed gives the extension's picture without touching global state. The reference runs
  it on a picture 512 pixels on its short side, which sets how far the content moves.
- ``none``: a ready-made hint (a depth map, an OpenPose skeleton, any detector's output made
  elsewhere), read and returned as it is: detectors with weights are not part of ``ldm``.

Resolution: a hint is computed at the size of the image given. :func:`preprocess` with
``size=(width, height)`` first fits the image to the size rendered (Lanczos, as
:func:`ldm.editing.fit_to_size`), then detects, so edges stay one pixel wide and nothing is
resampled afterwards: sd-webui-controlnet's "pixel perfect" mode, where the detection
resolution is the render size.

Pixel values: the references work on uint8 pictures; float images are rounded to the nearest
of the 256 levels first (exact for pictures read from 8-bit files).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import cv2
import numpy as np

from .editing import ImageInput, fit_to_size, load_image
from .validation import SIZE_FACTOR, check_int, check_seed, check_side

DEFAULT_LOW = 100  # ControlNet's gradio_canny2image and sd-webui-controlnet's "Low Threshold"
DEFAULT_HIGH = 200  # ... and "High Threshold"
DEFAULT_THRESHOLD = 127  # gradio_scribble2image's 127; the extension's threshold default
MAX_LEVEL = 255  # thresholds are uint8 levels, the reference sliders' range
SHUFFLE_CELL = 256  # ContentShuffleDetector's default f: the flow field's grid step in pixels
IMAGE_NAME = "control image"


def as_hint(image: ImageInput) -> np.ndarray:
    """A ready-made hint (depth map, pose skeleton, ...) as float32 H×W×3 in [0, 1], unchanged."""
    return _load(image)


def canny(image: ImageInput, low: int = DEFAULT_LOW, high: int = DEFAULT_HIGH) -> np.ndarray:
    """Canny edges of ``image``: white (1.0) one-pixel edges on black (0.0), three equal channels.

    ``low``, ``high``: integer hysteresis thresholds in 0..255 with ``low <= high`` (see the
    module docstring). Lower values find more edges.
    """
    low, high = check_int(low, "low", 0, MAX_LEVEL), check_int(high, "high", 0, MAX_LEVEL)
    if low > high:
        raise ValueError(f"canny thresholds must satisfy low <= high (both 0..{MAX_LEVEL}), got low={low}, "
                         f"high={high}")
    edges = cv2.Canny(_levels(_load(image)), low, high)
    return _white_where(edges > 0)


def scribble(image: ImageInput, threshold: int = DEFAULT_THRESHOLD) -> np.ndarray:
    """A sketch drawn dark on light as white strokes on black: white where the darkest channel
    (uint8 level) is below ``threshold`` (0..255), black elsewhere."""
    threshold = check_int(threshold, "threshold", 0, MAX_LEVEL)
    return _white_where(_levels(_load(image)).min(axis=2) < threshold)


def threshold(image: ImageInput, threshold: int = DEFAULT_THRESHOLD) -> np.ndarray:
    """Binarise without inverting: white where the darkest channel (uint8 level) is above
    ``threshold`` (0..255), black elsewhere; for strokes already light on dark."""
    threshold = check_int(threshold, "threshold", 0, MAX_LEVEL)
    return _white_where(_levels(_load(image)).min(axis=2) > threshold)


def shuffle(image: ImageInput, seed: int = 0) -> np.ndarray:
    """Content shuffle: ``image`` warped by a smooth random flow drawn from ``seed``
    (0..2**32-1); the same seed gives the same picture."""
    rng = np.random.RandomState(check_seed(seed))
    pixels = _levels(_load(image))
    height, width = pixels.shape[:2]
    # x before y, as the reference draws them.
    flow_x = _noise_disk(rng, height, width) * float(width - 1)
    flow_y = _noise_disk(rng, height, width) * float(height - 1)
    flow = np.stack([flow_x, flow_y], axis=2).astype(np.float32)
    return cv2.remap(pixels, flow, None, cv2.INTER_LINEAR).astype(np.float32) / 255.0


PREPROCESSORS: dict[str, Callable[..., np.ndarray]] = {
    "none": as_hint,
    "canny": canny,
    "scribble": scribble,
    "threshold": threshold,
    "shuffle": shuffle,
}


def parameters(name: str) -> dict[str, Any]:
    """The parameters of preprocessor ``name`` with their defaults, e.g. ``{"low": 100, "high": 200}``."""
    signature = inspect.signature(_lookup(name))
    return {key: p.default for key, p in list(signature.parameters.items())[1:]}


def preprocess(name: str, image: ImageInput, *, size: tuple[int, int] | None = None,
               **params: Any) -> np.ndarray:
    """The hint of preprocessor ``name`` (a key of :data:`PREPROCESSORS`) for ``image``.

    ``size``: ``(width, height)``, multiples of 8: the image is fitted to it before detection
    (the render size; see the module docstring). ``params``: that preprocessor's parameters
    (:func:`parameters`); any other name raises ValueError listing the valid ones.
    """
    function = _lookup(name)
    valid = parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        takes = ", ".join(valid) if valid else "no parameters"
        raise ValueError(f"preprocessor {name!r} takes {takes}; got {', '.join(unknown)}")
    pixels = _load(image)
    if size is not None:
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise ValueError(f"size must be (width, height), got {size!r}")
        width, height = check_side(size[0], "width"), check_side(size[1], "height")
        pixels = fit_to_size(pixels, width, height, IMAGE_NAME)
    return function(pixels, **params)


def _lookup(name: str) -> Callable[..., np.ndarray]:
    if not isinstance(name, str) or name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}; valid: {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[name]


def _load(image: ImageInput) -> np.ndarray:
    pixels = load_image(image, IMAGE_NAME)
    height, width = pixels.shape[:2]
    if height < SIZE_FACTOR or width < SIZE_FACTOR:
        raise ValueError(f"{IMAGE_NAME} is {width}x{height}: it must be at least {SIZE_FACTOR} pixels on each "
                         "side (the smallest size ldm renders)")
    return pixels


def _levels(pixels: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 levels, nearest (exact round trip for 8-bit pictures)."""
    return np.rint(pixels * 255.0).astype(np.uint8)


def _white_where(mask: np.ndarray) -> np.ndarray:
    return np.repeat(mask[:, :, None], 3, axis=2).astype(np.float32)


def _noise_disk(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """ContentShuffleDetector's ``make_noise_disk`` (one channel, f=256): uniform noise on a grid
    one cell larger than the image on every side, upscaled bicubically, cropped, scaled to [0, 1]."""
    cell = SHUFFLE_CELL
    noise = rng.uniform(low=0, high=1, size=(height // cell + 2, width // cell + 2))
    noise = cv2.resize(noise, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    noise = noise[cell:cell + height, cell:cell + width]
    noise = noise - noise.min()
    return noise / noise.max()
