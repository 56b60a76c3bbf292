"""Latent consistency sampling (Luo et al. 2023, "Latent Consistency Models"), as
diffusers' ``LCMScheduler`` runs it.

A consistency model maps a noisy latent straight to a clean one. Each step predicts
``x0`` from the model's output, applies the consistency boundary condition
``denoised = c_skip(t) * x_t + c_out(t) * x0`` (Song et al. 2023, "Consistency
Models", eq. 7; with LCM's ``sigma_data = 0.5`` and timesteps scaled by
``timestep_scaling = 10``), then noises ``denoised`` afresh to the next timestep with
noise from each image's own generator. The last step returns ``denoised``.

The timesteps are LCM's own, not a spaced schedule: the distillation ran on a
skipping-step "origin" schedule of ``original_inference_steps`` (50) timesteps
``k * N / 50 - 1``, k = 1 .. 50, and ``steps`` of them are taken evenly by index, the
largest first (1 step: 999; 4 steps: 999, 759, 499, 259). Timestep spacing and Karras
sigmas do not apply, and more steps than the origin schedule has are refused, as
diffusers does.

In VE scaling (``x = x_t * sqrt(sigma^2 + 1)``) the re-noising to level ``sigma_next``
is ``denoised + sigma_next * noise``, so the sampler fits :func:`ldm.samplers.sample`'s
bookkeeping like the others: the plan starts from unit noise in VP scaling and ends at
level 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..denoisers import DiscreteSchedule
from .base import Callback, DenoiseFn, is_zero, num_steps, report
from .noise import Generators, randn_like
from .schedules import SamplingSchedule, vp_plan

# LCMScheduler's defaults, which every released LCM / LCM-LoRA scheduler config keeps.
ORIGINAL_INFERENCE_STEPS = 50
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def lcm_timesteps(num_train_timesteps: int, steps: int,
                  original_steps: int = ORIGINAL_INFERENCE_STEPS) -> np.ndarray:
    """The ``steps`` decreasing int64 timesteps of ``LCMScheduler.set_timesteps``.

    The origin schedule is ``k * (N // original_steps) - 1`` for k = 1 .. original_steps;
    reversed, its indices ``floor(linspace(0, original_steps, steps, endpoint=False))``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if original_steps > num_train_timesteps:
        raise ValueError(f"lcm: the origin schedule's {original_steps} steps exceed the model's "
                         f"{num_train_timesteps} training timesteps")
    if steps > original_steps:
        raise ValueError(
            f"steps={steps} is more than the lcm sampler can take: its timesteps are a subset of the "
            f"{original_steps}-step origin schedule the model was distilled on; use 1 to {original_steps} "
            "steps (LCM models are made for 1-8)"
        )
    stride = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * stride - 1)[::-1]
    indices = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.int64)


def lcm_schedule(schedule: DiscreteSchedule, steps: int, karras: bool = False,
                 spacing: str | None = None) -> SamplingSchedule:
    """LCMScheduler's levels: the origin schedule's timesteps (see :func:`lcm_timesteps`),
    then 0 (the last step returns its ``denoised``). ``karras`` and ``spacing`` are
    refused: LCM's timesteps are fixed by its distillation."""
    if karras:
        raise ValueError("karras sigmas are not available for lcm: it runs at the timesteps of the "
                         "origin schedule its model was distilled on")
    if spacing is not None:
        raise ValueError(
            f"spacing={spacing!r} does not apply to lcm: it takes its steps evenly from its own "
            f"{ORIGINAL_INFERENCE_STEPS}-step origin schedule (timesteps k * N / {ORIGINAL_INFERENCE_STEPS} - 1, "
            "as diffusers' LCMScheduler, which ignores timestep_spacing); leave the spacing out"
        )
    timesteps = lcm_timesteps(schedule.num_train_timesteps, steps)
    table = schedule.sigmas.numpy()
    return vp_plan(np.concatenate([table[timesteps], [0.0]]), timesteps)


def boundary_scalings(timestep: Tensor, timestep_scaling: float = TIMESTEP_SCALING) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` of LCM's boundary condition at a discrete ``timestep``
    (``LCMScheduler.get_scalings_for_boundary_condition_discrete``): ``c_skip -> 1`` and
    ``c_out -> 0`` as t -> 0, so the model is the identity on clean latents."""
    scaled = torch.as_tensor(timestep, dtype=torch.float32) * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def sample_lcm(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
    timesteps: Tensor | None = None,
) -> Tensor:
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 3).

    ``timesteps``: the model timestep of each step (``c_skip`` / ``c_out`` depend on it),
    one per level but the last. Each step: ``denoised = c_skip * x_t + c_out * x0`` with
    ``x_t = x / sqrt(sigma^2 + 1)``, then ``x = denoised + sigma_next * noise`` (fresh
    noise from each image's generator); a step to level 0 returns ``denoised`` and draws
    no noise, as diffusers' last step.
    """
    total = num_steps(sigmas)
    if timesteps is None or torch.as_tensor(timesteps).shape != (total,):
        got = None if timesteps is None else tuple(torch.as_tensor(timesteps).shape)
        raise ValueError(f"lcm needs one timestep per step ({total}), got {got}")
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        c_skip, c_out = boundary_scalings(timesteps[i])
        denoised = c_out * x0 + c_skip * (x / (sigma**2 + 1) ** 0.5)
        x = denoised if is_zero(sigma_next) else denoised + sigma_next * randn_like(x, generators)
        x = report(callback, i, total, x, denoised)
    return x


__all__ = ["ORIGINAL_INFERENCE_STEPS", "SIGMA_DATA", "TIMESTEP_SCALING", "boundary_scalings", "lcm_schedule",
           "lcm_timesteps", "sample_lcm"]
