"""SDXL end to end: ldm's Pipeline against diffusers' StableDiffusionXLPipeline (and the
refiner hand-over against StableDiffusionXLImg2ImgPipeline with denoising_start).

Tiny random SDXL models from tests/reference_sdxl.py (two text encoders, a U-Net with
uneven transformer depths and a level without attention, the text_time embedding),
loaded by ldm from the diffusers folder and from an original-layout single file; same
prompts, same per-image CPU generators, each sampler against the diffusers scheduler
it corresponds to, swapped in with ``Scheduler.from_config`` (so the folder's
"leading" timestep spacing carries over, as it does for users).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm.checkpoints import convert
from reference_sdxl import load_sdxl_reference_pipeline
from test_pipeline_parity import KARRAS, SCHEDULERS

WIDTH, HEIGHT = 96, 64  # non-square
STEPS = 5
PROMPTS = ["a cat wearing a hat", "a red circle on a blue background"]
NEGATIVE = "blurry, low quality"
TOLERANCE = 1e-3  # max abs difference on [0, 1] pixels
SIZES = dict(original_size=(128, 160), crops_coords_top_left=(8, 16), target_size=(96, 80))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is as fast, and steady on a busy machine."""


@pytest.fixture(scope="module")
def base(sdxl_folder):
    return load_sdxl_reference_pipeline(sdxl_folder), Pipeline.from_pretrained(sdxl_folder, device="cpu")


@pytest.fixture(scope="module")
def refiner(sdxl_refiner_folder):
    return (load_sdxl_reference_pipeline(sdxl_refiner_folder),
            Pipeline.from_pretrained(sdxl_refiner_folder, device="cpu"))


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]


_FOLDER_SCHEDULER: dict[int, dict] = {}


def _with_scheduler(ref, sampler: str, schedule: str | None):
    import diffusers

    cls_name, options = SCHEDULERS[sampler]
    if schedule == "karras":
        options = {**options, "use_karras_sigmas": True}
    # Swapped in place, as diffusers' docs do (a new pipeline object would lose the
    # folder's force_zeros_for_empty_prompt / requires_aesthetics_score), always from the
    # folder's own scheduler config.
    config = _FOLDER_SCHEDULER.setdefault(id(ref), ref.scheduler.config)
    ref.scheduler = getattr(diffusers, cls_name).from_config(config, **options)
    ref.set_progress_bar_config(disable=True)
    return ref


def _reference(ref, sampler: str, schedule: str | None = None, *, negative=NEGATIVE, guidance: float = 7.5,
               **kwargs) -> np.ndarray:
    return _with_scheduler(ref, sampler, schedule)(
        PROMPTS, negative_prompt=[negative] * len(PROMPTS) if negative is not None else None,
        num_inference_steps=STEPS, guidance_scale=guidance, generator=_generators(100, len(PROMPTS)),
        height=HEIGHT, width=WIDTH, output_type="np", **kwargs,
    ).images


def _ours(pipe: Pipeline, sampler: str, schedule: str | None = None, *, negative=NEGATIVE, guidance: float = 7.5,
          **kwargs) -> np.ndarray:
    return pipe(PROMPTS, negative_prompt=negative, steps=STEPS, guidance_scale=guidance, seed=100, width=WIDTH,
                height=HEIGHT, sampler=sampler, schedule=schedule, output="np", progress=False, **kwargs)


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape == (len(PROMPTS), HEIGHT, WIDTH, 3)
    assert expected.std() > 0.05  # not flat: the comparison means something
    assert np.abs(got - expected).max() < TOLERANCE


CASES = [(name, None) for name in SCHEDULERS] + [(name, "karras") for name in KARRAS]


@pytest.mark.parametrize("sampler,schedule", CASES)
def test_every_sampler_matches_diffusers_with_a_negative_prompt(base, sampler, schedule):
    ref, pipe = base
    _close(_ours(pipe, sampler, schedule), _reference(ref, sampler, schedule))


def test_an_empty_negative_prompt_is_zeros_as_in_sdxl(base):
    ref, pipe = base
    # diffusers zeroes the negative side when no negative prompt is given
    # (force_zeros_for_empty_prompt); ldm's default negative prompt is "".
    expected = _reference(ref, "euler", negative=None)
    _close(_ours(pipe, "euler", negative=None), expected)
    _close(_ours(pipe, "euler", negative=""), expected)
    # ... and a negative prompt of text is encoded, not zeroed.
    assert np.abs(_ours(pipe, "euler", negative=" ") - expected).max() > 10 * TOLERANCE


def test_size_and_crop_conditioning_match_diffusers(base):
    ref, pipe = base
    expected = _reference(ref, "dpmpp_2m", **SIZES)
    _close(_ours(pipe, "dpmpp_2m", **SIZES), expected)
    assert np.abs(_ours(pipe, "dpmpp_2m") - expected).max() > 10 * TOLERANCE  # the ids matter


def test_guidance_one_matches_diffusers(base):
    ref, pipe = base
    _close(_ours(pipe, "ddim", guidance=1.0, negative=None), _reference(ref, "ddim", guidance=1.0, negative=None))


