"""End-to-end parity: ldm's Pipeline against diffusers' StableDiffusionPipeline.

Same random weights (tiny SD1-style eps and SD2-style v-prediction models), same
prompts, same per-image CPU generators; each sampler against the diffusers
scheduler it corresponds to, swapped in the way diffusers documents:
``Scheduler.from_config(pipe.scheduler.config, **options)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.checkpoints import convert
from reference import PIXEL_TOLERANCE, TEST_DEVICE, TEST_DTYPE, load_reference_pipeline

SIZE = 64
STEPS = 6
PROMPTS = ["a cat wearing a hat", "a red circle on a blue background"]
NEGATIVE = "blurry, low quality"

# ldm sampler name -> (diffusers scheduler class name, from_config options)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
}
# diffusers' EulerAncestralDiscreteScheduler has no Karras option, so euler_a with
# the karras schedule has no reference to compare with here (tests/test_samplers.py
# checks it against Euler's Karras sigmas instead).
KARRAS = ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde"]
CASES = [(name, None) for name in SCHEDULERS] + [(name, "karras") for name in KARRAS]
TOLERANCE = PIXEL_TOLERANCE  # max abs difference on [0, 1] pixels


@pytest.fixture(scope="module")
def models(sd1_folder, sd2v_folder):
    """Per family: diffusers' pipeline, and ldm's from the folder."""
    return {
        family: (load_reference_pipeline(folder),
                 Pipeline.from_pretrained(folder, device=TEST_DEVICE, dtype=TEST_DTYPE))
        for family, folder in (("sd1", sd1_folder), ("sd2v", sd2v_folder))
    }


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]


def _reference(ref, sampler: str, schedule: str | None, guidance: float, negative) -> np.ndarray:
    import diffusers

    cls_name, options = SCHEDULERS[sampler]
    cls = getattr(diffusers, cls_name)
    if schedule == "karras":
        options = {**options, "use_karras_sigmas": True}
    scheduler = cls.from_config(ref.scheduler.config, **options)
    ref_pipe = type(ref)(**{**ref.components, "scheduler": scheduler})
    ref_pipe.set_progress_bar_config(disable=True)
    return ref_pipe(
        PROMPTS, negative_prompt=[negative] * len(PROMPTS) if negative else None,
        num_inference_steps=STEPS, guidance_scale=guidance, generator=_generators(100, len(PROMPTS)),
        height=SIZE, width=SIZE, output_type="np",
    ).images


def _ours(pipe: Pipeline, sampler: str, schedule: str | None, guidance: float, negative) -> np.ndarray:
    return pipe(
        PROMPTS, negative_prompt=negative, steps=STEPS, guidance_scale=guidance, seed=100,
        width=SIZE, height=SIZE, sampler=sampler, schedule=schedule, output="np", progress=False,
    )


@pytest.mark.parametrize("family", ["sd1", "sd2v"])
@pytest.mark.parametrize("sampler,schedule", CASES)
def test_sampler_matches_diffusers_with_negative_prompt(models, family, sampler, schedule):
    ref, pipe = models[family]
    expected = _reference(ref, sampler, schedule, 7.5, NEGATIVE)
    got = _ours(pipe, sampler, schedule, 7.5, NEGATIVE)
    assert got.shape == expected.shape == (len(PROMPTS), SIZE, SIZE, 3)
    # The comparison means something only if the images are not flat.
    assert expected.std() > 0.05
    assert np.abs(got - expected).max() < TOLERANCE


@pytest.mark.parametrize("family", ["sd1", "sd2v"])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_guidance_one_matches_diffusers(models, family, sampler):
    ref, pipe = models[family]
    expected = _reference(ref, sampler, None, 1.0, None)
    got = _ours(pipe, sampler, None, 1.0, None)
    assert np.abs(got - expected).max() < TOLERANCE


@pytest.fixture(scope="module")
def single_files(sd1_folder, sd2v_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    files = {}
    for family, folder in (("sd1", sd1_folder), ("sd2v", sd2v_folder)):
        files[family] = out / f"{family}.safetensors"
        convert(folder, files[family], layout="original")
    return files


@pytest.mark.parametrize("family", ["sd1", "sd2v"])
def test_single_file_original_layout_matches_diffusers(models, single_files, family):
    ref, _ = models[family]
    pipe = Pipeline.from_pretrained(single_files[family], device=TEST_DEVICE, dtype=TEST_DTYPE)
    expected_prediction = "v_prediction" if family == "sd2v" else "epsilon"
    assert pipe.config.prediction_type == expected_prediction
    for sampler, schedule in (("dpmpp_2m", None), ("euler_a", None), ("heun", "karras")):
        expected = _reference(ref, sampler, schedule, 7.5, NEGATIVE)
        got = _ours(pipe, sampler, schedule, 7.5, NEGATIVE)
        assert np.abs(got - expected).max() < TOLERANCE


def test_image_does_not_depend_on_batch(models):
    _, pipe = models["sd1"]
    batch = pipe(PROMPTS, steps=3, seed=7, output="np", progress=False, sampler="euler_a")
    alone = pipe(PROMPTS[1], steps=3, seed=8, output="np", progress=False, sampler="euler_a")
    # Same noise, same image; only float rounding of batched matmuls may differ.
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-4)
