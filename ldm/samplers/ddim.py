"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), eta = 0."""

from __future__ import annotations

from torch import Tensor

from .base import Callback, DenoiseFn
from .k_samplers import sample_euler
from .noise import Generators


def sample_ddim(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma_t = 0).

    In VE scaling the DDIM update ``x0 + sigma_next * eps`` is exactly an Euler step
    of the probability-flow ODE (Karras et al. 2022, sec. 4), so this is Euler on the
    DDIM schedule (leading integer timesteps, ending at the first training level).
    """
    return sample_euler(denoiser, x, sigmas, generators=generators, callback=callback)