@pytest.fixture(scope="module")
def single_file(sdxl_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl_single") / "sdxl.safetensors"
    convert(sdxl_folder, path, layout="original")
    return Pipeline.from_pretrained(path, device="cpu")


def test_the_original_layout_single_file_matches_diffusers(base, single_file):
    ref, _ = base
    assert single_file.config.family == "sdxl"
    for sampler, schedule in (("dpmpp_2m", None), ("euler_a", None), ("heun", "karras")):
        _close(_ours(single_file, sampler, schedule), _reference(ref, sampler, schedule))


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_base_then_refiner_matches_diffusers_denoising_end_and_start(base, refiner, sampler):
    ref_base, pipe = base
    ref_refiner, pipe_refiner = refiner
    steps = 10
    latents = _with_scheduler(ref_base, sampler, None)(
        PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=steps, guidance_scale=7.5,
        generator=_generators(100, 2), height=HEIGHT, width=WIDTH, output_type="latent", denoising_end=0.8,
    ).images
    expected = _with_scheduler(ref_refiner, sampler, None)(
        PROMPTS, negative_prompt=[NEGATIVE] * 2, image=latents, num_inference_steps=steps, guidance_scale=7.5,
        generator=_generators(500, 2), denoising_start=0.8, output_type="np",
    ).images
    got = pipe(PROMPTS, negative_prompt=NEGATIVE, steps=steps, guidance_scale=7.5, seed=100, width=WIDTH,
               height=HEIGHT, sampler=sampler, output="np", progress=False, refiner=pipe_refiner,
               refiner_start=0.8)
    _close(got, expected)
    alone = pipe(PROMPTS, negative_prompt=NEGATIVE, steps=steps, seed=100, width=WIDTH, height=HEIGHT,
                 sampler=sampler, output="np", progress=False)
    assert np.abs(alone - expected).max() > 10 * TOLERANCE  # the refiner did something


def test_the_refiner_decodes_and_retries_at_the_call_s_memory_level(base, refiner, monkeypatch, caplog):
    import logging

    from failures import failing_on

    _, pipe = base
    _, pipe_refiner = refiner
    kwargs = dict(steps=6, seed=3, width=WIDTH, height=HEIGHT, output="np", progress=False, refiner=pipe_refiner)
    # The refiner decodes the picture: it runs the VAE as the call's plan says.
    assert pipe.generate("x", memory="seamless", **kwargs).vae_tiling == ["seamless"]
    expected = pipe("x", memory="sliced", **kwargs)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(pipe_refiner.unet, "forward", failing_on(1, pipe_refiner.unet.forward, oom))
    with caplog.at_level(logging.WARNING, logger="ldm"):
        got = pipe("x", memory="fast", **kwargs)
    assert "U-Net ran out of memory at memory level fast" in caplog.text
    np.testing.assert_array_equal(got, expected)


def _edit_inputs():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)).resize(
        (WIDTH, HEIGHT), Image.NEAREST)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[16:48, 24:72] = 255
    return image, Image.fromarray(mask)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_sdxl_editing_matches_diffusers(base, kind):
    import diffusers

    ref, pipe = base
    image, mask = _edit_inputs()
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if kind == "img2img" else diffusers.StableDiffusionXLInpaintPipeline
    # The base's components in diffusers' editing pipeline (no aesthetic score: the base's ids).
    edit = cls(**ref.components, requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    edit.set_progress_bar_config(disable=True)
    extra = {"mask_image": [mask] * 2, "height": HEIGHT, "width": WIDTH} if kind == "inpaint" else {}
    expected = _with_scheduler(edit, "euler", None)(
        PROMPTS, negative_prompt=[NEGATIVE] * 2, image=[image] * 2, strength=0.7, num_inference_steps=STEPS,
        guidance_scale=7.5, generator=_generators(100, 2), output_type="np", **extra).images
    got = pipe(PROMPTS, negative_prompt=NEGATIVE, image=[image] * 2, strength=0.7, steps=STEPS, guidance_scale=7.5,
               seed=100, sampler="euler", output="np", progress=False, keep_unmasked=False,
               **({"mask": [mask] * 2} if kind == "inpaint" else {}))
    _close(got, expected)


def test_bad_sdxl_inputs_are_refused_with_the_reason(base, refiner, sd1_pipe, caplog):
    _, pipe = base
    _, pipe_refiner = refiner
    with pytest.raises(ValueError, match="aesthetic_score: this sdxl model reads size conditioning"):
        pipe("x", aesthetic_score=7.0, steps=1, progress=False)
    with pytest.raises(ValueError, match="original_size: this sd1 model reads no size conditioning"):
        sd1_pipe("x", original_size=(64, 64), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"original_size must be two whole numbers \(height, width\)"):
        pipe("x", original_size=(64,), steps=1, progress=False)
    with pytest.raises(ValueError, match="target_size: this sdxl-refiner model reads the SDXL refiner's"):
        pipe_refiner("x", image=np.zeros((64, 64, 3)), target_size=(64, 64), steps=2, progress=False)
    with pytest.raises(ValueError, match="refiner_start must be between 0 and 1"):
        pipe("x", refiner=pipe_refiner, refiner_start=1.0, steps=4, progress=False)
    with pytest.raises(ValueError, match="hands over at step"):
        pipe("x", refiner=pipe_refiner, refiner_start=0.01, steps=4, sampler="ddim", progress=False)
    with pytest.raises(ValueError, match="a sdxl-refiner model cannot continue a sd1 model"):
        sd1_pipe("x", refiner=pipe_refiner, steps=4, progress=False)
    with pytest.raises(ValueError, match="is an SDXL refiner: it refines"):
        pipe_refiner("x", steps=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        pipe("x", width=32, height=32, steps=1, progress=False, output="latent")
    assert "the area SDXL was trained at" in caplog.text
