"""Samplers and denoisers against diffusers' schedulers, run as its SD pipeline runs them.

The reference loop is StableDiffusionPipeline's: ``Cls.from_config(<SD1.5
scheduler_config.json>, **overrides)``, ``latents = randn_tensor(shape,
generator=[g0, g1]) * init_noise_sigma``, then per timestep ``scale_model_input``,
the model, and ``step(..., **prepare_extra_step_kwargs)`` (eta=0.0 and the generator
list where the scheduler takes them). ldm runs ``sample(...)`` from the same seeds
with a Denoiser around the same fake model.

The fake model is a smooth nonlinear function of (x, t) whose output keeps the
latents at a sane scale for both parameterisations and changes by ~3e-3 per unit
timestep, so feeding it a slightly different timestep than diffusers would show.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from reference import SD1_SCHEDULER_CONFIG

from ldm.conditioning import Conditioning
from ldm.config import SD1
from ldm.denoisers import CFGDenoiser, Denoiser, DiscreteSchedule
from ldm.samplers import (
    KARRAS_SAMPLERS,
    SAMPLERS,
    get_sampler,
    randn,
    sample,
    sampling_schedule,
)
from ldm.samplers.k_samplers import lms_coefficient

PAIRS = {
    "ddim": (DDIMScheduler, {}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
    ),
    "lcm": (LCMScheduler, {}),
}
PREDICTIONS = ("epsilon", "v_prediction")
SHAPE = (2, 4, 8, 8)
SEEDS = (100, 101)
# Observed max |diff| is ~2e-6 on latents of magnitude ~3 (float32 rounding, plus
# VE vs VP bookkeeping for DDIM/PLMS/DDPM/DPM-Solver); Euler/Heun are bit-identical.
ATOL = 5e-6


def fake_unet(x: torch.Tensor, t, cond=None) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32)
    if t.ndim:  # one timestep per batch row, as a U-Net accepts
        t = t.view(-1, 1, 1, 1)
    out = 0.8 * x + 0.2 * torch.tanh(2 * x) * torch.cos(t / 300) + 0.05 * torch.sin(t / 7)
    if isinstance(cond, Conditioning):
        cond = cond.context
    if cond is not None:
        out = out + 0.1 * cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return out


class Counting:
    def __init__(self, fn=fake_unet):
        self.fn, self.calls, self.conds = fn, 0, []

    def __call__(self, x, t, cond=None):
        self.calls += 1
        self.conds.append(cond)
        return self.fn(x, t, cond)


def _cond(context):
    return None if context is None else Conditioning(context)


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def make_scheduler(name: str, prediction_type: str, steps: int, karras: bool):
    cls, overrides = PAIRS[name]
    overrides = dict(overrides, prediction_type=prediction_type)
    if karras and name == "euler_a":
        # EulerAncestralDiscreteScheduler has no use_karras_sigmas: give it the Karras
        # sigmas and timesteps EulerDiscreteScheduler computes.
        sch = cls.from_config(SD1_SCHEDULER_CONFIG, **overrides)
        sch.set_timesteps(steps)
        ref = EulerDiscreteScheduler.from_config(SD1_SCHEDULER_CONFIG, use_karras_sigmas=True)
        ref.set_timesteps(steps)
        sch.sigmas, sch.timesteps = ref.sigmas, ref.timesteps
        return sch
    if karras:
        overrides["use_karras_sigmas"] = True
    sch = cls.from_config(SD1_SCHEDULER_CONFIG, **overrides)
    sch.set_timesteps(steps)
    return sch


def diffusers_loop(
    name, prediction_type, steps, karras=False, model=None, cond=None, uncond=None, scale=1.0
):
    """StableDiffusionPipeline.__call__'s denoising loop, stripped to the scheduler."""
    model = model or Counting()
    sch = make_scheduler(name, prediction_type, steps, karras)
    gens = generators()
    latents = randn_tensor(SHAPE, generator=gens, dtype=torch.float32) * sch.init_noise_sigma
    params = set(inspect.signature(sch.step).parameters)
    extra = {}
    if "eta" in params:
        extra["eta"] = 0.0
    if "generator" in params:
        extra["generator"] = gens
    guided = scale > 1
    embeds = torch.cat([uncond, cond]) if guided else cond
    for t in sch.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = sch.scale_model_input(model_input, t)
        noise_pred = model(model_input, t, embeds)
        if guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
        latents = sch.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents, model.calls


def ldm_run(
    name, prediction_type, steps, karras=False, model=None, cond=None, uncond=None, scale=1.0
):
    model = model or Counting()
    schedule = DiscreteSchedule.from_config(SD1)
    denoiser = CFGDenoiser(Denoiser(model, schedule, prediction_type), _cond(cond), _cond(uncond), scale)
    gens = generators()
    noise = randn(SHAPE, gens)
    out = sample(name, denoiser, noise, steps, schedule, karras=karras, generators=gens)
    return out, model.calls


