"""ldm.editing, the model-free pieces of img2img, inpainting and outpainting: reading images
and masks (with clear errors), the size rule, the overlay feather, the only-masked box and
the outpainting canvas, checked against diffusers' image processor and scipy where they
define the same thing."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter1d

from diffusers.image_processor import VaeImageProcessor
from ldm import editing
from ldm.editing import (
    crop_resize, default_size, extend, feather_alpha, feather_overlay, fit_to_size, load_image, load_mask,
    mask_box, paste_back,
)


def _rgb(seed: int = 0, h: int = 32, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def _box_mask(h: int = 64, w: int = 64, box: tuple[int, int, int, int] = (20, 10, 36, 30)) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((h, w), np.float32)
    mask[y0:y1, x0:x1] = 1
    return mask


# --- load_image -------------------------------------------------------------------------


def test_pil_images_of_any_mode_become_rgb_floats():
    rgb = Image.fromarray((_rgb() * 255).astype(np.uint8))
    assert np.array_equal(load_image(rgb), np.asarray(rgb, np.float32) / 255)
    for mode in ("L", "P", "CMYK", "1", "LA", "I;16"):
        out = load_image(rgb.convert(mode))
        assert out.shape == (32, 48, 3) and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1


def test_transparency_is_composited_onto_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    out = load_image(image)
    assert np.array_equal(out[1, 1], [1, 1, 1]) and np.array_equal(out[0, 0], [1, 0, 0])
    assert np.allclose(out[0, 1], 127 / 255, atol=1 / 255)


def test_paths_are_read(tmp_path):
    pixels = (_rgb() * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    assert np.array_equal(load_image(tmp_path / "in.png"), pixels / np.float32(255))
    assert np.array_equal(load_image(str(tmp_path / "in.png")), pixels / np.float32(255))


def test_bad_paths_name_the_input_and_the_path(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(FileNotFoundError, match=f"mask {tmp_path}/missing.png: No such file"):
        load_image(tmp_path / "missing.png", name="mask")
    for path, words in ((tmp_path, "is a folder"), (text, "not an image"), (truncated, "damaged image")):
        with pytest.raises(ValueError, match=words) as err:
            load_image(path)
        assert str(err.value).startswith(f"image {path}: ")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="pipe"):
        load_image(fifo)


def test_arrays_are_checked():
    assert load_image(_rgb()).dtype == np.float32
    assert np.array_equal(load_image(np.full((2, 2, 3), 255, np.uint8)), np.ones((2, 2, 3), np.float32))
    bad = {"NaN": np.full((4, 4, 3), np.nan), "in \\[0, 1\\]": np.full((4, 4, 3), 1.5),
           "H×W×3": np.zeros((4, 4)), "dtype int64": np.zeros((4, 4, 3), np.int64), "empty": np.zeros((0, 4, 3))}
    for words, array in bad.items():
        with pytest.raises(ValueError, match=words):
            load_image(array)
    with pytest.raises(TypeError, match="image must be a PIL image, a path or an H×W×3 array, got int"):
        load_image(3)


# --- load_mask --------------------------------------------------------------------------


def test_masks_read_as_luma_like_pil_l():
    rgb = (_rgb(1) * 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255
    assert np.array_equal(load_mask(Image.fromarray(rgb), (48, 32)), expected)
    assert np.abs(load_mask(rgb, (48, 32)) - expected).max() <= 1 / 255 + 1e-6
    assert load_mask(np.ones((32, 48), bool), (48, 32)).sum() == 32 * 48
    assert load_mask(np.ones((32, 48, 1), np.float32), None).shape == (32, 48)


def test_a_transparent_mask_is_read_from_its_alpha():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.putpixel((2, 3), (0, 0, 0, 255))
    image.putpixel((4, 3), (0, 0, 0, 100))  # under AUTOMATIC1111's threshold of 128
    mask = load_mask(image, (8, 8))
    assert mask[3, 2] == 1 and mask.sum() == 1


def test_mask_errors(tmp_path):
    with pytest.raises(ValueError, match=r"mask is 10x8 but the image is 12x8 \(width x height\)"):
        load_mask(np.zeros((8, 10)), (12, 8))
    with pytest.raises(ValueError, match="shape"):
        load_mask(np.zeros(10), (10, 1))
    (tmp_path / "m.png").write_text("hello")
    with pytest.raises(ValueError, match=f"mask {tmp_path}/m.png: not an image"):
        load_mask(tmp_path / "m.png", (8, 8))
    with pytest.raises(TypeError, match="mask must be"):
        load_mask({"a": 1}, (8, 8))


# --- sizes ------------------------------------------------------------------------------


def test_default_size_rounds_down_like_diffusers():
    processor = VaeImageProcessor()
    for w, h in ((512, 512), (513, 300), (67, 9), (8, 8)):
        height, width = processor.get_default_height_width(Image.new("RGB", (w, h)))
        assert default_size(w, h) == (width, height)
    with pytest.raises(ValueError, match="at least 8 pixels"):
        default_size(7, 64)


def _smooth(h: int, w: int) -> np.ndarray:
    """A picture-like uint8 image (Lanczos on noise overshoots, and 8-bit Pillow clips between passes)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    planes = [np.sin(3 * x + 1) * np.cos(2 * y), np.cos(4 * x * y), np.sin(5 * y + x)]
    return np.round((np.stack(planes, axis=2) + 1) * 127.5).astype(np.uint8)


