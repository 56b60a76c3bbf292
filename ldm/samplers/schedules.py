"""Sampling schedules: the noise levels (and model timesteps) each sampler visits.

Each sampler uses the schedule of the diffusers scheduler it corresponds to when
that scheduler is swapped into a Stable Diffusion pipeline with
``Scheduler.from_config(pipe.scheduler.config)``. SD checkpoints ship a
``scheduler_config.json`` with ``steps_offset=1`` and ``set_alpha_to_one=False`` and
no ``timestep_spacing``, so every scheduler falls back to its own default spacing:

- ``ddim``, ``plms``, ``ddpm``: "leading" integer timesteps ``k * (N // steps) + 1``.
  DDIM and PLMS end at the first training level (``set_alpha_to_one=False``), not at 0.
- ``euler``, ``euler_a``, ``heun``, ``lms``: "linspace" fractional timesteps from
  ``N - 1`` to 0, sigmas interpolated linearly in sigma, then 0.
- ``dpmpp_2m``, ``dpmpp_2m_sde``: ``steps + 1`` rounded linspace points, last dropped, then 0.

``karras=True`` replaces the sigmas of the k-samplers by Karras et al. (2022, eq. 5,
rho = 7) between the table's ends, as ``use_karras_sigmas=True`` does; DPM-Solver
rounds the matching timesteps to integers, the others keep them fractional.

numpy reproduces diffusers' arithmetic (float32 linspace, ``np.interp``, round half
to even) so the levels agree to the last bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..denoisers import DiscreteSchedule

# SD 1.x / 2.x scheduler configs: see the module docstring.
STEPS_OFFSET = 1
KARRAS_RHO = 7.0


@dataclass(frozen=True)
class SamplingSchedule:
    """What one sampling run visits, in VE (k-diffusion) scaling, all on the CPU.

    ``sigmas``: float32, ``steps + 1`` decreasing levels; sampling ends at ``sigmas[-1]``.
    ``timesteps``: float32, the model timestep diffusers uses at ``sigmas[i]``.
    ``init_sigma``: 0-d float32; the start is ``noise * init_sigma``. It is
    ``sigmas[0]`` for the k-samplers (diffusers' ``init_noise_sigma`` there) and
    ``sqrt(sigmas[0]^2 + 1)`` for the VP samplers, whose start is unit noise in VP
    scaling.
    """

    sigmas: Tensor
    timesteps: Tensor
    init_sigma: Tensor

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def karras_sigmas(
    sigma_min: float, sigma_max: float, steps: int, rho: float = KARRAS_RHO
) -> np.ndarray:
    """Karras et al. (2022), eq. 5: evenly spaced in sigma^(1/rho); float64, no final 0."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _table(schedule: DiscreteSchedule) -> np.ndarray:
    return schedule.sigmas.numpy()


def _leading_timesteps(schedule: DiscreteSchedule, steps: int) -> np.ndarray:
    n = schedule.num_train_timesteps
    timesteps = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + STEPS_OFFSET
    if timesteps[0] >= n:
        raise ValueError(
            f"steps={steps} is too many for this sampler: with steps_offset={STEPS_OFFSET} "
            f"at most {n - STEPS_OFFSET} steps fit in {n} training timesteps"
        )
    return timesteps


def _vp(sigmas: np.ndarray, timesteps: np.ndarray) -> SamplingSchedule:
    sig = torch.from_numpy(sigmas.astype(np.float32))
    return SamplingSchedule(
        sigmas=sig,
        timesteps=torch.from_numpy(timesteps.astype(np.float32)),
        init_sigma=(sig[0] ** 2 + 1) ** 0.5,
    )


def ddim_schedule(schedule: DiscreteSchedule, steps: int, karras: bool = False) -> SamplingSchedule:
    """DDIMScheduler / PNDMScheduler(skip_prk_steps): leading spacing, ends at sigmas_table[0]."""
    _no_karras("ddim/plms", karras)
    timesteps = _leading_timesteps(schedule, steps)
    table = _table(schedule)
    return _vp(np.concatenate([table[timesteps], table[:1]]), timesteps)


def ddpm_schedule(schedule: DiscreteSchedule, steps: int, karras: bool = False) -> SamplingSchedule:
    """DDPMScheduler: leading spacing, ends at 0 (its last step's ``alpha_prod_t_prev`` is 1)."""
    _no_karras("ddpm", karras)
    timesteps = _leading_timesteps(schedule, steps)
    return _vp(np.concatenate([_table(schedule)[timesteps], [0.0]]), timesteps)


def k_schedule(schedule: DiscreteSchedule, steps: int, karras: bool = False) -> SamplingSchedule:
    """Euler / EulerAncestral / Heun / LMS DiscreteScheduler: linspace spacing."""
    n = schedule.num_train_timesteps
    table = _table(schedule)
    timesteps = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    sigmas = np.interp(timesteps, np.arange(0, n), table)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), steps)
        timesteps = schedule.sigma_to_t(torch.from_numpy(sigmas)).numpy()
    sig = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return SamplingSchedule(
        sigmas=sig,
        timesteps=torch.from_numpy(timesteps.astype(np.float32)),
        init_sigma=sig.max(),
    )


def dpm_schedule(schedule: DiscreteSchedule, steps: int, karras: bool = False) -> SamplingSchedule:
    """DPMSolverMultistepScheduler: rounded linspace over steps + 1 points, last dropped."""
    n = schedule.num_train_timesteps
    table = _table(schedule)
    timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
        timesteps = schedule.sigma_to_t(torch.from_numpy(sigmas)).numpy().round()
    else:
        if np.any(np.diff(timesteps) == 0):
            raise ValueError(f"steps={steps} is too many: timesteps repeat after rounding")
        sigmas = table[timesteps]
    return _vp(np.concatenate([sigmas, [0.0]]), timesteps)


def _no_karras(name: str, karras: bool) -> None:
    if karras:
        raise ValueError(
            f"karras sigmas are not available for {name}: its update is tied to the "
            "training timesteps"
        )


ScheduleFn = Callable[[DiscreteSchedule, int, bool], SamplingSchedule]
