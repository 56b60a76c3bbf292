"""Sampling schedules: the noise levels (and model timesteps) each sampler visits.

Each sampler uses the schedule of the diffusers scheduler it corresponds to when
that scheduler is swapped into a pipeline with
``Scheduler.from_config(pipe.scheduler.config)``. SD and SDXL checkpoints ship
``steps_offset=1`` and ``set_alpha_to_one=False``. The timestep spacing (Lin et al.
2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2) is the
call's, else the model's (``ModelConfig.timestep_spacing``; SDXL ships "leading"),
else the scheduler's own default (SD 1.x / 2.x configs set none). Over ``N``
training timesteps:

- "leading": ``k * (N // steps) + steps_offset``, k = steps - 1 .. 0;
- "linspace": ``steps`` evenly spaced points from ``N - 1`` down to 0;
- "trailing": ``round(N - k * N / steps) - 1``, k = 0 .. steps - 1 (float stride).

Per sampler family:

- ``ddim``, ``plms``, ``ddpm`` (default "leading"): integer timesteps (linspace
  rounded). DDIM and PLMS end at the first training level (``set_alpha_to_one=False``),
  DDPM at 0. diffusers' DDIM and PNDM always step from ``t`` to ``t - N // steps``,
  which with another spacing is not always the next timestep: see
  :class:`SamplingSchedule`'s ``below`` and ``above``.
- ``euler``, ``euler_a``, ``heun``, ``lms`` (default "linspace"): fractional linspace
  timesteps, sigmas interpolated linearly in sigma, then 0. With "leading" the start
  is ``sqrt(sigma_max^2 + 1)`` times the noise, diffusers' ``init_noise_sigma`` there.
- ``dpmpp_2m``, ``dpmpp_2m_sde`` (default "linspace"): "linspace" and "leading" over
  ``steps + 1`` points with the last dropped; "trailing" as above; then 0.

``karras=True`` replaces the sigmas by Karras et al. (2022, eq. 5, rho = 7) as
``use_karras_sigmas=True`` does: for the k-samplers between the ends of the spaced
sigmas (so the spacing still sets the range), with fractional timesteps; for
DPM-Solver between the training table's ends (the spacing is not used), with the
timesteps rounded to integers.

numpy reproduces diffusers' arithmetic (float32 linspace, ``np.interp``, round half
to even) so the levels agree to the last bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..config import TIMESTEP_SPACINGS, check_timestep_spacing
from ..denoisers import DiscreteSchedule

# SD 1.x / 2.x / SDXL scheduler configs: see the module docstring.
STEPS_OFFSET = 1
KARRAS_RHO = 7.0


@dataclass(frozen=True)
class SamplingSchedule:
    """What one sampling run visits, in VE (k-diffusion) scaling, all on the CPU.

    ``sigmas``: float32, ``steps + 1`` decreasing levels; sampling ends at ``sigmas[-1]``.
    ``timesteps``: float32, the model timestep diffusers uses at ``sigmas[i]``.
    ``init_sigma``: 0-d float32; the start is ``noise * init_sigma``. It is
    ``sigmas[0]`` for the k-samplers (diffusers' ``init_noise_sigma`` there; with
    "leading" spacing ``sqrt(sigmas[0]^2 + 1)``) and ``sqrt(sigmas[0]^2 + 1)`` for the
    VP samplers, whose start is unit noise in VP scaling.

    ``below`` / ``above`` (DDIM and PLMS only, None unless they differ from the
    neighbouring levels): float32, the levels of ``timesteps[i] -/+ N // steps``, the
    fixed stride diffusers' DDIMScheduler and PNDMScheduler step by whatever the
    spacing (the first training level below timestep 0, the last one above the
    table). A step from ``sigmas[i]`` lands on ``below[i]``, and PNDM redoes its first
    step from ``above[1]`` to ``sigmas[1]``; the latents keep their VP values when the
    next step reads them at its own level.
    """

    sigmas: Tensor
    timesteps: Tensor
    init_sigma: Tensor
    below: Tensor | None = None
    above: Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def spacing_from_scheduler_config(data: dict[str, Any]) -> str | None:
    """The ``timestep_spacing`` of a diffusers ``scheduler_config.json`` (parsed), or
    None when it sets none. diffusers' ``from_config`` hands the key to whichever
    scheduler is swapped in, so it is the model's spacing for every sampler."""
    if not isinstance(data, dict):
        raise TypeError(f"scheduler_config.json: expected a mapping, got {type(data).__name__}")
    return check_timestep_spacing(data.get("timestep_spacing"), "scheduler_config.json: timestep_spacing")


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


def _trailing(n: int, steps: int) -> np.ndarray:
    return np.arange(n, 0, -n / steps).round() - 1


