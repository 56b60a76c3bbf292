"""Few-step sampling against diffusers: LCM, LCM-LoRA and Turbo-style.

- A guidance-distilled (LCM) tiny SD1 model, random weights, saved as a diffusers folder
  the way LCM releases ship (LCMScheduler config with ``timestep_spacing: leading``), loaded
  by ldm, against ``LatentConsistencyModelPipeline``: 1, 2, 4 and 8 steps, guidance 8.5 and
  3 (the scale goes into the U-Net's guidance embedding, no classifier-free guidance).
- LCM-LoRA: ``LCMScheduler`` swapped into ``StableDiffusionPipeline`` with a kohya LoRA
  loaded in both libraries, ordinary classifier-free guidance 1.5.
- Turbo-style: Euler ancestral with trailing spacing, guidance 0 (no guidance), 1 step.
- img2img with lcm against ``LatentConsistencyModelImg2ImgPipeline``.

Every comparison: max abs difference <= 1e-3 on [0, 1] pixels, per-image CPU generators
(the re-noising between LCM steps draws from them too, so draws match exactly).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.checkpoints import load_model
from ldm.checkpoints.convert import save_model
from ldm.samplers import sampling_schedule
from ldm.samplers.lcm import boundary_scalings, lcm_timesteps
from ldm.denoisers import DiscreteSchedule
from reference import SD1_TINY, load_reference_pipeline, save_diffusers_folder
from test_lora_formats import factors

SIZE = 64
PROMPTS = ["a cat wearing a hat", "a red circle on a blue background"]
TOLERANCE = 1e-3  # max abs difference on [0, 1] pixels
GUIDANCE_WIDTH = 24
# LCM_Dreamshaper_v7's scheduler_config.json, with SD's training schedule.
LCM_SCHEDULER_CONFIG = {
    "_class_name": "LCMScheduler", "_diffusers_version": "0.22.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "original_inference_steps": 50,
    "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False, "timestep_scaling": 10.0,
    "timestep_spacing": "leading", "trained_betas": None,
}
LCM_TINY = dataclasses.replace(SD1_TINY, name="sd1-lcm", unet={**SD1_TINY.unet, "time_cond_proj_dim": GUIDANCE_WIDTH},
                               scheduler=LCM_SCHEDULER_CONFIG)

pytestmark = pytest.mark.usefixtures("one_thread")


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]


@pytest.fixture(scope="module")
def lcm_models(tmp_path_factory):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    folder = save_diffusers_folder(LCM_TINY, tmp_path_factory.mktemp("lcm") / "model", seed=7)
    sd = load_reference_pipeline(folder)
    ref = LatentConsistencyModelPipeline(**{**sd.components, "scheduler": LCMScheduler.from_config(sd.scheduler.config)},
                                         requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return folder, ref, Pipeline.from_pretrained(folder, device="cpu")


# --- the schedule and the boundary condition, against LCMScheduler ----------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 25, 50])
def test_timesteps_match_lcm_scheduler(steps):
    from diffusers import LCMScheduler

    ref = LCMScheduler(**{k: v for k, v in LCM_SCHEDULER_CONFIG.items() if not k.startswith("_")})
    ref.set_timesteps(steps)
    assert lcm_timesteps(1000, steps).tolist() == ref.timesteps.tolist()
    plan = sampling_schedule("lcm", DiscreteSchedule(), steps)
    alphas = ref.alphas_cumprod[ref.timesteps]
    assert torch.allclose(plan.sigmas[:-1], ((1 - alphas) / alphas) ** 0.5) and plan.sigmas[-1] == 0
    for t in ref.timesteps[:3]:
        assert all(torch.isclose(torch.as_tensor(a).float(), b) for a, b in
                   zip(ref.get_scalings_for_boundary_condition_discrete(t), boundary_scalings(t)))


# --- LatentConsistencyModelPipeline ------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("guidance", [8.5, 3.0])
def test_distilled_model_matches_latent_consistency_pipeline(lcm_models, steps, guidance):
    _, ref, pipe = lcm_models
    expected = ref(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=_generators(100, 2),
                   height=SIZE, width=SIZE, output_type="np").images
    got = pipe(PROMPTS, steps=steps, guidance_scale=guidance, seed=100, width=SIZE, height=SIZE, sampler="lcm",
               output="np", progress=False)
    assert expected.std() > 0.05
    assert np.abs(got - expected).max() <= TOLERANCE


def test_guidance_scale_reaches_the_embedding_and_runs_one_pass(lcm_models):
    _, _, pipe = lcm_models
    calls = []
    unet_forward = pipe.unet.forward

    def counting(x, t, context, **extra):
        calls.append((x.shape[0], extra["timestep_cond"]))
        return unet_forward(x, t, context, **extra)

    pipe.unet.forward = counting
    try:
        a, b = (pipe(PROMPTS[0], steps=2, guidance_scale=g, seed=3, sampler="lcm", output="np", progress=False)
                for g in (8.5, 2.0))
    finally:
        del pipe.unet.forward
    assert [rows for rows, _ in calls] == [1] * 4  # no unconditional half
    assert np.abs(a - b).max() > 0.01  # the scale changes the picture through the embedding


def test_a_negative_prompt_is_refused_for_a_distilled_model(lcm_models):
    _, _, pipe = lcm_models
    with pytest.raises(ValueError, match="guidance-distilled.*negative prompt has nothing to act on"):
        pipe(PROMPTS[0], negative_prompt="blurry", steps=2, sampler="lcm", progress=False)
    pipe(PROMPTS[0], negative_prompt="", steps=1, sampler="lcm", output="latent", progress=False)


def test_a_distilled_model_takes_no_refiner(lcm_models, sd1_pipe):
    _, _, pipe = lcm_models
    for base, refiner in ((pipe, sd1_pipe), (sd1_pipe, pipe)):
        with pytest.raises(ValueError, match="guidance-distilled.*run it alone"):
            base(PROMPTS[0], steps=4, sampler="lcm", refiner=refiner, progress=False)


def test_img2img_matches_latent_consistency_img2img_pipeline(lcm_models):
    """diffusers' LCM img2img shrinks the origin schedule to ``int(50 * strength)`` steps and
    runs all ``num_inference_steps`` on it; ldm's editing path runs the last
    ``int(steps * strength)`` steps of the ``steps``-step schedule. For 4 steps at strength 0.5
    both run timesteps 499 and 259: ldm 4 steps, diffusers 2."""
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    _, ref, pipe = lcm_models
    image = np.random.default_rng(0).random((SIZE, SIZE, 3)).astype(np.float32)
    ref_img2img = LatentConsistencyModelImg2ImgPipeline(**ref.components, requires_safety_checker=False)
    ref_img2img.set_progress_bar_config(disable=True)
    expected = ref_img2img(PROMPTS, image=[image] * 2, num_inference_steps=2, strength=0.5, guidance_scale=6.0,
                           generator=_generators(5, 2), output_type="np").images
    assert ref_img2img.scheduler.timesteps.tolist() == [499, 259]
    got = pipe(PROMPTS, image=[image] * 2, strength=0.5, steps=4, guidance_scale=6.0, seed=5, sampler="lcm",
               output="np", progress=False, keep_unmasked=False)
    assert np.abs(got - expected).max() <= TOLERANCE


# --- LCM-LoRA: LCMScheduler in StableDiffusionPipeline, with a LoRA, ordinary CFG --------


def _lcm_lora_file(path, pipe: Pipeline) -> None:
    """A kohya-style U-Net LoRA (as latent-consistency/lcm-lora-sdv1-5 ships) on every
    attention and ResNet layer, one alpha."""
    from ldm.checkpoints.files import save_safetensors

    tensors = {}
    layers = [(n, m.weight.shape) for n, m in pipe.unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ("attentions" in n or "resnets" in n)]
    for i, (name, shape) in enumerate(layers):
        down, up = factors(tuple(shape), seed=50 + i, std=0.05)
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(8.0)})
    save_safetensors(tensors, path)


def test_lcm_lora_matches_lcm_scheduler_in_stable_diffusion_pipeline(sd1_folder, tmp_path):
    from diffusers import LCMScheduler

    ref = load_reference_pipeline(sd1_folder)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu")
    _lcm_lora_file(tmp_path / "lcm-lora.safetensors", pipe)

    def reference():
        return ref(PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=4, guidance_scale=1.5,
                   generator=_generators(40, 2), height=SIZE, width=SIZE, output_type="np").images

    before = reference()
    ref.load_lora_weights(str(tmp_path / "lcm-lora.safetensors"), adapter_name="lcm")
    pipe.load_lora(tmp_path / "lcm-lora.safetensors")
    expected = reference()
    got = pipe(PROMPTS, negative_prompt="blurry", steps=4, guidance_scale=1.5, seed=40, width=SIZE, height=SIZE,
               sampler="lcm", output="np", progress=False)
    assert np.abs(expected - before).max() > 0.05  # the LoRA does something
    assert np.abs(got - expected).max() <= TOLERANCE


# --- Turbo-style: euler_a, trailing spacing, no guidance ----------------------------------


def test_turbo_style_one_step_matches_diffusers(sd1_folder, sd1_pipe):
    from diffusers import EulerAncestralDiscreteScheduler

    ref = load_reference_pipeline(sd1_folder)
    ref.scheduler = EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
    expected = ref(PROMPTS, num_inference_steps=1, guidance_scale=0.0, generator=_generators(9, 2), height=SIZE,
                   width=SIZE, output_type="np").images
    assert ref.scheduler.timesteps.tolist() == [999]
    got = sd1_pipe(PROMPTS, steps=1, guidance_scale=0.0, seed=9, width=SIZE, height=SIZE, sampler="euler_a",
                   spacing="trailing", output="np", progress=False)
    assert expected.std() > 0.05
    assert np.abs(got - expected).max() <= TOLERANCE


# --- what lcm refuses --------------------------------------------------------------------


def test_lcm_refuses_steps_beyond_the_origin_schedule_karras_and_a_spacing():
    schedule = DiscreteSchedule()
    with pytest.raises(ValueError, match="steps=51 is more than the lcm sampler can take.*1 to 50"):
        sampling_schedule("lcm", schedule, 51)
    with pytest.raises(ValueError, match="karras sigmas are not available for 'lcm'"):
        sampling_schedule("lcm", schedule, 4, karras=True)
    with pytest.raises(ValueError, match="spacing='trailing' does not apply to lcm.*own 50-step origin schedule"):
        sampling_schedule("lcm", schedule, 4, spacing="trailing")
    # The model's own spacing (an LCM folder says "leading") is for the other samplers.
    leading = sampling_schedule("lcm", DiscreteSchedule(timestep_spacing="leading"), 4)
    assert leading.timesteps.tolist() == [999, 759, 499, 259]


def test_pipeline_refuses_bad_lcm_calls_before_any_work(lcm_models):
    _, _, pipe = lcm_models
    for kwargs, match in (({"steps": 60}, "more than the lcm sampler can take"),
                          ({"schedule": "karras"}, "karras"),
                          ({"spacing": "linspace"}, "does not apply to lcm")):
        with pytest.raises(ValueError, match=match):
            pipe(PROMPTS[0], sampler="lcm", progress=False, **{"steps": 4, **kwargs})


# --- loading and writing a guidance-distilled model ----------------------------------------


def test_distilled_model_round_trips_through_both_layouts(lcm_models, tmp_path):
    from diffusers import LatentConsistencyModelPipeline
    from safetensors import safe_open

    _, ref, pipe = lcm_models
    assert pipe.config.unet.time_cond_proj_dim == GUIDANCE_WIDTH
    single = save_model(pipe.model, tmp_path / "lcm.safetensors")
    with safe_open(str(single), "pt") as f:
        assert f.get_tensor("model.diffusion_model.time_embedding.cond_proj.weight").shape == (32, GUIDANCE_WIDTH)
    folder = save_model(load_model(single, device="cpu"), tmp_path / "back")
    loaded = load_model(folder, device="cpu")
    assert loaded.config.unet.time_cond_proj_dim == GUIDANCE_WIDTH
    state = loaded.unet.state_dict()
    assert all(torch.equal(state[name], value) for name, value in pipe.unet.state_dict().items())
    # The folder is what diffusers expects of an LCM model, and diffusers loads it.
    written = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                             requires_safety_checker=False)
    assert type(written.scheduler).__name__ == "LCMScheduler"
    assert torch.equal(written.unet.state_dict()["time_embedding.cond_proj.weight"],
                       ref.unet.state_dict()["time_embedding.cond_proj.weight"])


def test_guidance_distilled_single_file_is_detected_from_its_shapes():
    from test_checkpoints import original_shapes

    from ldm.checkpoints.detect import detect_config
    from ldm.config import SD1, with_changes

    distilled = with_changes(SD1, unet=with_changes(SD1.unet, time_cond_proj_dim=256))
    shapes = original_shapes(distilled)
    assert shapes["model.diffusion_model.time_embedding.cond_proj.weight"] == (320, 256)  # [block_out_channels[0], width]
    found = detect_config(shapes)
    assert found.config == distilled
    assert "guidance-distilled" in found.rule and "256" in found.rule
    assert detect_config(original_shapes(SD1)).config == SD1


def test_guiding_a_guidance_embedded_conditioning_again_is_refused():
    from ldm.conditioning import Conditioning, with_guidance_embedding
    from ldm.denoisers import CFGDenoiser, Denoiser
    from ldm.models.layers import guidance_scale_embedding

    cond = with_guidance_embedding(Conditioning(torch.zeros(2, 3, 8)), 8.5, GUIDANCE_WIDTH)
    assert torch.equal(cond.timestep_cond, guidance_scale_embedding(torch.tensor([7.5, 7.5]), GUIDANCE_WIDTH))
    assert cond.select(slice(1, 2)).timestep_cond.shape == (1, GUIDANCE_WIDTH)
    denoiser = Denoiser(lambda x, t, c: x, DiscreteSchedule())
    with pytest.raises(ValueError, match="guidance-distilled conditioning.*already in the embedding"):
        CFGDenoiser(denoiser, cond, Conditioning(torch.zeros(2, 3, 8)), 7.5)
    CFGDenoiser(denoiser, cond, None, 1.0)


def test_lcm_scheduler_settings_ldm_does_not_have_are_refused():
    from ldm.foreign_config import schedule_from_diffusers

    assert schedule_from_diffusers(LCM_SCHEDULER_CONFIG)["timestep_spacing"] == "leading"
    for key, value in (("original_inference_steps", 100), ("timestep_scaling", 20.0)):
        with pytest.raises(ValueError, match=f"{key}={value!r} is not supported"):
            schedule_from_diffusers({**LCM_SCHEDULER_CONFIG, key: value})


def test_lcm_stops_at_end_and_continues_from_there_as_one_run():
    from ldm.samplers import randn, sample

    schedule = DiscreteSchedule()

    def denoiser(x, sigma, *, t=None):  # a smooth x0 prediction that depends on the level
        return 0.5 * torch.tanh(x / (sigma**2 + 1) ** 0.5) + 0.01 * float(t or 0) / 1000

    whole = sample("lcm", denoiser, randn((2, 4, 8, 8), _generators(1, 2)), 6, schedule, generators=_generators(9, 2))
    gens = _generators(9, 2)
    noise = randn((2, 4, 8, 8), _generators(1, 2))
    half = sample("lcm", denoiser, noise, 6, schedule, generators=gens, end=3)
    level = sampling_schedule("lcm", schedule, 6).sigmas[3]
    rest = sample("lcm", denoiser, torch.zeros_like(noise), 6, schedule, generators=gens, start=3,
                  init=half * (level**2 + 1) ** 0.5)
    torch.testing.assert_close(rest, whole, atol=1e-5, rtol=0)