CASES = [
    (name, pred, steps, karras)
    for name in SAMPLERS
    for pred in PREDICTIONS
    for steps in (10, 25)
    for karras in ((False, True) if name in KARRAS_SAMPLERS else (False,))
]


@pytest.mark.parametrize("name,prediction_type,steps,karras", CASES)
def test_matches_diffusers(name, prediction_type, steps, karras):
    ref, ref_calls = diffusers_loop(name, prediction_type, steps, karras)
    out, calls = ldm_run(name, prediction_type, steps, karras)
    assert calls == ref_calls
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", (1, 2, 3))
def test_few_steps_match_diffusers(name, steps):
    ref, ref_calls = diffusers_loop(name, "epsilon", steps)
    out, calls = ldm_run(name, "epsilon", steps)
    assert calls == ref_calls
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ("euler_a", "dpmpp_2m", "plms"))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_guided_loop_matches_diffusers(name, prediction_type):
    gen = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(2, 3, 6, generator=gen), torch.randn(2, 3, 6, generator=gen)
    kwargs = dict(cond=cond, uncond=uncond, scale=7.5)
    ref, ref_calls = diffusers_loop(name, prediction_type, 10, **kwargs)
    out, calls = ldm_run(name, prediction_type, 10, **kwargs)
    assert calls == ref_calls
    torch.testing.assert_close(out, ref, atol=2 * ATOL, rtol=0)


@pytest.mark.parametrize(
    "name,karras", [(n, False) for n in SAMPLERS] + [(n, True) for n in KARRAS_SAMPLERS]
)
def test_schedule_matches_diffusers(name, karras):
    plan = sampling_schedule(name, DiscreteSchedule.from_config(SD1), 20, karras=karras)
    sch = make_scheduler(name, "epsilon", 20, karras)
    timesteps = sch.timesteps.float()
    if name == "heun":  # diffusers repeats every level but the first for the 2nd-order pass
        timesteps = torch.cat([timesteps[:1], timesteps[1::2]])
    if name == "plms":  # the first level is evaluated twice (its Heun-like start)
        timesteps = torch.cat([timesteps[:1], timesteps[2:]])
    torch.testing.assert_close(plan.timesteps, timesteps, atol=1e-4, rtol=0)
    if hasattr(sch, "sigmas"):
        sigmas = sch.sigmas if name != "heun" else torch.cat([sch.sigmas[:1], sch.sigmas[1::2]])
        torch.testing.assert_close(plan.sigmas, sigmas.float(), atol=0, rtol=0)
    # The start: diffusers' init_noise_sigma, in VP scaling for the VP schedulers.
    vp = name in ("ddim", "plms", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "lcm")
    start = plan.init_sigma / (plan.sigmas[0] ** 2 + 1) ** 0.5 if vp else plan.init_sigma
    torch.testing.assert_close(start, torch.as_tensor(sch.init_noise_sigma, dtype=torch.float32))


def test_per_image_generators_make_images_independent_of_batch():
    schedule = DiscreteSchedule.from_config(SD1)
    denoiser = Denoiser(fake_unet, schedule)
    gens = generators()
    both = sample("euler_a", denoiser, randn(SHAPE, gens), 8, schedule, generators=gens)
    gens = generators(SEEDS[1:])
    second = sample("euler_a", denoiser, randn((1, *SHAPE[1:]), gens), 8, schedule, generators=gens)
    torch.testing.assert_close(both[1:], second, atol=0, rtol=0)
    with pytest.raises(ValueError, match="one per image"):
        sample("euler_a", denoiser, randn(SHAPE), 4, schedule, generators=generators(SEEDS[:1]))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_cfg_matches_diffusers_guidance(prediction_type):
    """Guiding x0 equals diffusers' guidance of the model output, then its x0 formula."""
    schedule = DiscreteSchedule.from_config(SD1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=gen) * 5
    cond, uncond = torch.randn(2, 3, 6, generator=gen), torch.randn(2, 3, 6, generator=gen)
    sigma, scale = schedule.sigmas[600], 6.0
    model = Counting()
    x0 = CFGDenoiser(Denoiser(model, schedule, prediction_type), _cond(cond), _cond(uncond), scale)(x, sigma)
    assert model.calls == 1  # one batch of 2B rows, uncond first as in diffusers
    torch.testing.assert_close(model.conds[0].context, torch.cat([uncond, cond]))
    x_in = x / (sigma**2 + 1) ** 0.5
    u, c = fake_unet(x_in, 600, uncond), fake_unet(x_in, 600, cond)
    out = u + scale * (c - u)
    if prediction_type == "epsilon":
        expected = x - sigma * out
    else:
        expected = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=1e-6)