def _spaced(schedule: DiscreteSchedule, steps: int, spacing: str, family: str) -> np.ndarray:
    """Decreasing timesteps of diffusers' ``set_timesteps`` for ``spacing``.

    ``family``: "vp" (DDIM, PNDM, DDPM: int64, linspace rounded), "k" (Euler, Heun,
    LMS: float32, linspace fractional), "dpm" (DPMSolverMultistep: int64; linspace and
    leading space ``steps + 1`` points and drop the smallest).
    """
    n = schedule.num_train_timesteps
    if spacing == "trailing":
        timesteps = _trailing(n, steps)
    else:
        points = steps + 1 if family == "dpm" else steps
        if spacing == "linspace":
            timesteps = np.linspace(0, n - 1, points, dtype=np.float32 if family == "k" else np.float64)
            timesteps = timesteps if family == "k" else timesteps.round()
        else:
            timesteps = (np.arange(0, points) * (n // points)).round() + STEPS_OFFSET
        timesteps = timesteps[::-1][:steps]
    _check_spaced(timesteps, n, steps, spacing)
    return timesteps.astype(np.float32 if family == "k" else np.int64)


def _check_spaced(timesteps: np.ndarray, n: int, steps: int, spacing: str) -> None:
    """Refuse what diffusers would run at timesteps outside the table or repeated."""
    if len(timesteps) != steps:
        # np.arange's float stride N / steps leaves a last point near 0 (timestep -1).
        fits = [next((s for s in counts if len(_trailing(n, s)) == s), None)
                for counts in (range(steps - 1, 0, -1), range(steps + 1, n + 1))]
        raise ValueError(
            f"steps={steps} cannot use 'trailing' spacing: diffusers' float stride {n}/{steps} "
            f"gives {len(timesteps)} timesteps, the last one -1; use "
            f"{' or '.join(str(s) for s in fits if s is not None)} steps"
        )
    if timesteps[0] > n - 1:
        raise ValueError(
            f"steps={steps} is too many for {spacing!r} spacing: with steps_offset={STEPS_OFFSET} the "
            f"first timestep would be {int(timesteps[0])}, past the last of {n} training timesteps"
        )
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError(f"steps={steps} is too many for {spacing!r} spacing: timesteps repeat after rounding")


def vp_plan(sigmas: np.ndarray, timesteps: np.ndarray, **strided: np.ndarray) -> SamplingSchedule:
    """A plan whose start is unit noise in VP scaling (``init_noise_sigma`` 1 in diffusers)."""
    sig = torch.from_numpy(sigmas.astype(np.float32))
    return SamplingSchedule(
        sigmas=sig,
        timesteps=torch.from_numpy(timesteps.astype(np.float32)),
        init_sigma=(sig[0] ** 2 + 1) ** 0.5,
        **{k: torch.from_numpy(v.astype(np.float32)) for k, v in strided.items()},
    )


def ddim_schedule(
    schedule: DiscreteSchedule, steps: int, karras: bool = False, spacing: str | None = None
) -> SamplingSchedule:
    """DDIMScheduler / PNDMScheduler(skip_prk_steps): default "leading", ends at sigmas_table[0]."""
    _no_karras("ddim/plms", karras)
    timesteps = _spaced(schedule, steps, spacing or "leading", "vp")
    table = _table(schedule)
    sigmas = np.concatenate([table[timesteps], table[:1]])
    stride = schedule.num_train_timesteps // steps
    # alphas_cumprod[t - stride], the first level (final_alpha_cumprod) below 0.
    below = table[np.maximum(timesteps - stride, 0)]
    if np.array_equal(below, sigmas[1:]):
        return vp_plan(sigmas, timesteps)
    above = table[np.minimum(timesteps + stride, len(table) - 1)]
    return vp_plan(sigmas, timesteps, below=below, above=above)


def ddpm_schedule(
    schedule: DiscreteSchedule, steps: int, karras: bool = False, spacing: str | None = None
) -> SamplingSchedule:
    """DDPMScheduler: default "leading", ends at 0 (its last step's ``alpha_prod_t_prev`` is 1);
    each step goes to the next timestep of the list, whatever the spacing."""
    _no_karras("ddpm", karras)
    timesteps = _spaced(schedule, steps, spacing or "leading", "vp")
    return vp_plan(np.concatenate([_table(schedule)[timesteps], [0.0]]), timesteps)


def k_schedule(
    schedule: DiscreteSchedule, steps: int, karras: bool = False, spacing: str | None = None
) -> SamplingSchedule:
    """Euler / EulerAncestral / Heun / LMS DiscreteScheduler: default "linspace"."""
    spacing = spacing or "linspace"
    n = schedule.num_train_timesteps
    timesteps = _spaced(schedule, steps, spacing, "k")
    sigmas = np.interp(timesteps, np.arange(0, n), _table(schedule))
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), steps)
        timesteps = schedule.sigma_to_t(torch.from_numpy(sigmas)).numpy()
    sig = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    # diffusers' init_noise_sigma: sqrt(sigma_max^2 + 1) for "leading" (a VP-style start).
    init_sigma = sig.max() if spacing != "leading" else (sig.max() ** 2 + 1) ** 0.5
    return SamplingSchedule(
        sigmas=sig,
        timesteps=torch.from_numpy(timesteps.astype(np.float32)),
        init_sigma=init_sigma,
    )


def dpm_schedule(
    schedule: DiscreteSchedule, steps: int, karras: bool = False, spacing: str | None = None
) -> SamplingSchedule:
    """DPMSolverMultistepScheduler: default "linspace"; Karras sigmas span the whole table."""
    table = _table(schedule)
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
        timesteps = schedule.sigma_to_t(torch.from_numpy(sigmas)).numpy().round()
    else:
        timesteps = _spaced(schedule, steps, spacing or "linspace", "dpm")
        sigmas = table[timesteps]
    return vp_plan(np.concatenate([sigmas, [0.0]]), timesteps)


def _no_karras(name: str, karras: bool) -> None:
    if karras:
        raise ValueError(
            f"karras sigmas are not available for {name}: its update is tied to the "
            "training timesteps"
        )


ScheduleFn = Callable[[DiscreteSchedule, int, bool, str | None], SamplingSchedule]

__all__ = [
    "KARRAS_RHO",
    "STEPS_OFFSET",
    "TIMESTEP_SPACINGS",
    "SamplingSchedule",
    "ScheduleFn",
    "ddim_schedule",
    "ddpm_schedule",
    "dpm_schedule",
    "k_schedule",
    "karras_sigmas",
    "spacing_from_scheduler_config",
    "vp_plan",
]