def test_fit_to_size_resizes_with_lanczos_and_says_so(caplog):
    pixels = _smooth(32, 48)
    image = pixels / np.float32(255)
    assert fit_to_size(image, 48, 32) is image
    with caplog.at_level(logging.INFO, logger="ldm"):
        out = fit_to_size(image, 40, 24)
    assert "resizing the image from 48x32 to 40x24 (Lanczos)" in caplog.text
    reference = np.asarray(Image.fromarray(pixels).resize((40, 24), Image.Resampling.LANCZOS)) / 255
    assert out.shape == (24, 40, 3) and np.abs(out - reference).max() <= 1.5 / 255


def test_a_resized_mask_is_binarized_like_diffusers():
    mask = _box_mask(30, 30, (7, 5, 19, 22))
    out = fit_to_size(mask, 64, 64, name="mask")
    assert set(np.unique(out)) == {0.0, 1.0}
    reference = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True).preprocess(
        Image.fromarray((mask * 255).astype(np.uint8)), 64, 64)[0, 0].numpy()
    assert (out != reference).mean() < 0.01  # float vs 8-bit Lanczos: at most a few edge pixels


# --- overlay ----------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1, 4, 11])
def test_the_blur_is_opencv_gaussian_blur(sigma):
    mask = _box_mask()
    # scipy's "mirror" is OpenCV's default border; truncate 2.5 gives AUTOMATIC1111's kernel size.
    reference = gaussian_filter1d(gaussian_filter1d(mask.astype(np.float64), sigma, axis=1, mode="mirror",
                                                    truncate=2.5), sigma, axis=0, mode="mirror", truncate=2.5)
    assert np.abs(editing.gaussian_blur(mask, sigma) - reference).max() < 1e-6


def test_the_overlay_keeps_the_original_exactly_outside_the_feather():
    original, generated, mask = _rgb(3, 64, 64), _rgb(4, 64, 64), _box_mask()
    out = feather_overlay(original, generated, mask, 4)
    alpha = feather_alpha(mask, 4)
    assert np.array_equal(out[alpha == 0], original[alpha == 0])
    assert np.array_equal(out[mask == 1], generated[mask == 1])  # the masked area is fully repainted
    reach = int(2.5 * 4 + 0.5)  # the kernel's radius: nothing farther from the mask is touched
    far = np.ones_like(mask, bool)
    far[max(10 - reach, 0):30 + reach, max(20 - reach, 0):36 + reach] = False
    assert np.array_equal(out[far], original[far])
    feathered = (alpha > 0) & (alpha < 1)
    assert feathered.any() and not (feathered & (mask == 1)).any()  # the feather lies outside the mask


def test_no_blur_is_a_hard_edge_and_bad_inputs_are_refused():
    original, generated, mask = _rgb(3, 64, 64), _rgb(4, 64, 64), _box_mask()
    out = feather_overlay(original, generated, mask, 0)
    assert np.array_equal(out, np.where(mask[:, :, None] == 1, generated, original))
    with pytest.raises(ValueError, match="one size"):
        feather_overlay(original, generated[:32], mask, 4)
    with pytest.raises(ValueError, match="mask_blur"):
        feather_overlay(original, generated, mask, -1)


# --- only the masked region -------------------------------------------------------------


def test_mask_box_is_diffusers_get_crop_region():
    rng = np.random.default_rng(5)
    for _ in range(40):
        h, w = rng.integers(16, 96, size=2)
        x0, y0 = rng.integers(0, w - 2), rng.integers(0, h - 2)
        box = (x0, y0, rng.integers(x0 + 1, w), rng.integers(y0 + 1, h))
        mask = _box_mask(h, w, box)
        pad, width, height = int(rng.integers(0, 40)), int(rng.choice([64, 96])), int(rng.choice([64, 128]))
        expected = VaeImageProcessor.get_crop_region(Image.fromarray((mask * 255).astype(np.uint8)),
                                                     width, height, pad=pad)
        assert mask_box(mask, pad, width, height) == expected, (box, pad, width, height)


