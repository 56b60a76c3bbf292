"""The pixel side of an editing call: inputs checked and sized before any work, and
the decoded pictures finished (unmasked pixels kept, "only masked" crops pasted back).

Size rule: ``width`` / ``height`` default to the first image's size rounded down to
multiples of 8 (diffusers' ``VaeImageProcessor``); every image and mask that differs
from the size it renders at is resized to it (:func:`ldm.editing.fit_to_size`, which
logs it). With ``mask_padding`` the mask's bounding box plus that many pixels of
context renders at ``width`` x ``height`` (the model's native size unless given) and
is pasted back into the picture at its own size (A1111's "inpaint only masked").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import editing
from . import validation as check

GREY = 0.5  # a 9-channel model's txt2img input: a blank image under a full mask (A1111)
IMAGE_STRENGTH = 0.75  # diffusers' img2img default
MASK_STRENGTH = 1.0  # diffusers' inpainting default


@dataclass(frozen=True)
class EditRequest:
    """A checked edit, one entry per prompt, arrays at the render size (``width`` x ``height``).

    ``originals`` / ``full_masks`` / ``boxes`` are set with ``mask_padding``: the pictures
    at their own size and the crop box of each, for pasting back.
    """

    images: list[np.ndarray]
    masks: list[np.ndarray | None]
    strength: float
    width: int
    height: int
    keep_unmasked: bool = True
    mask_blur: int = editing.DEFAULT_MASK_BLUR
    mask_padding: int | None = None
    user_mask: bool = True
    txt2img: bool = False
    originals: list[np.ndarray] | None = None
    full_masks: list[np.ndarray] | None = None
    boxes: list[tuple[int, int, int, int]] | None = None

    @property
    def from_image(self) -> bool:
        """Sampling starts from the image noised to the first step's level; diffusers'
        inpainting pipeline starts from pure noise at strength 1, its img2img never."""
        return self.strength < 1 or not self.user_mask

    def repeat(self, times: int) -> "EditRequest":
        """Each prompt's entries ``times`` times (``num_images`` per prompt)."""
        lists = ("images", "masks", "originals", "full_masks", "boxes")
        return dataclasses.replace(self, **{name: _repeat(getattr(self, name), times) for name in lists})

    def params(self) -> dict[str, Any]:
        """What Generation.params records (``None`` for a 9-channel model's txt2img); the mask
        settings only when the user gave a mask, as A1111 writes them only for inpainting."""
        if self.txt2img:
            return dict(strength=None, mask_blur=None, mask_padding=None)
        masked = self.user_mask and any(m is not None for m in self.masks)
        return dict(strength=self.strength, mask_blur=self.mask_blur if masked else None,
                    mask_padding=self.mask_padding if masked else None)

    def finish(self, arrays: np.ndarray) -> list[np.ndarray]:
        """Decoded pictures (N x H x W x 3 in [0, 1]) as the call returns them."""
        return [self._finish_one(k, a) for k, a in enumerate(arrays)]

    def _finish_one(self, k: int, generated: np.ndarray) -> np.ndarray:
        mask = self.masks[k]
        if self.boxes is not None:
            keep = self.full_masks[k] if self.keep_unmasked else np.ones_like(self.full_masks[k])
            return editing.paste_back(self.originals[k], generated, self.boxes[k], keep, self.mask_blur)
        if mask is None or not self.keep_unmasked or not self.user_mask:
            return generated
        return editing.feather_overlay(self.images[k], generated, mask, self.mask_blur)


