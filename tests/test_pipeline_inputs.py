"""The pipeline's handling of user input: clear errors, nothing silent.

Non-finite inputs are refused where they enter, NaN during sampling or decoding stops
with the step, memory is planned before allocating, and one conditioning structure
travels from the prompt to the U-Net.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.conditioning import Conditioning
from ldm.limits import MemoryLimitError, decode_bytes, filter_workspace_bytes, plan_batch, unet_bytes_per_row
from ldm.pipeline import NonFiniteError


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


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), 1e308, 101.0, np.float32("nan")])
def test_non_finite_or_absurd_guidance_is_refused(pipe, scale):
    with pytest.raises(ValueError, match="guidance_scale"):
        _run(pipe, guidance_scale=scale)


def test_non_finite_latents_are_refused(pipe):
    shape = (1, 4, 8, 8)
    with pytest.raises(ValueError, match="NaN or inf"):
        _run(pipe, latents=torch.full(shape, float("nan")))


def test_numpy_integers_are_accepted_as_numbers(pipe):
    plain = _run(pipe, width=64, height=64, steps=2, seed=3, num_images=1)
    numpy = _run(pipe, width=np.int64(64), height=np.int32(64), steps=np.int64(2), seed=np.uint32(3),
                 num_images=np.int16(1), guidance_scale=np.float32(7.5))
    np.testing.assert_array_equal(plain, numpy)


def test_sampler_step_limits_are_checked_before_work(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "encode_prompts", lambda *a: pytest.fail("work started"))
    with pytest.raises(ValueError, match="steps=1000 is too many for 'leading' spacing"):
        _run(pipe, sampler="ddim", steps=1000)
    with pytest.raises(ValueError, match="unknown timestep spacing 'even'"):
        _run(pipe, spacing="even")


def test_nan_during_sampling_stops_with_the_step(pipe, monkeypatch):
    real = pipe.unet.forward
    calls = []

    def goes_nan(x, t, context):
        calls.append(1)
        out = real(x, t, context)
        return out if len(calls) < 2 else torch.full_like(out, float("nan"))

    monkeypatch.setattr(pipe.unet, "forward", goes_nan)
    with pytest.raises(NonFiniteError, match=r"step 2 of 3 \(euler\) in image\(s\) \[0, 1\]"):
        _run(pipe, prompt=["a", "b"], steps=3, sampler="euler")


def test_nan_decode_in_float32_is_an_error_not_a_black_image(pipe, monkeypatch):
    monkeypatch.setattr(pipe.vae, "decode", lambda z: torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(NonFiniteError, match="image 0"):
        _run(pipe)


@pytest.mark.parametrize("device,message", [("bogus", "not a device name"), ("cuda:7", "CUDA"),
                                             ("meta", "not supported")])
def test_bad_devices_are_refused_before_loading(device, message, monkeypatch):
    import ldm.pipeline

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    monkeypatch.setattr(ldm.pipeline, "load_model", lambda *a, **k: pytest.fail("loading started"))
    with pytest.raises(ValueError, match=message):
        Pipeline.from_pretrained("anything.safetensors", device=device)


def test_memory_estimate_grows_with_pixels_and_refuses_what_cannot_fit(pipe):
    config = pipe.config
    small, big = (unet_bytes_per_row(config, s, s, 4) for s in (64, 128))
    assert big >= 4 * small - 4 * 64 * config.unet.block_out_channels[-1]  # ~linear in pixels
    assert decode_bytes(config, 128, 128, 4) == 4 * decode_bytes(config, 64, 64, 4)
    per_image = 2 * unet_bytes_per_row(config, 64, 64, 4)
    decode = decode_bytes(config, 64, 64, 4)
    # The U-Net's batch and the one-image decode do not overlap in time; the call's images
    # share one Winograd filter buffer.
    shared = filter_workspace_bytes(config, 4, "cpu")
    room = max(3 * per_image + shared, decode) + 1
    expected = min(8, (room - shared) // per_image)
    assert 1 < expected < 8
    assert plan_batch(config, 8, 64, 64, dtype_bytes=4, guided=True, device="cpu", available=room) == expected
    with pytest.raises(MemoryLimitError, match="64x64 image needs at least"):
        plan_batch(config, 1, 64, 64, dtype_bytes=4, guided=True, device="cpu", available=decode // 2)


def test_a_call_that_cannot_fit_is_refused_before_allocating(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "encode_prompts", lambda *a: pytest.fail("work started"))
    with pytest.raises(MemoryLimitError, match="GiB"):
        _run(pipe, width=8 * 2**16, height=8 * 2**16)


def test_a_batch_too_big_for_memory_runs_in_smaller_calls_with_the_same_images(pipe, monkeypatch):
    import ldm.pipeline

    whole = _run(pipe, prompt=["a cat", "a dog", "a hat"], guidance_scale=3.0)
    real = ldm.pipeline.plan_batch
    monkeypatch.setattr(ldm.pipeline, "plan_batch", lambda *a, **k: min(real(*a, **k), 2))
    calls = []
    real_forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a: calls.append(x.shape[0]) or real_forward(x, *a))
    split = _run(pipe, prompt=["a cat", "a dog", "a hat"], guidance_scale=3.0)
    assert set(calls) == {4, 2}  # guided rows: 2 images then 1 image
    np.testing.assert_allclose(split, whole, atol=1e-5)


def test_conditioning_batches_field_by_field():
    a, b = Conditioning(torch.zeros(2, 3, 4)), Conditioning(torch.ones(1, 3, 4))
    both = Conditioning.cat([a, b])
    assert both.batch_size == 3 and both.context[2].eq(1).all()
    assert both.select(slice(1, 3)).batch_size == 2
    half = both.to(dtype=torch.float16)
    assert half.context.dtype == torch.float16
    with pytest.raises(ValueError, match="context shapes differ"):
        Conditioning.cat([a, Conditioning(torch.zeros(1, 5, 4))])  # context lengths differ


def test_the_unet_sees_the_conditioning_the_pipeline_built(pipe, monkeypatch):
    seen = []
    real = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, t, ctx: seen.append(ctx) or real(x, t, ctx))
    _run(pipe, prompt="a cat", negative_prompt="a dog", guidance_scale=5.0)
    cond, uncond = pipe.encode_prompts(["a cat"], ["a dog"])
    torch.testing.assert_close(seen[0], Conditioning.cat([uncond, cond]).context)


def test_decode_is_callable_on_its_own(pipe):
    latents = pipe.generate("a cat", steps=2, seed=0, output="latent", progress=False).images
    direct = pipe.decode(latents, "np")
    np.testing.assert_array_equal(direct, _run(pipe, steps=2, seed=0))
