"""The pipeline's handling of user input: clear errors, nothing silent."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ldm import Pipeline


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder, device="cpu")


def _run(pipe, prompt="a cat", **kwargs):
    kwargs = {"steps": 2, "output": "np", "progress": False, "seed": 0, **kwargs}
    return pipe(prompt, **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"width": 60}, "multiple of 8"),
        ({"height": 0}, "multiple of 8"),
        ({"width": 64.0}, "multiple of 8"),
        ({"sampler": "euler_b"}, "dpmpp_2m"),
        ({"guidance_scale": -1}, "between 0 and 100"),
        ({"guidance_scale": float("nan")}, "finite"),
        ({"steps": 0}, ">= 1"),
        ({"steps": 2.5}, ">= 1"),
        ({"num_images": 0}, ">= 1"),
        ({"seed": -3}, ">= 0"),
        ({"schedule": "exponential"}, "karras"),
        ({"output": "jpeg"}, "pil"),
        ({"sampler": "ddim", "schedule": "karras"}, "karras"),
    ],
)
def test_bad_arguments_raise_value_error_naming_valid_values(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _run(pipe, **kwargs)


def test_bad_prompt_types(pipe):
    with pytest.raises(TypeError, match="prompt"):
        _run(pipe, prompt=None)
    with pytest.raises(TypeError, match="prompt"):
        _run(pipe, prompt=[])
    with pytest.raises(ValueError, match="negative_prompt has 3 entries"):
        _run(pipe, prompt=["a", "b"], negative_prompt=["x", "y", "z"])


def test_latents_of_wrong_shape_are_refused(pipe):
    with pytest.raises(ValueError, match="latents must be a tensor of shape"):
        _run(pipe, latents=torch.zeros(1, 4, 4, 4))


def test_missing_shipped_model_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_WEIGHTS", str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(FileNotFoundError, match="shipped model is missing"):
        Pipeline.from_pretrained()


def test_long_prompt_is_chunked_not_cut(pipe, caplog):
    long_prompt = ", ".join(["a red circle on a blue background"] * 20)  # ~140 tokens
    with caplog.at_level(logging.INFO, logger="ldm"):
        long_image = _run(pipe, prompt=long_prompt)
    short_image = _run(pipe, prompt=", ".join(["a red circle on a blue background"] * 5))
    assert long_image.shape == short_image.shape
    # The tokens past the first window reached the model: the image differs.
    assert np.abs(long_image - short_image).max() > 1e-4
    assert any("chunk" in r.getMessage() for r in caplog.records)


def test_random_seed_is_reported_and_reproduces(pipe):
    first = pipe.generate("a cat", steps=2, output="np", progress=False)
    again = pipe.generate("a cat", steps=2, output="np", progress=False, seed=first.seeds[0])
    np.testing.assert_array_equal(first.images, again.images)


def test_num_images_get_consecutive_seeds(pipe):
    gen = pipe.generate(["a", "b"], num_images=2, steps=2, seed=5, output="latent", progress=False)
    assert gen.seeds == [5, 6, 7, 8]
    assert gen.prompts == ["a", "a", "b", "b"]
    assert gen.images.shape[0] == 4


def test_half_precision_nan_decode_is_redone_in_float32(sd1_folder, monkeypatch):
    """A NaN from a half-precision VAE decode must not reach the image."""
    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype=torch.bfloat16)
    real_decode = pipe.vae.decode
    dtypes = []

    def overflowing_decode(z):
        dtypes.append(z.dtype)
        out = real_decode(z)
        return out if z.dtype == torch.float32 else torch.full_like(out, float("nan"))

    monkeypatch.setattr(pipe.vae, "decode", overflowing_decode)
    image = pipe("a cat", steps=2, seed=0, output="np", progress=False)
    assert dtypes == [torch.bfloat16, torch.float32]
    assert np.isfinite(image).all()
    assert pipe.vae.dtype == torch.bfloat16  # back to the pipeline's dtype afterwards
