"""Editing inputs of ``Pipeline.generate``: clear errors before any work, the documented
size rule, masks off the latent grid, "only masked" crops, and 9-channel models
called without an image."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm.edit_latents import latent_mask
from reference import SD1_INPAINT_TINY, save_inpaint_folder

SIZE = 64


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder, device="cpu")


@pytest.fixture(scope="module")
def inpaint_pipe(tmp_path_factory):
    folder = save_inpaint_folder(SD1_INPAINT_TINY, tmp_path_factory.mktemp("inpaint") / "model", seed=3)
    return Pipeline.from_pretrained(folder, device="cpu")


@pytest.fixture
def no_work(pipe, monkeypatch):
    """The pipeline with its text encoder, VAE encoder and U-Net refusing to run: an error
    raised under it came before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(pipe, "encode_prompts", refuse)
    monkeypatch.setattr(pipe.vae, "encode", refuse)
    monkeypatch.setattr(pipe, "_unet_call", refuse)
    return pipe


def picture(width: int = SIZE, height: int = SIZE) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0 * x], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def box_mask(width: int = SIZE, height: int = SIZE, box=(16, 16, 48, 48)) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask, "L")


def _run(pipe, prompt="a cat", **kwargs):
    kwargs = {"steps": 2, "output": "np", "progress": False, "seed": 0, "sampler": "euler", **kwargs}
    return pipe.generate(prompt, **kwargs)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"mask": box_mask(48, SIZE)}, ValueError, "mask is 48x64 but the image is 64x64"),
    ({"mask": np.zeros((SIZE, SIZE, 5))}, ValueError, "mask"),
    ({"mask": {"not": "a picture"}}, TypeError, "mask"),
    ({"strength": 0}, ValueError, r"strength must be in \(0, 1\]"),
    ({"strength": 1.5}, ValueError, r"strength must be in \(0, 1\]"),
    ({"strength": float("nan")}, ValueError, "strength must be a finite number"),
    ({"strength": 0.2}, ValueError, "runs no step"),
    ({"mask_blur": -1}, ValueError, "mask_blur"),
    ({"mask_padding": 8}, ValueError, "needs a mask"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, ValueError, "latents cannot be given"),
    ({"width": 60}, ValueError, "multiple of 8"),
])
def test_bad_edit_arguments_fail_before_any_work(no_work, kwargs, error, message):
    with pytest.raises(error, match=message):
        _run(no_work, image=picture(), **kwargs)


def test_mask_or_strength_without_image(no_work):
    with pytest.raises(ValueError, match="mask needs an image"):
        _run(no_work, mask=box_mask())
    with pytest.raises(ValueError, match="strength needs an image"):
        _run(no_work, strength=0.5)


def test_missing_and_unreadable_image_paths(no_work, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        _run(no_work, image=str(missing))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a picture")
    with pytest.raises(ValueError, match="garbage.png"):
        _run(no_work, image=garbage)
    with pytest.raises(ValueError, match="garbage.png"):
        _run(no_work, image=picture(), mask=garbage)


def test_list_of_images_must_match_the_prompts(no_work):
    with pytest.raises(ValueError, match="image is a list of 3 but there are 2 prompts"):
        _run(no_work, prompt=["a", "b"], image=[picture()] * 3)
    with pytest.raises(ValueError, match="mask is a list of 3 but there are 2 prompts"):
        _run(no_work, prompt=["a", "b"], image=picture(), mask=[box_mask()] * 3)


def test_size_defaults_to_the_image_rounded_down_to_8(pipe, caplog):
    with caplog.at_level(logging.INFO, logger="ldm"):
        gen = _run(pipe, image=picture(70, 60))
    assert gen.images.shape == (1, 56, 64, 3)
    assert (gen.params["width"], gen.params["height"]) == (64, 56)
    assert "resizing the image from 70x60 to 64x56" in caplog.text


def test_width_and_height_resize_the_image_and_mask(pipe, caplog):
    with caplog.at_level(logging.INFO, logger="ldm"):
        gen = _run(pipe, image=picture(), mask=box_mask(), width=48, height=SIZE)
    assert gen.images.shape == (1, SIZE, 48, 3)
    assert "resizing the mask from 64x64 to 48x64" in caplog.text


def test_params_record_the_edit(pipe):
    edit = _run(pipe, image=picture(), mask=box_mask(), mask_blur=2)
    assert {k: edit.params[k] for k in ("strength", "mask_blur", "mask_padding")} == \
        {"strength": 1.0, "mask_blur": 2, "mask_padding": None}
    assert _run(pipe, image=picture(), steps=4).params["strength"] == 0.75
    plain = _run(pipe)
    assert plain.params["strength"] is None and plain.params["mask_blur"] is None


def test_latent_mask_keeps_strokes_off_the_grid():
    """A latent cell is repainted when any of its pixels is; on the grid that is diffusers'
    nearest-neighbour rule."""
    stroke = torch.zeros(1, 1, 16, 16)
    stroke[..., 3] = 1  # one pixel wide, off the 8-pixel grid
    assert latent_mask(stroke, 8)[0, 0].tolist() == [[1, 0], [1, 0]]
    aligned = torch.zeros(1, 1, 16, 16)
    aligned[..., 8:, :8] = 1
    nearest = torch.nn.functional.interpolate(aligned, size=(2, 2))
    assert torch.equal(latent_mask(aligned, 8), nearest)


def test_mask_off_the_grid_keeps_unmasked_pixels(pipe):
    image = picture()
    gen = _run(pipe, image=image, mask=box_mask(box=(13, 21, 30, 27)), mask_blur=0)
    original = np.asarray(image, dtype=np.float32) / 255
    outside = np.asarray(box_mask(box=(13, 21, 30, 27))) == 0
    np.testing.assert_array_equal(gen.images[0][outside], original[outside])
    assert np.abs(gen.images[0][21:27, 13:30] - original[21:27, 13:30]).max() > 0.02


def test_only_masked_renders_the_box_and_pastes_it_back(pipe):
    image = picture(128, 128)
    mask = box_mask(128, 128, box=(80, 80, 96, 100))
    gen = _run(pipe, image=image, mask=mask, mask_padding=8, width=SIZE, height=SIZE)
    assert gen.images.shape == (1, 128, 128, 3)
    assert gen.params["mask_padding"] == 8
    original = np.asarray(image, dtype=np.float32) / 255
    np.testing.assert_array_equal(gen.images[0][:64], original[:64])
    assert np.abs(gen.images[0][80:100, 80:96] - original[80:100, 80:96]).max() > 0.02


def test_inpainting_model_without_image_runs_txt2img(inpaint_pipe):
    gen = _run(inpaint_pipe, width=SIZE, height=SIZE, num_images=2)
    assert gen.images.shape == (2, SIZE, SIZE, 3) and gen.images.std() > 0.02
    assert gen.params["strength"] is None


def test_inpainting_model_with_image_alone_varies_it(inpaint_pipe):
    gen = _run(inpaint_pipe, image=picture(), strength=0.5, steps=4)
    assert gen.images.shape == (1, SIZE, SIZE, 3) and gen.params["strength"] == 0.5
