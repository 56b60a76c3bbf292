"""Image editing pieces that need no model: reading the inputs of img2img, inpainting and
outpainting, fitting them to the size rendered, and joining the result to the original.

Pure numpy/PIL; the pipeline composes them around the sampler. Images travel as float32
arrays H×W×3 in [0, 1], masks as float32 arrays H×W in [0, 1] (white, >= 0.5, is repainted).
Each function validates its input and raises ValueError (TypeError for a wrong kind of
object) with a message naming the input.

Rules, and the reference each follows:

- Transparency: an image with an alpha channel is composited onto white, as
  AUTOMATIC1111 flattens img2img inputs (``images.flatten``, default background #ffffff).
- Masks: ``"L"`` conversion (ITU-R 601 luma) for RGB, as both AUTOMATIC1111 and diffusers
  do; an RGBA mask that is not fully opaque is read from its alpha channel, thresholded at
  128, as AUTOMATIC1111's ``create_binary_mask`` does for painted masks.
- Sizes: the default size is the image's, rounded down to multiples of 8 (diffusers'
  ``VaeImageProcessor.get_default_height_width``); an image of another size is resized with
  Lanczos, a mask with Lanczos then binarized at 0.5 (diffusers' mask processor).
- Overlay: AUTOMATIC1111's ``mask_blur`` feather (see :func:`feather_alpha`).
- Only-masked inpainting: AUTOMATIC1111's ``get_crop_region``/``expand_crop_region``, equal
  to diffusers' ``get_crop_region`` (``padding_mask_crop``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Union

import numpy as np
from PIL import Image, ImageFilter

from .pngmeta import open_image
from .validation import SIZE_FACTOR, check_int, check_margins, check_seed

logger = logging.getLogger("ldm")

ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray]
Box = tuple[int, int, int, int]

BACKGROUND = (255, 255, 255)  # AUTOMATIC1111's img2img_background_color default
FILLS = ("edge", "blur", "noise", "color")
DEFAULT_FILL = "edge"
DEFAULT_MASK_BLUR = 4  # AUTOMATIC1111's default mask_blur
DEFAULT_OVERLAP = 8  # one latent pixel of the old image repainted along the seam
# ITU-R 601-2 luma, the weights of PIL's "L" conversion, for masks given as RGB arrays.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_ALPHA_THRESHOLD = 128  # AUTOMATIC1111's create_binary_mask: alpha > 128 is masked
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit greyscale PNGs open in these modes


# --- reading ----------------------------------------------------------------------------


def load_image(value: ImageInput, name: str = "image") -> np.ndarray:
    """``value`` as float32 H×W×3 in [0, 1].

    ``value``: a PIL image of any mode (alpha composited onto white), a path to an image
    file, or an array H×W×3: float in [0, 1] (NaN and values outside refused) or uint8
    (0..255). A missing path raises FileNotFoundError; a folder, a FIFO or a file that
    is not an image raises ValueError naming ``name`` and the path, without blocking.
    """
    if isinstance(value, Image.Image):
        return _pil_rgb(value)
    if isinstance(value, (str, os.PathLike)):
        return _read(value, name, _pil_rgb)
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 3:
            raise ValueError(f"{name} must be an array H×W×3 (RGB), got shape {value.shape}")
        return _unit_array(value, name)
    raise TypeError(f"{name} must be a PIL image, a path or an H×W×3 array, got {type(value).__name__}")


def load_mask(value: ImageInput, size: tuple[int, int] | None, name: str = "mask") -> np.ndarray:
    """``value`` as float32 H×W in [0, 1]; white (>= 0.5) is repainted.

    ``value``: a PIL image (RGB read as luma, an RGBA with transparency by its alpha), a
    path, or an array H×W, H×W×1 or H×W×3 (float in [0, 1], uint8 or bool). ``size``:
    ``(width, height)`` of the image it goes with; another size raises ValueError with both.
    """
    if isinstance(value, Image.Image):
        mask = _pil_mask(value)
    elif isinstance(value, (str, os.PathLike)):
        mask = _read(value, name, _pil_mask)
    elif isinstance(value, np.ndarray):
        mask = _mask_array(value, name)
    else:
        raise TypeError(f"{name} must be a PIL image, a path or an H×W array, got {type(value).__name__}")
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        raise ValueError(f"{name} is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]} "
                         "(width x height): give a mask of the image's size")
    return mask


def _read(path: str | os.PathLike, name: str, convert: Any) -> np.ndarray:
    try:
        with open_image(path) as image:
            image.load()
            return convert(image)
    except OSError as exc:  # missing, unreadable: the path and the reason, named by ``name``
        raise type(exc)(f"{name} {os.fsdecode(path)}: {exc.strerror or exc}") from None
    except ValueError as exc:  # the message starts with the path
        raise ValueError(f"{name} {exc}") from None


def _pil_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT:
        grey = _sixteen_bit(image)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.has_transparency_data:
        flat = Image.new("RGBA", image.size, BACKGROUND)
        flat.alpha_composite(image.convert("RGBA"))
        image = flat
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _pil_mask(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT:
        return _sixteen_bit(image)
    if image.mode == "RGBA" and image.getextrema()[3] != (255, 255):
        return (np.asarray(image.getchannel("A")) > _ALPHA_THRESHOLD).astype(np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _sixteen_bit(image: Image.Image) -> np.ndarray:
    return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)


def _mask_array(value: np.ndarray, name: str) -> np.ndarray:
    if value.ndim == 3 and value.shape[2] in (1, 3):
        rgb = _unit_array(value, name)
        return rgb[:, :, 0] if rgb.shape[2] == 1 else rgb @ _LUMA
    if value.ndim != 2:
        raise ValueError(f"{name} must be an array H×W, H×W×1 or H×W×3, got shape {value.shape}")
    return _unit_array(value, name)


def _unit_array(value: np.ndarray, name: str) -> np.ndarray:
    """uint8 (0..255), bool, or float in [0, 1], as float32 in [0, 1]."""
    if value.shape[0] < 1 or value.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {value.shape})")
    if value.dtype == np.uint8:
        return value.astype(np.float32) / 255.0
    if value.dtype == np.bool_:
        return value.astype(np.float32)
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"{name} must be a float array in [0, 1] or uint8, got dtype {value.dtype}")
    if not np.isfinite(value).all():
        raise ValueError(f"{name} has NaN or infinite values")
    low, high = float(value.min()), float(value.max())
    if low < 0 or high > 1:
        raise ValueError(f"{name} values must be in [0, 1], got {low:g} to {high:g}")
    return value.astype(np.float32)


# --- sizes ------------------------------------------------------------------------------


def default_size(width_px: int, height_px: int) -> tuple[int, int]:
    """``(width, height)`` rendered for an image of this size when none is given: each side
    rounded down to a multiple of 8 (diffusers' ``get_default_height_width``)."""
    width_px, height_px = check_int(width_px, "image width", 1), check_int(height_px, "image height", 1)
    if width_px < SIZE_FACTOR or height_px < SIZE_FACTOR:
        raise ValueError(f"image is {width_px}x{height_px}: it must be at least {SIZE_FACTOR} pixels "
                         "on each side")
    return width_px - width_px % SIZE_FACTOR, height_px - height_px % SIZE_FACTOR


def fit_to_size(array: np.ndarray, width: int, height: int, name: str = "image") -> np.ndarray:
    """``array`` (an image H×W×3 or a mask H×W) at ``width`` × ``height``.

    The same size: returned as it is. Another size: resized with Lanczos (diffusers'
    default resample) and logged on the ``ldm`` logger; a mask is then binarized at 0.5,
    as diffusers' mask processor does (Lanczos leaves grey, ringing edges).
    """
    width, height = check_int(width, "width", 1), check_int(height, "height", 1)
    if array.shape[:2] == (height, width):
        return array
    logger.info("resizing the %s from %dx%d to %dx%d (Lanczos)", name, array.shape[1], array.shape[0],
                width, height)
    return _binarize_mask(_resize(array, width, height))


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize of float data, channel by channel in Pillow's float mode (no 8-bit rounding)."""
    planes = array[:, :, None] if array.ndim == 2 else array
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(planes[:, :, c], dtype=np.float32))
                      .resize((width, height), Image.Resampling.LANCZOS)) for c in range(planes.shape[2])]
    resized = np.clip(np.stack(out, axis=2), 0.0, 1.0).astype(np.float32)
    return resized[:, :, 0] if array.ndim == 2 else resized


