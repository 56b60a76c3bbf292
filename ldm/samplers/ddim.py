"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), eta = 0."""

from __future__ import annotations

from torch import Tensor

from .base import Callback, DenoiseFn, euler_step, num_steps, report
from .k_samplers import sample_euler
from .noise import Generators


def sample_ddim(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
    landing: Tensor | None = None,
) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma_t = 0).

    In VE scaling the DDIM update ``x0 + sigma_next * eps`` is exactly an Euler step
    of the probability-flow ODE (Karras et al. 2022, sec. 4), so this is Euler on the
    DDIM schedule (integer timesteps, ending at the first training level).

    ``landing``: the level each step lands on when it is not ``sigmas[i + 1]``
    (diffusers' DDIMScheduler steps from timestep t to t - N // steps whatever the
    spacing; see ``SamplingSchedule.below``); the next step reads the latents there.
    """
    if landing is None:
        return sample_euler(denoiser, x, sigmas, generators=generators, callback=callback)
    total = num_steps(sigmas)
    check_landing(landing, total)
    for i in range(total):
        denoised = denoiser(x, sigmas[i])
        x = reread(euler_step(x, sigmas[i], landing[i], denoised), landing[i], sigmas[i + 1])
        x = report(callback, i, total, x, denoised)
    return x


def reread(x: Tensor, level: Tensor, to: Tensor) -> Tensor:
    """Latents at VE ``level`` read at level ``to`` with the same VP values, as diffusers'
    VP schedulers hand ``x / sqrt(level^2 + 1)`` to a step at another timestep."""
    if bool(level == to):
        return x
    return x * ((to**2 + 1) / (level**2 + 1)) ** 0.5


def check_landing(landing: Tensor, total: int) -> None:
    if landing.ndim != 1 or len(landing) != total:
        raise ValueError(f"landing must hold one level per step ({total}), got shape {tuple(landing.shape)}")

