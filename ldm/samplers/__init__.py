"""Samplers: one plain function per method, plus :func:`sample`, the entry point.

``sample(name, denoiser, noise, steps, schedule)`` takes unit Gaussian noise (what
a pipeline draws before scaling it) and returns the latents to decode, handling the
VP/VE bookkeeping uniformly: the start is ``noise * init_sigma`` in VE scaling, and
the end is divided by ``sqrt(sigma_last^2 + 1)``, which is 1 except for DDIM/PLMS,
whose last level is the first training level. Each name matches a diffusers
scheduler swapped into an SD pipeline with ``from_config``:

=============  ==========================================================
ddim           DDIMScheduler (eta = 0)
plms           PNDMScheduler(skip_prk_steps=True)
ddpm           DDPMScheduler
euler          EulerDiscreteScheduler
euler_a        EulerAncestralDiscreteScheduler
heun           HeunDiscreteScheduler
lms            LMSDiscreteScheduler
dpmpp_2m       DPMSolverMultistepScheduler (dpmsolver++, order 2)
dpmpp_2m_sde   DPMSolverMultistepScheduler (sde-dpmsolver++, order 2)
lcm            LCMScheduler (latent consistency models and LCM-LoRA)
=============  ==========================================================

The timestep spacing ("leading", "linspace", "trailing") is the call's ``spacing``,
else the model's (``DiscreteSchedule.timestep_spacing``, from its config), else the
scheduler's own default, as ``from_config(config, timestep_spacing=...)`` gives in
diffusers (see :mod:`ldm.samplers.schedules`). ``lcm`` has its own timesteps (see
:mod:`ldm.samplers.lcm`): it refuses a spacing asked for, and the model's does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import TIMESTEP_SPACINGS, check_timestep_spacing
from ..denoisers import DiscreteSchedule
from .base import Callback, SamplerFn
from .ddim import sample_ddim
from .ddpm import sample_ddpm
from .dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde
from .k_samplers import sample_euler, sample_euler_ancestral, sample_heun, sample_lms
from .lcm import lcm_schedule, sample_lcm
from .noise import Generators, randn
from .plms import sample_plms
from .schedules import (
    SamplingSchedule,
    ScheduleFn,
    ddim_schedule,
    ddpm_schedule,
    dpm_schedule,
    k_schedule,
    karras_sigmas,
    spacing_from_scheduler_config,
)


@dataclass(frozen=True)
class _Entry:
    fn: SamplerFn
    schedule: ScheduleFn
    karras: bool
    # The SamplingSchedule.below / .above levels the sampler takes, as keywords
    # ("landing", "restart"), and "timesteps" for one that reads the model timesteps.
    strided: tuple[str, ...] = ()
    # Whether the timestep spacing (the call's, else the model's) shapes its schedule.
    spaced: bool = True


_REGISTRY: dict[str, _Entry] = {
    "ddim": _Entry(sample_ddim, ddim_schedule, False, ("landing",)),
    "plms": _Entry(sample_plms, ddim_schedule, False, ("landing", "restart")),
    "ddpm": _Entry(sample_ddpm, ddpm_schedule, False),
    "euler": _Entry(sample_euler, k_schedule, True),
    "euler_a": _Entry(sample_euler_ancestral, k_schedule, True),
    "heun": _Entry(sample_heun, k_schedule, True),
    "lms": _Entry(sample_lms, k_schedule, True),
    "dpmpp_2m": _Entry(sample_dpmpp_2m, dpm_schedule, True),
    "dpmpp_2m_sde": _Entry(sample_dpmpp_2m_sde, dpm_schedule, True),
    "lcm": _Entry(sample_lcm, lcm_schedule, False, ("timesteps",), spaced=False),
}

SAMPLERS: tuple[str, ...] = tuple(_REGISTRY)
KARRAS_SAMPLERS: tuple[str, ...] = tuple(n for n, e in _REGISTRY.items() if e.karras)
# The samplers whose timesteps follow a timestep spacing (all but lcm).
SPACED_SAMPLERS: tuple[str, ...] = tuple(n for n, e in _REGISTRY.items() if e.spaced)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return _REGISTRY[name]


def get_sampler(name: str) -> SamplerFn:
    """The sampler function registered as ``name`` (one of :data:`SAMPLERS`)."""
    return _entry(name).fn


def sampling_schedule(
    name: str,
    schedule: DiscreteSchedule,
    steps: int,
    *,
    karras: bool = False,
    spacing: str | None = None,
) -> SamplingSchedule:
    """The levels and timesteps sampler ``name`` visits in ``steps`` steps.

    ``spacing``: one of :data:`TIMESTEP_SPACINGS`; None uses the model's
    (``schedule.timestep_spacing``), or the sampler's default when it has none.
    """
    entry = _entry(name)
    check_timestep_spacing(spacing, "spacing")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > schedule.num_train_timesteps:
        raise ValueError(
            f"steps={steps} exceeds the {schedule.num_train_timesteps} training timesteps"
        )
    if karras and not entry.karras:
        raise ValueError(
            f"karras sigmas are not available for {name!r}; "
            f"samplers that support them: {', '.join(KARRAS_SAMPLERS)}"
        )
    if karras and spacing is not None and entry.schedule is dpm_schedule:
        # diffusers' DPM-Solver ignores the spacing with Karras sigmas; a call asking
        # for one would silently get the same schedule.
        raise ValueError(
            f"spacing={spacing!r} has no effect on {name!r} with karras sigmas (they span the "
            "whole training schedule); drop one of them"
        )
    if not entry.spaced:
        # The call's spacing is refused by the schedule; the model's is for the other samplers.
        return entry.schedule(schedule, steps, karras, spacing)
    return entry.schedule(schedule, steps, karras, spacing or schedule.timestep_spacing)


def _strided(entry: _Entry, plan: SamplingSchedule, start: int, stop: int) -> dict[str, Tensor]:
    """The off-schedule levels (``plan.below`` / ``.above``) of steps ``start .. stop - 1``
    as the sampler's keywords (PNDM's redone first step runs toward the run's second
    level), and those steps' model timesteps for a sampler that takes them."""
    levels = {"timesteps": plan.timesteps[start:stop]}
    if plan.below is not None and plan.above is not None:
        levels["landing"] = plan.below[start:stop]
        if stop - start > 1:
            levels["restart"] = plan.above[start + 1]
    return {k: v for k, v in levels.items() if k in entry.strided}


