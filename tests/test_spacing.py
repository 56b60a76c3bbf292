"""Timestep spacing ("leading", "linspace", "trailing") against diffusers' schedulers.

The reference is what diffusers does when a model's scheduler config carries
``timestep_spacing``: ``Cls.from_config(<SD scheduler_config.json>, timestep_spacing=X,
**options)`` (``steps_offset=1``, ``set_alpha_to_one=False``), then ``set_timesteps``.
ldm gets the spacing from the model's config (``DiscreteSchedule.from_config``) or
from an explicit ``spacing=``.

diffusers' DDIM and PNDM step by a fixed ``N // steps`` timesteps whatever the
spacing, so with "linspace" (and "trailing" when ``steps`` does not divide N) a step
does not land on the next timestep; the whole-loop tests below reuse
tests/test_samplers.py's reference loop (StableDiffusionPipeline's, stripped to the
scheduler) with the spacing in the scheduler config and in ldm's model config, so
they cover those steps too.
"""

from __future__ import annotations

import dataclasses

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

import test_samplers
from ldm.config import SD1, SDXL, SDXL_INPAINT, SDXL_REFINER, ModelConfig
from ldm.denoisers import Denoiser, DiscreteSchedule
from ldm.samplers import (
    KARRAS_SAMPLERS,
    SPACED_SAMPLERS,
    TIMESTEP_SPACINGS,
    randn,
    sample,
    sampling_schedule,
    spacing_from_scheduler_config,
)
from reference import SD1_SCHEDULER_CONFIG

VP = ("ddim", "plms", "ddpm", "dpmpp_2m", "dpmpp_2m_sde")
# What each diffusers scheduler does when the config sets no spacing (SD 1.x / 2.x).
DEFAULTS = {name: "leading" if name in ("ddim", "plms", "ddpm") else "linspace" for name in SPACED_SAMPLERS}
# 3, 7 and 30 do not divide 1000: "trailing" timesteps are then not N // steps apart.
SCHEDULE_STEPS = (1, 3, 4, 7, 25, 30, 50)
LOOP_STEPS = (1, 3, 4, 30)


def _cases(step_counts: tuple[int, ...]) -> list[tuple[str, str, int, bool]]:
    """Every sampler x spacing x step count, with and without Karras sigmas where ldm has them."""
    return [
        (name, spacing, steps, karras)
        for name in SPACED_SAMPLERS
        for spacing in TIMESTEP_SPACINGS
        for steps in step_counts
        for karras in ((False, True) if name in KARRAS_SAMPLERS else (False,))
    ]


def _model_schedule(spacing: str | None) -> DiscreteSchedule:
    return DiscreteSchedule.from_config(dataclasses.replace(SD1, timestep_spacing=spacing))


def _reference(name: str, spacing: str, steps: int, karras: bool):
    config = {**SD1_SCHEDULER_CONFIG, "timestep_spacing": spacing}
    cls, options = test_samplers.PAIRS[name]
    if karras:
        # EulerAncestralDiscreteScheduler has no Karras option; ldm's euler_a uses Euler's.
        cls = EulerDiscreteScheduler if name == "euler_a" else cls
        options = {**options, "use_karras_sigmas": True}
    scheduler = cls.from_config(config, **options)
    scheduler.set_timesteps(steps)
    return scheduler