def test_an_empty_mask_gives_the_whole_picture(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm"):
        assert mask_box(np.zeros((40, 24)), 8, 64, 64) == (0, 0, 24, 40)
    assert "empty" in caplog.text


def test_crop_resize_and_paste_back():
    original, mask = _rgb(6, 96, 128), _box_mask(96, 128, (40, 30, 60, 50))
    box = mask_box(mask, 8, 64, 64)
    x0, y0, x1, y1 = box
    crop = crop_resize(original, box, 64, 64)
    mask_crop = crop_resize(mask, box, 64, 64)
    assert crop.shape == (64, 64, 3) and mask_crop.shape == (64, 64) and set(np.unique(mask_crop)) == {0, 1}
    out = paste_back(original, _rgb(7, 64, 64), box, mask, 4)
    outside = np.ones(mask.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(out[outside], original[outside])
    alpha = feather_alpha(mask, 4)
    assert np.array_equal(out[alpha == 0], original[alpha == 0])
    # The crop goes back where it came from: pasting the crop itself changes little.
    back = paste_back(original, crop, box, mask, 0)
    assert np.abs(back - original)[mask == 1].mean() < 0.1
    with pytest.raises(ValueError, match="box"):
        crop_resize(original, (10, 10, 5, 20), 64, 64)


def test_crop_resize_fills_like_diffusers():
    pixels = _smooth(40, 64)
    ours = crop_resize(pixels / np.float32(255), (0, 0, 64, 40), 64, 64)
    theirs = np.asarray(VaeImageProcessor().resize(Image.fromarray(pixels), 64, 64, resize_mode="fill")) / 255
    assert np.abs(ours - theirs).max() <= 2 / 255


# --- outpainting ------------------------------------------------------------------------


def test_extend_builds_the_canvas_and_its_mask():
    pixels = (_rgb(9, 64, 64) * 255).astype(np.uint8)
    canvas, mask = extend(Image.fromarray(pixels), right=32, overlap=8)
    assert (canvas.mode, mask.mode, canvas.size, mask.size) == ("RGB", "L", (96, 64), (96, 64))
    c, m = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(c[:, :64], pixels)  # the old image, exactly
    assert (m[:, 56:] == 255).all() and (m[:, :56] == 0).all()  # the new area and 8 px of overlap
    assert np.array_equal(c[:, 64:], np.repeat(pixels[:, -1:], 32, axis=1))  # "edge" repeats the border


def test_margins_round_up_to_multiples_of_8(caplog):
    with caplog.at_level(logging.INFO, logger="ldm"):
        canvas, mask = extend(_rgb(0, 60, 50), left=5, bottom=17)
    assert canvas.size == (64, 88) and canvas.size[0] % 8 == 0 and canvas.size[1] % 8 == 0
    assert "rounded" in caplog.text
    assert editing.rounded_margins((50, 60), (5, 0, 0, 17)) == (14, 0, 0, 28)  # the sizes batch plans with
    m = np.asarray(mask)
    # left 5 -> 8, +6 so that 50 + 14 = 64; bottom 17 -> 24, +4 so that 60 + 28 = 88; 8 px overlap
    assert (m[:, :22] == 255).all() and (m[:52, 22:] == 0).all() and (m[52:] == 255).all()


def test_fills():
    pixels = _rgb(10, 32, 32)
    new = np.s_[:, 32:]
    color = np.asarray(extend(pixels, right=16, fill="color")[0]) / 255
    assert np.abs(color[new] - pixels.mean(axis=(0, 1))).max() <= 0.5 / 255 + 1e-6
    noise = [np.asarray(extend(pixels, right=16, fill="noise", seed=s)[0]) for s in (1, 1, 2)]
    assert np.array_equal(noise[0], noise[1]) and not np.array_equal(noise[0], noise[2])
    blurred = np.asarray(extend(pixels, right=16, fill="blur")[0], np.float32) / 255
    edge = np.asarray(extend(pixels, right=16, fill="edge")[0], np.float32) / 255
    assert blurred[new].std(axis=0).mean() < edge[new].std(axis=0).mean()  # smoother along the border
    for fill in editing.FILLS:
        assert np.array_equal(np.asarray(extend(pixels, right=16, fill=fill)[0])[:, :32],
                              np.round(pixels * 255).astype(np.uint8))


@pytest.mark.parametrize("margins, words", [
    ((-8, 0, 0, 0), "left must be an integer >= 0"), ((0, 0, 0, 0), "at least one margin"),
    ((0, 1.5, 0, 0), "top must be an integer"),
])
def test_bad_margins_are_refused(margins, words):
    with pytest.raises(ValueError, match=words):
        extend(_rgb(), *margins)


def test_bad_fill_and_overlap_are_refused():
    with pytest.raises(ValueError, match="unknown fill 'smear'; valid fills: edge, blur, noise, color"):
        extend(_rgb(), right=8, fill="smear")
    with pytest.raises(ValueError, match="overlap"):
        extend(_rgb(), right=8, overlap=-1)
