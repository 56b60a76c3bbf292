"""Editing parity: ldm's img2img and inpainting against diffusers'
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline.

Same random weights (tiny SD1 eps and SD2 v models, with 4-channel and 9-channel
U-Nets), same prompts and negative prompt at guidance 7.5, two images with their
own masks, per-image CPU generators. Each of ddim, euler, euler_a and dpmpp_2m runs
at each strength (0.35, 0.6, 1.0) in some model family across the matrix, which
keeps the file fast. Masks are aligned to the 8-pixel latent grid, where every
downsampling rule agrees; ``keep_unmasked=False`` compares the raw decode, which is
what diffusers returns.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm import Pipeline
from ldm.checkpoints import convert
from ldm.editing import feather_alpha
from reference import (
    SD1_INPAINT_TINY, SD2V_INPAINT_TINY, TEST_DEVICE, TEST_DTYPE, load_reference_pipeline, save_inpaint_folder,
)
from test_pipeline_parity import NEGATIVE, PROMPTS, SCHEDULERS, SIZE, STEPS, TOLERANCE, _generators

SEED = 100
STRENGTHS = (0.35, 0.6, 1.0)
SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m")
KINDS = ("img2img", "inpaint", "inpaint9")  # inpaint: a 4-channel U-Net; inpaint9: a 9-channel one
FAMILIES = ("sd1", "sd2v")


def _matrix() -> list[tuple[str, str, str, float]]:
    """Every sampler at every strength once per kind, spread over the families: a
    Latin square instead of the 72-case product."""
    cases = []
    for k, kind in enumerate(KINDS):
        for s, sampler in enumerate(SAMPLERS):
            for f, family in enumerate(FAMILIES):
                cases.append((kind, family, sampler, STRENGTHS[(s + f * 2 + k) % len(STRENGTHS)]))
    return cases


def _picture(seed: int) -> Image.Image:
    """A smooth, structured test picture (gradients and a disc) of SIZE x SIZE."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.2, 0.8, 3)
    disc = ((x - a) ** 2 + (y - b) ** 2 < 0.06).astype(float)
    rgb = np.stack([x * c + disc * 0.5, y * (1 - c) + disc * 0.3, (1 - x) * a], axis=-1)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def grid_mask(x0: int, y0: int, x1: int, y1: int) -> Image.Image:
    """A white box on black, "L" mode."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask, "L")


IMAGES = [_picture(1), _picture(2)]
MASKS = [grid_mask(16, 8, 48, 40), grid_mask(8, 24, 40, 64)]


@pytest.fixture(scope="module")
def inpaint_folders(tmp_path_factory):
    out = tmp_path_factory.mktemp("inpaint9")
    return {
        "sd1": save_inpaint_folder(SD1_INPAINT_TINY, out / "sd1", seed=3),
        "sd2v": save_inpaint_folder(SD2V_INPAINT_TINY, out / "sd2v", seed=4),
    }


@pytest.fixture(scope="module")
def models(sd1_folder, sd2v_folder, inpaint_folders):
    """(kind, family) -> (diffusers' pipeline components, the folder)."""
    folders = {("4", "sd1"): sd1_folder, ("4", "sd2v"): sd2v_folder,
               ("9", "sd1"): inpaint_folders["sd1"], ("9", "sd2v"): inpaint_folders["sd2v"]}
    loaded = {}
    for (channels, family), folder in folders.items():
        cls = "StableDiffusionInpaintPipeline" if channels == "9" else "StableDiffusionPipeline"
        loaded[channels, family] = (load_reference_pipeline(folder, cls), folder)
    return loaded


@pytest.fixture(scope="module")
def ldm_pipes(models):
    """ldm's pipelines loaded from the same folders, once each."""
    return {key: Pipeline.from_pretrained(folder, device=TEST_DEVICE, dtype=TEST_DTYPE)
            for key, (_, folder) in models.items()}


def _channels(kind: str) -> str:
    return "9" if kind == "inpaint9" else "4"


def reference_images(ref, kind: str, sampler: str, strength: float, images=IMAGES, masks=MASKS) -> np.ndarray:
    """diffusers' result for one case, the scheduler swapped in as for txt2img parity."""
    import diffusers

    cls_name, options = SCHEDULERS[sampler]
    scheduler = getattr(diffusers, cls_name).from_config(ref.scheduler.config, **options)
    pipe_cls = "StableDiffusionImg2ImgPipeline" if kind == "img2img" else "StableDiffusionInpaintPipeline"
    pipe = getattr(diffusers, pipe_cls)(**{**ref.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    extra = {} if kind == "img2img" else {"mask_image": masks, "height": SIZE, "width": SIZE}
    return pipe(
        PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), image=images, strength=strength,
        num_inference_steps=STEPS, guidance_scale=7.5, generator=_generators(SEED, len(PROMPTS)),
        output_type="np", **extra,
    ).images


def ldm_images(pipe: Pipeline, kind: str, sampler: str, strength: float, images=IMAGES, masks=MASKS) -> np.ndarray:
    return pipe(
        PROMPTS, NEGATIVE, image=images, mask=None if kind == "img2img" else masks, strength=strength,
        keep_unmasked=False, steps=STEPS, guidance_scale=7.5, seed=SEED, sampler=sampler,
        output="np", progress=False,
    )


def assert_parity(got: np.ndarray, expected: np.ndarray) -> float:
    assert got.shape == expected.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert expected.std() > 0.05  # not flat, so the comparison means something
    diff = float(np.abs(got - expected).max())
    assert diff <= TOLERANCE, f"max abs difference {diff:.2e}"
    return diff


@pytest.mark.parametrize("kind,family,sampler,strength", _matrix())
def test_edit_matches_diffusers(models, ldm_pipes, kind, family, sampler, strength):
    ref, _ = models[_channels(kind), family]
    expected = reference_images(ref, kind, sampler, strength)
    got = ldm_images(ldm_pipes[_channels(kind), family], kind, sampler, strength)
    assert_parity(got, expected)


@pytest.mark.parametrize("kind,family,sampler,strength", [
    ("img2img", "sd2v", "dpmpp_2m", 0.6),
    ("inpaint", "sd1", "euler_a", 0.35),
    ("inpaint9", "sd1", "ddim", 1.0),
    ("inpaint9", "sd2v", "euler", 0.6),
])
def test_single_file_edit_matches_diffusers(models, tmp_path, kind, family, sampler, strength):
    ref, folder = models[_channels(kind), family]
    single = convert(folder, tmp_path / "model.safetensors", layout="original")
    pipe = Pipeline.from_pretrained(single, device=TEST_DEVICE, dtype=TEST_DTYPE)
    assert pipe.config.is_inpainting == (kind == "inpaint9")
    assert_parity(ldm_images(pipe, kind, sampler, strength), reference_images(ref, kind, sampler, strength))


@pytest.mark.parametrize("family", FAMILIES)
def test_inpainting_model_without_image_is_blank_full_mask(ldm_pipes, family):
    """A 9-channel model's txt2img is its inpainting of a grey picture under a full mask at
    strength 1 (A1111), the case the matrix above checks against diffusers. Compared within
    ldm: the masked image is all zero then, and a random tiny VAE's group norms amplify the
    rounding of a constant input a thousandfold, beyond the tolerance, in both libraries."""
    pipe = ldm_pipes["9", family]
    grey = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    full = Image.new("L", (SIZE, SIZE), 255)
    common = dict(steps=STEPS, guidance_scale=7.5, seed=SEED, sampler="dpmpp_2m", output="np", progress=False)
    blank = pipe.generate(PROMPTS, NEGATIVE, width=SIZE, height=SIZE, **common)
    assert blank.params["strength"] is None
    edited = pipe(PROMPTS, NEGATIVE, image=grey, mask=full, keep_unmasked=False, **common)
    assert blank.images.std() > 0.05
    np.testing.assert_array_equal(blank.images, edited)


def test_keep_unmasked_keeps_input_pixels(ldm_pipes):
    """Outside the feathered mask the input's pixels come back exactly."""
    pipe = ldm_pipes["4", "sd1"]
    got = pipe(PROMPTS[0], image=IMAGES[0], mask=MASKS[0], steps=2, seed=SEED, output="np", progress=False,
               sampler="euler", mask_blur=4)[0]
    original = np.asarray(IMAGES[0], dtype=np.float32) / 255
    far = feather_alpha(np.asarray(MASKS[0], dtype=np.float32) / 255, 4) == 0
    assert far.sum() > SIZE * SIZE / 4
    np.testing.assert_array_equal(got[far], original[far])
    assert np.abs(got[16:32, 24:40] - original[16:32, 24:40]).max() > 0.05


def test_edit_image_does_not_depend_on_batch(ldm_pipes):
    pipe = ldm_pipes["4", "sd1"]
    batch = ldm_images(pipe, "inpaint", "euler_a", 0.6)
    alone = pipe(PROMPTS[1], NEGATIVE, image=IMAGES[1], mask=MASKS[1], strength=0.6, keep_unmasked=False,
                 steps=STEPS, guidance_scale=7.5, seed=SEED + 1, sampler="euler_a", output="np", progress=False)
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-4)