def plan_edit(
    image: Any, mask: Any, strength: Any, *, count: int, width: int | None, height: int | None,
    native: int, inpainting_model: bool, keep_unmasked: bool = True, mask_blur: Any = editing.DEFAULT_MASK_BLUR,
    mask_padding: Any = None,
) -> EditRequest | None:
    """Check and load an edit's inputs for ``count`` prompts; ``None`` for plain txt2img.

    Raises ValueError before any work for: a mask or strength without an image, a
    strength outside (0, 1], an unreadable image or mask, an image and mask of
    different sizes, a list of images or masks whose length is not the prompts'.
    """
    if image is None:
        for name, value in (("mask", mask), ("strength", strength), ("mask_padding", mask_padding)):
            if value is not None:
                raise ValueError(f"{name} needs an image to edit (image=...)")
        if not inpainting_model:
            return None
        return _blank(count, width or native, height or native)
    blur = check.check_int(mask_blur, "mask_blur", 0)
    padding = None if mask_padding is None else check.check_int(mask_padding, "mask_padding", 0)
    if padding is not None and mask is None:
        raise ValueError("mask_padding renders only the masked region: it needs a mask")
    default = MASK_STRENGTH if mask is not None else IMAGE_STRENGTH
    strength = check.check_strength(default if strength is None else strength)
    images = [editing.load_image(v, _name("image", k, image)) for k, v in enumerate(_per_prompt(image, count, "image"))]
    masks = _load_masks(mask, images, count)
    base = dict(strength=strength, keep_unmasked=bool(keep_unmasked), mask_blur=blur, mask_padding=padding,
                user_mask=mask is not None)
    if mask is None and inpainting_model:
        # A1111's img2img with an inpainting model: a full mask; the image latents are
        # where sampling starts.
        masks = [np.ones(a.shape[:2], dtype=np.float32) for a in images]
    if padding is not None:
        return _crops(images, masks, padding, width or native, height or native, base)
    width, height = _render_size(images[0], width, height)
    return EditRequest([editing.fit_to_size(a, width, height) for a in images],
                       [None if m is None else editing.fit_to_size(m, width, height, "mask") for m in masks],
                       width=width, height=height, **base)


def _blank(count: int, width: int, height: int) -> EditRequest:
    width, height = check.check_side(width, "width"), check.check_side(height, "height")
    image = np.full((height, width, 3), GREY, dtype=np.float32)
    mask = np.ones((height, width), dtype=np.float32)
    return EditRequest([image] * count, [mask] * count, MASK_STRENGTH, width, height, keep_unmasked=False,
                       txt2img=True)


def _repeat(values: list[Any] | None, times: int) -> list[Any] | None:
    return None if values is None else [v for v in values for _ in range(times)]


def _per_prompt(value: Any, count: int, name: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) == 1:
        return list(value) * count
    if len(value) != count:
        raise ValueError(f"{name} is a list of {len(value)} but there are {count} prompts; "
                         f"give one {name}, or one per prompt")
    return list(value)


def _name(name: str, k: int, value: Any) -> str:
    return f"{name}[{k}]" if isinstance(value, (list, tuple)) else name


def _load_masks(mask: Any, images: list[np.ndarray], count: int) -> list[np.ndarray | None]:
    if mask is None:
        return [None] * count
    values = _per_prompt(mask, count, "mask")
    return [editing.load_mask(v, (a.shape[1], a.shape[0]), _name("mask", k, mask))
            for k, (v, a) in enumerate(zip(values, images))]


def _render_size(image: np.ndarray, width: int | None, height: int | None) -> tuple[int, int]:
    default_w, default_h = editing.default_size(image.shape[1], image.shape[0])
    return (check.check_side(default_w if width is None else width, "width"),
            check.check_side(default_h if height is None else height, "height"))


def _crops(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], padding: int, width: int, height: int,
           base: dict[str, Any]) -> EditRequest:
    width, height = check.check_side(width, "width"), check.check_side(height, "height")
    boxes = [editing.mask_box(m, padding, width, height) for m in masks]
    return EditRequest(
        [editing.crop_resize(a, b, width, height) for a, b in zip(images, boxes)],
        [editing.crop_resize(m, b, width, height) for m, b in zip(masks, boxes)],
        width=width, height=height, originals=list(images), full_masks=list(masks), boxes=boxes, **base,
    )