def _visited(name: str, values: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' per-call list reduced to one entry per ldm step."""
    if name == "heun":  # every level but the first repeats for the 2nd-order pass
        return torch.cat([values[:1], values[1::2]])
    if name == "plms" and steps > 1:  # the first timestep runs twice (the redone first step)
        return torch.cat([values[:1], values[2:]])
    return values


def _vp_level(alphas_cumprod: torch.Tensor, t: np.ndarray, final: torch.Tensor) -> torch.Tensor:
    """VE level of diffusers' ``alpha_prod_t_prev`` at timesteps ``t`` (final below 0)."""
    alpha = torch.stack([alphas_cumprod[int(i)] if i >= 0 else final for i in t])
    return ((1 - alpha) / alpha) ** 0.5


@pytest.mark.parametrize("name,spacing,steps,karras", _cases(SCHEDULE_STEPS))
def test_schedule_matches_diffusers(name, spacing, steps, karras):
    plan = sampling_schedule(name, _model_schedule(spacing), steps, karras=karras)
    ref = _reference(name, spacing, steps, karras)
    torch.testing.assert_close(plan.timesteps, _visited(name, ref.timesteps.float(), steps), atol=1e-4, rtol=0)
    if hasattr(ref, "sigmas"):
        torch.testing.assert_close(plan.sigmas, _visited(name, ref.sigmas.float(), steps), atol=0, rtol=0)
    else:
        levels = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
        torch.testing.assert_close(plan.sigmas[:-1], levels[_visited(name, ref.timesteps, steps)], atol=0, rtol=0)
    start = plan.init_sigma / (plan.sigmas[0] ** 2 + 1) ** 0.5 if name in VP else plan.init_sigma
    torch.testing.assert_close(start, torch.as_tensor(ref.init_noise_sigma, dtype=torch.float32))
    if name in ("ddim", "plms"):
        # step() goes from t to t - N // steps (its prev_timestep), not to the next timestep.
        t = plan.timesteps.numpy().astype(np.int64)
        stride = ref.config.num_train_timesteps // steps
        below = _vp_level(ref.alphas_cumprod, t - stride, ref.final_alpha_cumprod).float()
        expected = plan.sigmas[1:] if plan.below is None else plan.below
        torch.testing.assert_close(expected, below, atol=0, rtol=1e-6)
        assert (plan.below is None) == bool(np.all(t[:-1] - t[1:] == stride))


@pytest.mark.parametrize("name", SPACED_SAMPLERS)
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_explicit_spacing_overrides_the_model(name, spacing):
    other = next(s for s in TIMESTEP_SPACINGS if s != spacing)
    by_model = sampling_schedule(name, _model_schedule(spacing), 30)
    for schedule in (_model_schedule(None), _model_schedule(other)):
        explicit = sampling_schedule(name, schedule, 30, spacing=spacing)
        for field in dataclasses.fields(by_model):
            a, b = getattr(by_model, field.name), getattr(explicit, field.name)
            assert (a is None and b is None) or torch.equal(a, b), field.name


@pytest.mark.parametrize("name", SPACED_SAMPLERS)
def test_no_spacing_keeps_each_samplers_default(name):
    default = sampling_schedule(name, _model_schedule(None), 25)
    named = sampling_schedule(name, _model_schedule(None), 25, spacing=DEFAULTS[name])
    assert torch.equal(default.sigmas, named.sigmas) and torch.equal(default.timesteps, named.timesteps)
    ref = test_samplers.make_scheduler(name, "epsilon", 25, False)  # the SD1 config, no spacing key
    torch.testing.assert_close(default.timesteps, _visited(name, ref.timesteps.float(), 25), atol=1e-4, rtol=0)


@pytest.fixture
def spaced(monkeypatch):
    """Point tests/test_samplers.py's reference loop and ldm run at one spacing: the
    scheduler config diffusers builds from and the model config ldm builds from."""

    def use(spacing: str) -> None:
        monkeypatch.setattr(test_samplers, "SD1_SCHEDULER_CONFIG", {**SD1_SCHEDULER_CONFIG, "timestep_spacing": spacing})
        monkeypatch.setattr(test_samplers, "SD1", dataclasses.replace(SD1, timestep_spacing=spacing))

    return use


@pytest.mark.parametrize("prediction_type", test_samplers.PREDICTIONS)
@pytest.mark.parametrize("name,spacing,steps,karras", _cases(LOOP_STEPS))
def test_loop_matches_diffusers(spaced, name, spacing, steps, karras, prediction_type):
    spaced(spacing)
    ref, ref_calls = test_samplers.diffusers_loop(name, prediction_type, steps, karras)
    out, calls = test_samplers.ldm_run(name, prediction_type, steps, karras)
    assert calls == ref_calls
    # Observed max |diff| 7e-6 on latents of magnitude ~3 (float32 rounding; the
    # DDIM/PNDM re-reads of the latents at the next level add a few ulps).
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def _ddim_reference_img2img(spacing: str, steps: int, start: int, init: torch.Tensor, noise: torch.Tensor):
    """StableDiffusionImg2ImgPipeline's loop for DDIM: noise the init at the first
    timestep that runs (``add_noise``), then the remaining steps."""
    scheduler = _reference("ddim", spacing, steps, False)
    timesteps = scheduler.timesteps[start:]
    latents = scheduler.add_noise(init, noise, timesteps[:1])
    for t in timesteps:
        latents = scheduler.step(test_samplers.fake_unet(latents, t), t, latents, eta=0.0, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddim_part_runs_match_diffusers_and_compose(spacing):
    """Editing starts part-way (diffusers' img2img), a hand-over stops part-way; both
    slice the off-schedule landing levels with the steps."""
    schedule = _model_schedule(spacing)
    denoiser = Denoiser(test_samplers.fake_unet, schedule)
    assert sampling_schedule("ddim", schedule, 30).below is not None  # the case under test
    gen = torch.Generator().manual_seed(5)
    init, noise = torch.randn(test_samplers.SHAPE, generator=gen), torch.randn(test_samplers.SHAPE, generator=gen)
    edited = sample("ddim", denoiser, noise, 30, schedule, start=12, init=init)
    torch.testing.assert_close(edited, _ddim_reference_img2img(spacing, 30, 12, init, noise), atol=1e-5, rtol=0)

    whole = sample("ddim", denoiser, noise, 30, schedule)
    first = sample("ddim", denoiser, noise, 30, schedule, end=17)
    level = sampling_schedule("ddim", schedule, 30).sigmas[17]
    rest = sample("ddim", denoiser, torch.zeros_like(noise), 30, schedule, start=17,
                  init=first * (level**2 + 1) ** 0.5)
    torch.testing.assert_close(rest, whole, atol=1e-5, rtol=0)


def test_sdxl_presets_lead_like_their_scheduler_config():
    from reference_sdxl import SDXL_SCHEDULER_CONFIG

    assert SDXL.timestep_spacing == SDXL_REFINER.timestep_spacing == SDXL_INPAINT.timestep_spacing == "leading"
    assert spacing_from_scheduler_config(SDXL_SCHEDULER_CONFIG) == "leading"
    plan = sampling_schedule("euler", DiscreteSchedule.from_config(SDXL), 30)
    ref = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    ref.set_timesteps(30)
    torch.testing.assert_close(plan.sigmas, ref.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(plan.timesteps, ref.timesteps, atol=0, rtol=0)
    # "leading" starts from sqrt(sigma_max^2 + 1) times the noise in diffusers' Euler.
    torch.testing.assert_close(plan.init_sigma, ref.init_noise_sigma, atol=0, rtol=0)
    assert ModelConfig.from_dict(SDXL.to_dict()) == SDXL


def test_spacing_from_scheduler_config():
    assert spacing_from_scheduler_config(SD1_SCHEDULER_CONFIG) is None
    assert spacing_from_scheduler_config({"timestep_spacing": None}) is None
    for spacing in TIMESTEP_SPACINGS:
        assert spacing_from_scheduler_config({**SD1_SCHEDULER_CONFIG, "timestep_spacing": spacing}) == spacing
    with pytest.raises(ValueError, match="scheduler_config.json: timestep_spacing 'even'.*leading, linspace, trailing"):
        spacing_from_scheduler_config({"timestep_spacing": "even"})
    with pytest.raises(TypeError, match="mapping"):
        spacing_from_scheduler_config(["timestep_spacing"])


def test_bad_spacing_names_are_refused_with_the_valid_ones():
    schedule = _model_schedule(None)
    with pytest.raises(ValueError, match="spacing 'Trailing' is not one of leading, linspace, trailing"):
        sampling_schedule("euler", schedule, 10, spacing="Trailing")
    with pytest.raises(ValueError, match="spacing 'trailing '"):
        sample("ddim", Denoiser(test_samplers.fake_unet, schedule), randn(test_samplers.SHAPE), 4, schedule,
               spacing="trailing ")
    with pytest.raises(ValueError, match="timestep_spacing 'uniform' is not one of leading, linspace, trailing"):
        DiscreteSchedule(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="timestep_spacing"):
        dataclasses.replace(SD1, timestep_spacing="even")
    with pytest.raises(ValueError, match="timestep_spacing"):
        ModelConfig.from_dict({**SD1.to_dict(), "timestep_spacing": 3})


def test_trailing_step_counts_diffusers_gets_wrong_are_refused():
    """np.arange's float stride gives diffusers 62 "trailing" timesteps for 61 steps,
    the last one -1; ldm refuses the count and names ones that work."""
    ref = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG, timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
    for name in SPACED_SAMPLERS:
        with pytest.raises(ValueError, match=r"steps=61 cannot use 'trailing' spacing.*use 60 or 62 steps"):
            sampling_schedule(name, _model_schedule("trailing"), 61)
    assert sampling_schedule("ddim", _model_schedule("trailing"), 62).steps == 62


def test_leading_steps_past_the_table_are_refused():
    # steps_offset=1 puts the first "leading" timestep at N for N steps (N - 1 for DPM-Solver).
    for name, steps in (("ddim", 1000), ("euler", 1000), ("dpmpp_2m", 999)):
        with pytest.raises(ValueError, match=f"steps={steps} is too many for 'leading' spacing"):
            sampling_schedule(name, _model_schedule("leading"), steps)
    with pytest.raises(ValueError, match="timesteps repeat"):
        sampling_schedule("dpmpp_2m", _model_schedule("leading"), 1000)
    assert sampling_schedule("euler", _model_schedule("leading"), 999).timesteps[0] == 999


def test_dpm_karras_with_an_explicit_spacing_is_refused():
    """diffusers' DPM-Solver ignores the spacing with Karras sigmas: asking for one
    would silently change nothing. The model's own spacing is fine (it is the config)."""
    with pytest.raises(ValueError, match="no effect on 'dpmpp_2m' with karras"):
        sampling_schedule("dpmpp_2m", _model_schedule(None), 20, karras=True, spacing="trailing")
    with_model = sampling_schedule("dpmpp_2m", _model_schedule("trailing"), 20, karras=True)
    without = sampling_schedule("dpmpp_2m", _model_schedule(None), 20, karras=True)
    assert torch.equal(with_model.sigmas, without.sigmas)
    # For the k-samplers the spacing still sets the Karras range.
    euler = [sampling_schedule("euler", _model_schedule(s), 20, karras=True).sigmas[0] for s in ("leading", "trailing")]
    assert euler[0] < euler[1]


# --- end to end: the tiny SD1 model against diffusers' StableDiffusionPipeline ----------

E2E_CASES = [("ddim", None), ("plms", None), ("euler", None), ("euler", "karras"), ("dpmpp_2m", None)]
E2E_STEPS = 6  # does not divide 1000: DDIM/PNDM's stride differs from the timestep gaps


@pytest.fixture(scope="module")
def trailing_models(sd1_folder):
    from ldm import Pipeline
    from reference import load_reference_pipeline

    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu")
    pipe.config = dataclasses.replace(pipe.config, timestep_spacing="trailing")
    pipe.schedule = DiscreteSchedule.from_config(pipe.config)
    return load_reference_pipeline(sd1_folder), pipe


@pytest.mark.parametrize("sampler,schedule", E2E_CASES)
def test_pipeline_with_trailing_spacing_matches_diffusers(trailing_models, sampler, schedule, one_thread):
    import test_pipeline_parity as parity

    ref, pipe = trailing_models
    cls_name, options = parity.SCHEDULERS[sampler]
    options = {**options, "timestep_spacing": "trailing", **({"use_karras_sigmas": True} if schedule else {})}
    scheduler = getattr(diffusers, cls_name).from_config(ref.scheduler.config, **options)
    ref_pipe = type(ref)(**{**ref.components, "scheduler": scheduler})
    ref_pipe.set_progress_bar_config(disable=True)
    expected = ref_pipe(
        parity.PROMPTS, negative_prompt=[parity.NEGATIVE] * len(parity.PROMPTS), num_inference_steps=E2E_STEPS,
        guidance_scale=7.5, generator=parity._generators(100, len(parity.PROMPTS)),
        height=parity.SIZE, width=parity.SIZE, output_type="np",
    ).images
    got = pipe(
        parity.PROMPTS, negative_prompt=parity.NEGATIVE, steps=E2E_STEPS, guidance_scale=7.5, seed=100,
        width=parity.SIZE, height=parity.SIZE, sampler=sampler, schedule=schedule, output="np", progress=False,
    )
    assert expected.std() > 0.05
    assert np.abs(got - expected).max() <= 1e-3
    # The case means something: trailing is not what the sampler would do by default.
    trailing = sampling_schedule(sampler, pipe.schedule, E2E_STEPS, karras=schedule == "karras")
    default = sampling_schedule(sampler, _model_schedule(None), E2E_STEPS, karras=schedule == "karras")
    assert not torch.equal(trailing.sigmas, default.sigmas)