class _Scheduled:
    """Feeds the model the schedule's own timestep for each of its sigmas.

    diffusers runs the U-Net at timesteps that are not always ``sigma_to_t(sigma)``
    (integers for DDIM, rounded ones for DPM-Solver with Karras sigmas), so the
    schedule's timestep is looked up by the sigma a sampler asks for; any other sigma
    falls back to the denoiser's own conversion.
    """

    def __init__(self, denoiser: Any, plan: SamplingSchedule) -> None:
        self.denoiser = denoiser
        self.prediction_type = getattr(denoiser, "prediction_type", "epsilon")
        self._timesteps = {
            float(s): t for s, t in zip(plan.sigmas.tolist(), plan.timesteps)
        }

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma)
        t = self._timesteps.get(float(sigma)) if sigma.ndim == 0 else None
        return self.denoiser(x, sigma, t=t)


def first_step(steps: int, strength: float) -> int:
    """Index of the first step an edit of ``strength`` runs in a ``steps``-step schedule.

    diffusers' ``get_timesteps``: the last ``int(steps * strength)`` steps run (the same
    float product, so the same count). Refuses a strength that would run no step.
    """
    runs = min(int(steps * strength), steps)
    if runs < 1:
        raise ValueError(
            f"strength {strength:g} of {steps} steps runs no step (int(steps * strength) = 0); "
            f"raise strength to at least {1 / steps:.3g} or use more steps"
        )
    return steps - runs


@torch.no_grad()
def sample(
    name: str,
    denoiser: Any,
    noise: Tensor,
    steps: int,
    schedule: DiscreteSchedule,
    *,
    karras: bool = False,
    generators: Generators = None,
    callback: Callback | None = None,
    start: int = 0,
    init: Tensor | None = None,
    end: int | None = None,
    spacing: str | None = None,
) -> Tensor:
    """Run sampler ``name`` for ``steps`` steps from unit Gaussian ``noise``.

    ``denoiser(x, sigma, *, t=None) -> x0`` with the conditioning bound, e.g. a
    :class:`~ldm.denoisers.CFGDenoiser`; ``t`` is the model timestep to use. PLMS
    also reads ``denoiser.prediction_type`` (both ldm wrappers have it; epsilon is
    assumed otherwise), since like diffusers it extrapolates the raw model output.
    ``generators``: one CPU generator per image for the stochastic samplers (see
    :mod:`ldm.samplers.noise`). Returns latents in the model's (VP) scaling, the
    same numbers diffusers' pipeline hands to the VAE for the same noise and seeds.

    Editing (img2img, inpainting) starts part-way: ``init`` is the clean latent of
    the input image and only steps ``start ..`` of the ``steps``-step schedule run,
    from ``init + sigma_start * noise`` (diffusers' ``scheduler.add_noise`` at the
    first timestep that runs, written in VE scaling); see :func:`first_step`. Every
    sampler then runs on the remaining levels as if they were a whole schedule
    (k-diffusion's and A1111's img2img). That equals diffusers' img2img for ddim, ddpm,
    euler, euler_a, heun, dpmpp_2m and dpmpp_2m_sde; diffusers' LMS counts the skipped
    steps in its order (weights for slopes it never computed) and its PNDM slices a
    timestep list that repeats one step, so lms and plms differ from it there.

    ``end``: stop after reaching step ``end``'s level (a hand-over: the result is the
    latents still noised to that level, in VP scaling; another model continues with
    ``start=end`` and ``init`` these latents scaled by ``sqrt(sigma_end^2 + 1)``, no
    noise added; diffusers' ``denoising_end`` / ``denoising_start``).

    ``spacing``: the timestep spacing (see :func:`sampling_schedule`).
    """
    plan = sampling_schedule(name, schedule, steps, karras=karras, spacing=spacing)
    if not 0 <= start < plan.steps:
        raise ValueError(f"start must be a step index in [0, {plan.steps}), got {start}")
    if init is None and start:
        raise ValueError("starting part-way through the schedule needs the init latents")
    if end is not None and not start < end < plan.steps:
        raise ValueError(f"end must be a step index in ({start}, {plan.steps}), got {end}")
    stop = plan.steps if end is None else end
    sigmas = plan.sigmas[start:stop + 1]
    x = noise * plan.init_sigma if init is None else init + noise * sigmas[0]
    x = get_sampler(name)(
        _Scheduled(denoiser, plan), x, sigmas, generators=generators, callback=callback,
        **_strided(_entry(name), plan, start, stop),
    )
    return x / (sigmas[-1] ** 2 + 1) ** 0.5


__all__ = [
    "SAMPLERS",
    "KARRAS_SAMPLERS",
    "SPACED_SAMPLERS",
    "TIMESTEP_SPACINGS",
    "Callback",
    "first_step",
    "SamplingSchedule",
    "get_sampler",
    "karras_sigmas",
    "randn",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_plms",
    "sampling_schedule",
    "spacing_from_scheduler_config",
]