def test_cfg_scale_one_runs_cond_only_and_batched_sigma_broadcasts():
    schedule = DiscreteSchedule.from_config(SD1)
    model = Counting()
    cond = Conditioning(torch.randn(2, 3, 6))
    zeros = Conditioning(torch.zeros(2, 3, 6))
    den = CFGDenoiser(Denoiser(model, schedule, "v_prediction"), cond, zeros, 1.0)
    x = torch.randn(SHAPE)
    sigmas = torch.stack([schedule.sigmas[100], schedule.sigmas[900]])
    rows = den(x, sigmas)
    assert model.calls == 1 and model.conds[0] is cond
    for i in range(2):
        one = Denoiser(fake_unet, schedule, "v_prediction")
        single = one(x[i : i + 1], sigmas[i], cond.select(slice(i, i + 1)))
        torch.testing.assert_close(rows[i : i + 1], single)
    guided = CFGDenoiser(Denoiser(model, schedule), cond, zeros, 3.0)(x, sigmas)
    assert guided.shape == x.shape


def test_denoiser_runs_model_in_its_dtype():
    schedule = DiscreteSchedule.from_config(SD1)
    seen = []

    def model(x, t, cond):
        seen.append(x.dtype)
        return fake_unet(x, t).to(torch.float64)

    x = torch.randn(SHAPE)
    x0 = Denoiser(model, schedule, dtype=torch.float64)(x, schedule.sigmas[500])
    assert seen == [torch.float64] and x0.dtype == torch.float32
    torch.testing.assert_close(x0, Denoiser(fake_unet, schedule)(x, schedule.sigmas[500]))


def test_discrete_schedule_matches_diffusers():
    schedule = DiscreteSchedule.from_config(SD1)
    ref = EulerDiscreteScheduler.from_config(SD1_SCHEDULER_CONFIG)
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
    t = torch.arange(0, 1000, 37)
    round_trip = schedule.sigma_to_t(schedule.sigmas[t])
    torch.testing.assert_close(round_trip, t.float(), atol=1e-3, rtol=0)
    sigmas = torch.tensor([0.01, 0.03, 0.5, 1.0, 3.3, 14.0, 20.0], dtype=torch.float64)
    log_sigmas = np.log(ref.sigmas.flip(0)[1:].numpy())  # the training table, increasing
    expected = torch.from_numpy(ref._sigma_to_t(sigmas.numpy(), log_sigmas))
    torch.testing.assert_close(schedule.sigma_to_t(sigmas), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteSchedule(beta_schedule="cosine")


def test_lms_coefficients_match_numerical_integration():
    from scipy import integrate

    levels = [14.6, 9.1, 5.2, 2.9, 1.3, 0.6, 0.0]
    for i in range(len(levels) - 1):
        order = min(i + 1, 4)
        for j in range(order):

            def basis(tau, j=j):
                prod = 1.0
                for k in range(order):
                    if k != j:
                        prod *= (tau - levels[i - k]) / (levels[i - j] - levels[i - k])
                return prod

            expected = integrate.quad(basis, levels[i], levels[i + 1], epsrel=1e-12)[0]
            got = lms_coefficient(levels, i, order, j)
            assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_callback_sees_every_step():
    schedule = DiscreteSchedule.from_config(SD1)
    seen = []
    sample("heun", Denoiser(fake_unet, schedule), randn(SHAPE), 5, schedule,
           callback=lambda i, n, x, x0: seen.append((i, n, x.shape, x0.shape)))
    assert [s[:2] for s in seen] == [(i, 5) for i in range(5)]
    assert all(s[2] == SHAPE and s[3] == SHAPE for s in seen)


def test_bad_inputs():
    schedule = DiscreteSchedule.from_config(SD1)
    denoiser = Denoiser(fake_unet, schedule)
    noise = randn(SHAPE)
    with pytest.raises(ValueError) as err:
        sample("k_euler", denoiser, noise, 10, schedule)
    assert all(name in str(err.value) for name in SAMPLERS)
    with pytest.raises(ValueError, match="valid samplers"):
        get_sampler("nope")
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            sample("euler", denoiser, noise, steps, schedule)
    for name in ("ddim", "dpmpp_2m", "euler"):
        with pytest.raises(ValueError, match="steps"):
            sample(name, denoiser, noise, 1000 if name != "euler" else 1001, schedule)
    for name in ("ddim", "plms", "ddpm"):
        with pytest.raises(ValueError, match="karras"):
            sample(name, denoiser, noise, 10, schedule, karras=True)
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(fake_unet, schedule, "sample")
    with pytest.raises(ValueError, match="unconditional"):
        CFGDenoiser(denoiser, Conditioning(torch.zeros(2, 3, 6)), None, 5.0)
    with pytest.raises(TypeError, match="Conditioning"):
        CFGDenoiser(denoiser, torch.zeros(2, 3, 6), None, 1.0)