def _binarize_mask(array: np.ndarray) -> np.ndarray:
    return (array >= 0.5).astype(np.float32) if array.ndim == 2 else array


# --- overlay ----------------------------------------------------------------------------


def gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of H×W (or H×W×C) float data, as OpenCV's ``GaussianBlur``
    with AUTOMATIC1111's kernel size ``2 * int(2.5 * sigma + 0.5) + 1`` and OpenCV's default
    border (reflect, edge pixel not repeated)."""
    if sigma <= 0:
        return array
    radius = int(2.5 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-taps * taps / (2 * sigma * sigma))
    kernel /= kernel.sum()
    out = array.astype(np.float64)
    for axis in (1, 0):  # x, then y, as AUTOMATIC1111 applies mask_blur_x then mask_blur_y
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(kernel))
    return out.astype(np.float32)


def feather_alpha(mask: np.ndarray, blur: int) -> np.ndarray:
    """How much of the generated image each pixel takes in the overlay, H×W in [0, 1].

    AUTOMATIC1111's whole-picture inpainting: the mask is blurred by ``blur`` pixels
    (``mask_blur``, a Gaussian of that sigma), kept in 8-bit steps (its mask is an 8-bit
    image, so the Gaussian's far tail is 0), then doubled and clipped, so the feather lies
    outside the mask. Unlike AUTOMATIC1111, never less than the mask itself: its corners and
    thin strokes, which the blur thins below 1/2, are still fully generated. Where the
    result is 0 the overlay keeps the original exactly.
    """
    blur = check_int(blur, "mask_blur", 0)
    levels = np.round(gaussian_blur(mask, blur) * 255.0)
    return np.maximum(np.minimum(levels * 2.0, 255.0) / 255.0, mask).astype(np.float32)


def feather_overlay(original: np.ndarray, generated: np.ndarray, mask: np.ndarray, blur: int) -> np.ndarray:
    """``generated`` inside the (feathered) mask over ``original``: pixels the feathered mask
    leaves at 0 are ``original``'s exactly (AUTOMATIC1111's overlay, ``keep_unmasked``)."""
    _check_same(original, generated, mask)
    return _overlay(original, generated, feather_alpha(mask, blur))


def _overlay(original: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[:, :, None]
    mixed = original * (1.0 - a) + generated * a
    return np.where(a > 0, mixed, original).astype(np.float32)


def _check_same(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> None:
    if original.shape != generated.shape or original.shape[:2] != mask.shape:
        raise ValueError(f"overlay needs the original, the generated image and the mask at one size, got "
                         f"{original.shape}, {generated.shape} and {mask.shape}")


# --- only the masked region -------------------------------------------------------------


def mask_box(mask: np.ndarray, padding: int, width: int, height: int) -> Box:
    """``(x0, y0, x1, y1)``: the box around the mask's non-zero pixels, grown by ``padding``,
    then widened or heightened towards the aspect ratio ``width``:``height`` and shifted to
    stay inside the mask (AUTOMATIC1111's ``get_crop_region`` + ``expand_crop_region``,
    diffusers' ``get_crop_region``). An all-black mask gives the whole picture, as
    AUTOMATIC1111 falls back to whole-picture inpainting.
    """
    padding = check_int(padding, "mask_padding", 0)
    width, height = check_int(width, "width", 1), check_int(height, "height", 1)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    h, w = mask.shape
    if not len(rows):
        logger.warning("the mask is empty (all black): rendering the whole picture")
        return 0, 0, w, h
    x0, y0 = max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0)
    x1, y1 = min(int(cols[-1]) + 1 + padding, w), min(int(rows[-1]) + 1 + padding, h)
    if (x1 - x0) / (y1 - y0) > width / height:
        y0, y1 = _expand(y0, y1, (x1 - x0) / (width / height), h)
    else:
        x0, x1 = _expand(x0, x1, (y1 - y0) * (width / height), w)
    return x0, y0, x1, y1


def _expand(start: int, end: int, desired: float, limit: int) -> tuple[int, int]:
    """One axis of ``expand_crop_region``: grow to ``desired`` around the centre, shift back
    inside ``[0, limit]``, clip what is still outside."""
    diff = int(desired - (end - start))
    start, end = start - diff // 2, end + diff - diff // 2
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def crop_resize(array: np.ndarray, box: Box, width: int, height: int) -> np.ndarray:
    """The ``box`` of ``array`` at ``width`` × ``height``: resized to fit, keeping its aspect,
    the rest filled with its edge pixels (diffusers' ``resize_mode="fill"``, AUTOMATIC1111's
    resize mode 2); a mask is binarized at 0.5 after, as by diffusers' mask processor."""
    x0, y0, x1, y1 = _check_box(box, array.shape)
    crop = array[y0:y1, x0:x1]
    h, w = crop.shape[:2]
    wider = width / height < w / h
    src_w, src_h = (width, h * width // w) if wider else (w * height // h, height)
    top, left = height // 2 - src_h // 2, width // 2 - src_w // 2
    pad = [(top, height - src_h - top), (left, width - src_w - left)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(_binarize_mask(_resize(crop, src_w, src_h)), pad, mode="edge")


def paste_back(original: np.ndarray, generated_crop: np.ndarray, box: Box, mask: np.ndarray,
               blur: int) -> np.ndarray:
    """``generated_crop`` resized into ``box`` of ``original`` and overlaid with the mask's
    feather (:func:`feather_overlay`); outside the box the original is kept exactly.

    The crop is resized to cover the box and its centre kept (diffusers' ``apply_overlay``
    with ``resize_mode="crop"``, AUTOMATIC1111's resize mode 1).
    """
    x0, y0, x1, y1 = _check_box(box, original.shape)
    if original.shape[:2] != mask.shape:
        raise ValueError(f"paste_back needs the mask at the original's size, got {mask.shape} "
                         f"and {original.shape}")
    canvas = original.copy()
    canvas[y0:y1, x0:x1] = _cover(generated_crop, x1 - x0, y1 - y0)
    # The feather may reach past the box (AUTOMATIC1111 takes the box from the blurred
    # mask instead); there is no generated pixel there, so the original stays.
    inside = np.zeros(mask.shape, dtype=bool)
    inside[y0:y1, x0:x1] = True
    return _overlay(original, canvas, np.where(inside, feather_alpha(mask, blur), 0.0))


def _cover(array: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = array.shape[:2]
    wider = width / height > w / h
    src_w, src_h = (width, h * width // w) if wider else (w * height // h, height)
    top, left = src_h // 2 - height // 2, src_w // 2 - width // 2
    return _resize(array, src_w, src_h)[top:top + height, left:left + width]


def _check_box(box: Box, shape: tuple[int, ...]) -> Box:
    x0, y0, x1, y1 = (check_int(v, "box", 0) for v in box)
    if not (x0 < x1 <= shape[1] and y0 < y1 <= shape[0]):
        raise ValueError(f"box {box} is not a non-empty box inside the {shape[1]}x{shape[0]} image")
    return x0, y0, x1, y1


# --- outpainting ------------------------------------------------------------------------


def extend(image: ImageInput, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0, fill: str = DEFAULT_FILL,
           overlap: int = DEFAULT_OVERLAP, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """The outpainting canvas and its mask: ``image`` with margins added, as ``(RGB, "L")``.

    Margins (pixels, >= 0, not all 0) are rounded up to multiples of 8, and the right (bottom)
    one, or the left (top) one if it is the only one, grows further when the image's side is
    not a multiple of 8: the canvas's sides on an extended axis are multiples of 8 and the
    old border sits on the latent grid (:func:`rounded_margins` gives them without drawing).
    The mask is white over the new area and over ``overlap`` pixels of the old image along
    each extended side, so the seam is repainted. ``fill`` seeds the new area: ``edge``
    (border pixels repeated), ``blur`` (repeated, then blurred by a quarter of the largest
    margin), ``noise`` (Gaussian noise of the image's mean and spread per channel, from
    ``seed``), ``color`` (the image's mean colour).
    """
    pixels = load_image(image, "image")
    overlap = check_int(overlap, "overlap", 0)
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; valid fills: {', '.join(FILLS)}")
    h, w = pixels.shape[:2]
    given = (left, top, right, bottom)
    left, top, right, bottom = margins = rounded_margins((w, h), given)
    if margins != given:
        logger.info("outpainting margins %s rounded to %s (left, top, right, bottom): multiples of %d",
                    given, margins, SIZE_FACTOR)
    canvas = _filled(pixels, margins, fill, check_seed(seed))
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    keep = [top + (overlap if top else 0), left + (overlap if left else 0),
            top + h - (overlap if bottom else 0), left + w - (overlap if right else 0)]
    if keep[0] < keep[2] and keep[1] < keep[3]:
        mask[keep[0]:keep[2], keep[1]:keep[3]] = 0
    return _to_pil(canvas), Image.fromarray(mask)


def rounded_margins(size: tuple[int, int], margins: Box) -> Box:
    """The margins :func:`extend` adds to an image of ``size`` (width, height) when asked for
    ``margins`` (left, top, right, bottom), checked; the canvas is ``size`` plus these."""
    left, top, right, bottom = check_margins(*margins)
    left, right = _axis_margins(size[0], left, right)
    top, bottom = _axis_margins(size[1], top, bottom)
    return left, top, right, bottom


def _axis_margins(side: int, before: int, after: int) -> tuple[int, int]:
    if not before and not after:
        return 0, 0
    before, after = (-(-m // SIZE_FACTOR) * SIZE_FACTOR for m in (before, after))
    extra = -(side + before + after) % SIZE_FACTOR
    return (before, after + extra) if after else (before + extra, after)


def _filled(pixels: np.ndarray, margins: Box, fill: str, seed: int) -> np.ndarray:
    left, top, right, bottom = margins
    h, w = pixels.shape[:2]
    canvas = np.pad(pixels, [(top, bottom), (left, right), (0, 0)], mode="edge")
    if fill == "blur":
        radius = max(margins) / 4
        canvas = np.asarray(_to_pil(canvas).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255
    elif fill == "noise":
        rng = np.random.default_rng(seed)
        mean, spread = pixels.mean(axis=(0, 1)), pixels.std(axis=(0, 1))
        canvas = np.clip(rng.normal(mean, spread, canvas.shape), 0.0, 1.0).astype(np.float32)
    elif fill == "color":
        canvas = np.broadcast_to(pixels.mean(axis=(0, 1)), canvas.shape).astype(np.float32)
    canvas[top:top + h, left:left + w] = pixels
    return canvas


def _to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8))
